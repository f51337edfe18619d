//! Version floors for the dependencies that parse what clients, upstreams and TLS peers
//! send. A `cargo update -p … --precise`, a merge or a hand edit that takes `Cargo.lock`
//! below a fixed advisory fails here. It stands in for `cargo audit`, whose advisory
//! database cannot be fetched where the suite runs. `Cargo.toml` states the floors of
//! the direct dependencies among them, so a fresh resolution cannot go below them either.
#![allow(clippy::expect_used)]

/// (crate, lowest acceptable version, why).
const FLOORS: &[(&str, &str, &str)] = &[
    (
        "hyper",
        "1.11.0",
        "with both Content-Length and Transfer-Encoding, TE wins and the connection closes",
    ),
    (
        "h2",
        "0.4.19",
        "CONTINUATION and DATA flood limits that scale with the window",
    ),
    ("tokio", "1.44.2", "RUSTSEC-2025-0023, broadcast channel unsoundness"),
    (
        "rustls",
        "0.23.18",
        "RUSTSEC-2024-0399, a panic in the server-side Acceptor",
    ),
    (
        "ring",
        "0.17.12",
        "RUSTSEC-2025-0009, AES functions panic with overflow checks",
    ),
];

fn version(text: &str) -> Vec<u64> {
    text.split(['.', '-', '+'])
        .take(3)
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// Every (name, version) in a Cargo.lock; a crate may be there in several versions.
fn locked(lock: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        let field = |key: &str| line.strip_prefix(key).map(|v| v.trim_matches('"').to_string());
        if line == "[[package]]" {
            name = None;
        } else if let Some(n) = field("name = ") {
            name = Some(n);
        } else if let (Some(v), Some(n)) = (field("version = "), name.take()) {
            out.push((n, v));
        }
    }
    out
}

#[test]
fn the_lock_file_holds_no_version_below_a_fixed_advisory() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock");
    let lock = std::fs::read_to_string(path).expect("Cargo.lock is committed");
    let packages = locked(&lock);
    assert!(packages.len() > 50, "Cargo.lock parsed to {} packages", packages.len());
    for (krate, floor, why) in FLOORS {
        let versions: Vec<&String> = packages.iter().filter(|(n, _)| n == krate).map(|(_, v)| v).collect();
        assert!(
            !versions.is_empty(),
            "{krate} is no longer in Cargo.lock: review its floor"
        );
        for v in versions {
            assert!(version(v) >= version(floor), "{krate} {v} is below {floor}: {why}");
        }
    }
}

#[test]
fn the_lock_parser_and_version_order_work() {
    let lock = "[[package]]\nname = \"a\"\nversion = \"1.2.3\"\n\n[[package]]\nname = \"b\"\nversion = \"0.4.9\"\n";
    assert_eq!(
        locked(lock),
        [("a".into(), "1.2.3".into()), ("b".into(), "0.4.9".into())]
    );
    assert!(version("0.4.19") > version("0.4.9"));
    assert!(version("1.11.0") > version("1.9.99"));
    assert!(version("0.23.18") >= version("0.23.18"));
    assert!(version("0.23.17") < version("0.23.18"));
}
