//! Helpers shared by the bench binaries (included with `#[path]`; not a bench itself):
//! synthetic keys and auth records shaped like the ones the database loader builds,
//! an [`Authenticator`] that needs no database, and the bench-vs-test-mode switch.
#![allow(dead_code)]

use std::time::Duration;

use chrono::Utc;
use keygate::auth::Authenticator;
use keygate::config::Config;
use keygate::keys::{KeyDigest, KEY_BODY_LEN};
use keygate::model::{AuthFields, AuthRecord, Plan};
use uuid::Uuid;

/// An address nothing listens on: a bench that reached the database would fail loudly.
pub const NO_DATABASE: &str = "postgres://bench@127.0.0.1:1/none";

/// True under `cargo bench` (criterion passes `--bench`); false under `cargo test
/// --all-targets`, where each bench runs once and must stay small and quick.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The full size in bench mode, the small one in test mode.
pub fn scale(full: usize, test: usize) -> usize {
    if bench_mode() {
        full
    } else {
        test
    }
}

/// Defaults plus a database URL, as `keygate` builds them with no config file.
pub fn config(database_url: &str) -> Config {
    let url = database_url.to_string();
    Config::from_env(&move |name| (name == "DATABASE_URL").then(|| url.clone())).expect("default config")
}

/// A well-formed key, distinct for each `i`: `pk_test_` and 43 URL-safe base64
/// characters whose last one is canonical (`A`: low two bits zero).
pub fn key(i: u64) -> String {
    let body = format!("{:016x}{:016x}", i, i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut k = String::with_capacity(keygate::keys::KEY_LEN);
    k.push_str("pk_test_");
    k.push_str("bench");
    k.push_str(&body);
    while k.len() < keygate::keys::KEY_PREFIX_LEN + KEY_BODY_LEN - 1 {
        k.push('x');
    }
    k.push('A');
    k
}

/// A record as `db::auth_queries` builds it from a row (prefix, hint and a one-scope
/// set read as strings, limits as `bigint`), one organisation per key unless given.
pub fn record(org: Option<Uuid>) -> AuthRecord {
    let scopes = [String::from("chat")];
    AuthRecord::new(AuthFields {
        key_id: Uuid::new_v4(),
        organization_id: org.unwrap_or_else(Uuid::new_v4),
        key_prefix: "pk_test_",
        key_hint: "bchA",
        key_active: true,
        expires_at: None,
        revoked_at: None,
        scopes: &scopes,
        custom_rate_limit: None,
        org_active: true,
        plan: Plan::Pro,
        org_rate_limit_per_minute: 2_000_000_000,
        monthly_request_limit: 2_000_000_000,
    })
}

/// An authenticator over a pool that points nowhere, with a TTL long enough that no
/// bench outlives it (a stale entry would send the bench to the database).
pub fn authenticator() -> Authenticator {
    let mut cfg = config(NO_DATABASE);
    cfg.auth.cache_ttl = Duration::from_secs(86_400);
    cfg.auth.negative_cache_ttl = Duration::from_secs(86_400);
    let pool = keygate::db::pool(&cfg.database, 1).expect("lazy pool");
    Authenticator::new(&cfg.auth, pool)
}

/// `n` keys cached under their digests; returns the digests in insertion order.
pub fn fill(auth: &Authenticator, n: usize) -> Vec<KeyDigest> {
    (0..n as u64)
        .map(|i| {
            let d = KeyDigest::of(&key(i));
            auth.bench_insert(d, Some(record(None)));
            d
        })
        .collect()
}

/// A cheap deterministic index sequence (xorshift), so random-access benches do not
/// measure a random number generator.
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next_index(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Today, for limiter calls.
pub fn now() -> chrono::DateTime<Utc> {
    Utc::now()
}
