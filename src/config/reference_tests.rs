//! `docs/configuration.md` held to `config/keygate.example.toml`: every key of the
//! example is in the reference and every key of the reference is in the example, and
//! the reference's SIGHUP column says what `proxy::reload` really reloads.

use std::collections::BTreeMap;
use std::path::Path;

/// Tables whose keys are names the operator chooses (header names, model names).
const MAPS: [&str; 2] = ["upstream.headers", "pricing.models"];

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `pricing.models."gpt-4o"` → `pricing.models.<name>`; `[[routes]]` → `routes[]`.
fn normalise(path: &str) -> String {
    for map in MAPS {
        if let Some(rest) = path.strip_prefix(map).and_then(|r| r.strip_prefix('.')) {
            // The chosen name may be quoted and contain dots; what follows it may not.
            let tail = rest.rsplit_once('"').map_or_else(
                || rest.split_once('.').map(|(_, t)| t).unwrap_or(""),
                |(_, t)| t.trim_start_matches('.'),
            );
            return if tail.is_empty() {
                format!("{map}.<name>")
            } else {
                format!("{map}.<name>.{tail}")
            };
        }
    }
    path.to_string()
}

/// Every key the example sets, commented-out settings included (a comment counts when
/// it parses as TOML on its own: `# key = "value"` or `# [section]`; prose does not).
fn example_keys() -> Vec<String> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in read("config/keygate.example.toml").lines() {
        let line = line.trim();
        let body = line.strip_prefix('#').map_or(line, str::trim);
        if body.is_empty() || (line.starts_with('#') && toml::from_str::<toml::Table>(body).is_err()) {
            continue;
        }
        if let Some(name) = body.strip_prefix("[[").and_then(|b| b.strip_suffix("]]")) {
            section = format!("{name}[]");
        } else if let Some(name) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, _)) = body.split_once('=') {
            keys.push(normalise(&format!("{section}.{}", key.trim())));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The reference's rows: key → the SIGHUP column (`yes` or `no`).
fn reference_rows() -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in read("docs/configuration.md").lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `key` | type | default | SIGHUP | meaning |
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let key = cells[1].trim_matches('`').to_string();
        assert!(
            rows.insert(key.clone(), cells[4].to_string()).is_none(),
            "{key} is listed twice"
        );
    }
    rows
}

#[test]
fn normalising_map_keys() {
    assert_eq!(
        normalise("pricing.models.\"gpt-4o\".prompt_per_1k"),
        "pricing.models.<name>.prompt_per_1k"
    );
    assert_eq!(
        normalise("pricing.models.\"a.b\".prompt_per_1k"),
        "pricing.models.<name>.prompt_per_1k"
    );
    assert_eq!(
        normalise("pricing.models.big.completion_per_1k"),
        "pricing.models.<name>.completion_per_1k"
    );
    assert_eq!(normalise("upstream.headers.authorization"), "upstream.headers.<name>");
    assert_eq!(normalise("server.listen"), "server.listen");
}

#[test]
fn every_example_key_is_in_the_reference_and_back() {
    let example = example_keys();
    let rows = reference_rows();
    assert!(example.len() > 50, "example scan found only {example:?}");
    for key in &example {
        assert!(rows.contains_key(key), "docs/configuration.md lacks `{key}`");
    }
    for key in rows.keys() {
        assert!(example.contains(key), "config/keygate.example.toml lacks `{key}`");
    }
}

#[test]
fn the_reference_says_what_sighup_reloads() {
    for (key, sighup) in reference_rows() {
        let expected = if crate::proxy::reload::is_reloadable(&key) {
            "yes"
        } else {
            "no"
        };
        assert_eq!(sighup, expected, "SIGHUP column of `{key}`");
    }
}
