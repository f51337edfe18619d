//! Hostile input: random-key floods, keys in URLs, a canary key that must never leak.

mod common;

use common::net::*;
use common::*;

/// A well-formed key that no database holds.
fn random_key(i: u32) -> String {
    let mut body = format!("{:0>42}", format!("{i:x}Q"));
    body.push('A');
    format!("pk_live_{}", &body[body.len() - 43..])
}

#[tokio::test]
async fn a_random_key_flood_bounds_lookups_and_valid_keys_keep_working() {
    let (db, key) = seeded_db().await;
    db.ok(&["orgs", "update", "default", "--rate-limit", "100000"]);
    let up = Upstream::start(&[]).await;
    let gw = Gateway::start(&db, up.port, "[auth]\nfailed_auth_per_minute = 50\n").await;
    let auth = bearer(&key);
    assert_eq!(get(&gw.url("/echo"), &[("authorization", &auth)]).await.status, 200);
    let before = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups");

    let url = gw.url("/echo");
    let flood = tokio::spawn({
        let url = url.clone();
        async move {
            let mut codes = std::collections::BTreeMap::<String, u32>::new();
            for batch in 0..30u32 {
                let tasks: Vec<_> = (0..10)
                    .map(|j| {
                        let (url, k) = (url.clone(), bearer(&random_key(batch * 10 + j)));
                        tokio::spawn(async move { get(&url, &[("authorization", &k)]).await })
                    })
                    .collect();
                for t in tasks {
                    let r = t.await.expect("join");
                    *codes
                        .entry(format!("{} {}", r.status.as_u16(), r.error_code()))
                        .or_default() += 1;
                }
            }
            codes
        }
    });
    let mut valid_failures = 0;
    for _ in 0..50 {
        if get(&url, &[("authorization", &auth)]).await.status != 200 {
            valid_failures += 1;
        }
    }
    let codes = flood.await.expect("flood");
    assert_eq!(valid_failures, 0, "a valid key failed during the flood");
    let lookups = gw.ready_json().await["cache"]["lookups"].as_u64().expect("lookups") - before;
    // 50 a minute, twice if the run straddles a minute boundary.
    assert!(
        lookups <= 100,
        "{lookups} database lookups for 300 random keys; {codes:?}"
    );
    assert!(
        codes.get("429 too_many_failed_authentications").copied().unwrap_or(0) >= 150,
        "{codes:?}"
    );
    assert_eq!(codes.values().sum::<u32>(), 300);
    let r = get(&url, &[("authorization", &bearer(&random_key(9999)))]).await;
    if r.status == 429 {
        assert!(r.header("retry-after").is_some());
    }
}

#[tokio::test]
async fn keys_in_query_strings_are_refused_and_never_logged() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let mut gw = Gateway::start(&db, up.port, "").await;
    let r = get(&gw.url(&format!("/echo?api_key={key}")), &[]).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (400, "api_key_in_query"));
    let r = get(&gw.url(&format!("/echo?k={key}")), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 400, "refused even alongside a valid header key");
    assert!(!String::from_utf8_lossy(&r.body).contains(&key[8..]));
    let _ = gw.proc.terminate(std::time::Duration::from_secs(10));
    assert!(!gw.logs().contains(&key[8..]), "the key leaked into the logs");
}
