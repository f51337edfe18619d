//! Fuzz target `config_loader`: TOML text through `keygate::config::Config::parse_with_env`,
//! the whole load path after reading the file (TOML syntax, `${VAR}` interpolation, serde
//! into the raw structs, every validation rule and default).
//!
//! Input: arbitrary bytes; when they are UTF-8 they are the config file's text. Each input
//! is loaded with two fixed environments, one without `DATABASE_URL` (so `[database] url`
//! itself is validated) and one with it (so files without a database still reach every
//! later section). Properties checked (a failed `assert!` is a crash):
//! - loading returns Ok or Err, never panics, and is deterministic (same outcome, same
//!   error text, same typed values when loaded twice);
//! - an error's message (what `check-config` prints) renders without panicking;
//! - a loaded config's `Debug` renders, and an admin token is redacted and at least 16 long.
//!
//! - `keygate::db::mask_url`, which renders the database URL in `Debug`, errors and logs,
//!   never shows the password that PostgreSQL would read from it (`KEYGATE_FUZZ_DB_MASK=0`
//!   turns this check off).

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use keygate::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789abcdef";

/// The environment a config is loaded with: a few variables the seeds reference.
fn env_without_db(name: &str) -> Option<String> {
    match name {
        "KEYGATE_ADMIN_TOKEN" => Some(ADMIN_TOKEN.into()),
        "UPSTREAM_TOKEN" => Some("upstream-secret-token".into()),
        "UPSTREAM_URL" => Some("http://127.0.0.1:8000/base".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn env_with_db(name: &str) -> Option<String> {
    match name {
        "DATABASE_URL" => Some("postgres://keygate:fuzz@127.0.0.1:5432/keygate".into()),
        other => env_without_db(other),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    for env in [&env_without_db as &dyn Fn(&str) -> Option<String>, &env_with_db] {
        let first = Config::parse_with_env(text, path, env);
        let second = Config::parse_with_env(text, path, env);
        match (&first, &second) {
            (Ok(a), Ok(b)) => {
                check_loaded(a);
                assert_eq!(typed(a), typed(b), "loading is not deterministic");
            }
            (Err(a), Err(b)) => assert_eq!(message(a), message(b), "loading is not deterministic"),
            _ => panic!("loading is not deterministic: {first:?} then {second:?}"),
        }
    }
});

fn message(e: &ConfigError) -> String {
    e.to_string()
}

/// Every typed value, rendered. `pricing.models` is a HashMap, so it is compared as a
/// sorted list: its Debug order differs between two maps with the same content.
fn typed(c: &Config) -> String {
    let mut models: Vec<_> = c.pricing.models.iter().collect();
    models.sort_by(|a, b| a.0.cmp(b.0));
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{models:?}|{:?}",
        c.server,
        c.upstream,
        c.database,
        c.database.url,
        c.auth,
        c.limits,
        c.identity_headers,
        c.routes,
        c.log,
        c.usage,
        c.pricing.default,
        c.admin.token.as_ref().map(|t| t.expose()),
    )
}

fn check_loaded(c: &Config) {
    let _ = format!("{c:?}");
    if check_db_mask() {
        check_db_url_masked(&c.database.url);
    }
    if let Some(token) = &c.admin.token {
        // Exact, so a token that happens to spell part of the redacted text cannot pass.
        assert_eq!(
            format!("{token:?}"),
            "AdminToken(***)",
            "admin token Debug is not redacted"
        );
        assert!(
            token.expose().len() >= 16,
            "admin token shorter than the minimum was accepted"
        );
    }
}

fn check_db_mask() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KEYGATE_FUZZ_DB_MASK").map_or(true, |v| v != "0"))
}

/// The masked URL must not contain the password tokio-postgres parses out of it. Checked
/// only where that is decidable from the text: an alphanumeric password of 4+ characters
/// that occurs exactly once in a URL without `%` or `\` escapes, so that occurrence is
/// the password itself and `mask_url` (which only replaces text with `***`) had to hide it.
fn check_db_url_masked(url: &str) {
    let Ok(parsed) = url.parse::<tokio_postgres::Config>() else {
        return;
    };
    let Some(password) = parsed.get_password().and_then(|p| std::str::from_utf8(p).ok()) else {
        return;
    };
    if password.len() < 4
        || !password.bytes().all(|b| b.is_ascii_alphanumeric())
        || url.contains(['%', '\\'])
        || occurrences(url, password) != 1
    {
        return;
    }
    let masked = keygate::db::mask_url(url);
    assert!(
        !masked.contains(password),
        "mask_url leaks the password {password:?}: {url:?} is shown as {masked:?}"
    );
}

/// Occurrences of `needle` in `haystack`, overlapping ones included.
fn occurrences(haystack: &str, needle: &str) -> usize {
    (0..haystack.len())
        .filter(|&i| haystack.get(i..).is_some_and(|rest| rest.starts_with(needle)))
        .count()
}
