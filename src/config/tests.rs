//! Every validation rule, and the shipped example file.

use super::*;

fn env_with_db(name: &str) -> Option<String> {
    (name == "DATABASE_URL").then(|| "postgres://u:p@localhost/db".to_string())
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with_env(text, Path::new("test.toml"), &env_with_db)
}

fn err(text: &str) -> String {
    parse(text).expect_err("config should be refused").to_string()
}

#[test]
fn example_file_parses_with_every_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.example.toml");
    let cfg = Config::load_with_env(&path, &no_env).expect("example config is valid");
    assert_eq!(cfg.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(
        cfg.upstream().expect("upstream").url.to_string(),
        "http://127.0.0.1:8000/"
    );
    assert_eq!(cfg.database.url, "postgres://keygate@127.0.0.1:5432/keygate");
    assert_eq!(cfg.routes.len(), 2);
    assert_eq!(
        cfg.auth.key_sources,
        vec![
            KeySource::Bearer,
            KeySource::Header(HeaderName::from_static("x-api-key"))
        ]
    );
}

#[test]
fn example_file_sets_every_key_the_parser_knows() {
    // Each raw field must appear in the example, so the example never goes stale.
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.example.toml"))
        .expect("read example");
    let defaults = format!("{:?}", RawConfig::default());
    let mut fields: Vec<&str> = defaults
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .filter(|w| {
            ![
                "none",
                "server",
                "database",
                "auth",
                "limits",
                "identity_headers",
                "routes",
                "log",
                "upstream",
            ]
            .contains(w)
        })
        .collect();
    fields.extend(["url", "connect_timeout", "headers", "prefix", "methods", "scopes"]);
    for f in fields {
        assert!(
            text.contains(&format!("{f} ="))
                || text.contains(&format!("[{f}"))
                || text.contains(&format!(".{f}]"))
                || text.contains(&format!(".{f}.")),
            "example config lacks `{f}`"
        );
    }
}

#[test]
fn defaults_cover_everything_but_upstream_and_database() {
    let cfg = parse("").expect("empty file is valid with DATABASE_URL");
    assert!(cfg.upstream.is_none());
    assert!(cfg.upstream().is_err());
    assert_eq!(
        cfg.server.admin_listen.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9090")
    );
    assert_eq!(cfg.server.max_header_bytes, 16 * 1024);
    assert_eq!(cfg.limits.flush_interval, Duration::from_secs(1));
    assert_eq!(cfg.usage.fold_interval, Duration::from_secs(30));
    assert_eq!(cfg.identity_headers.key_id.as_str(), "x-keygate-key-id");
    assert!(!cfg.auth.fail_open);
    assert_eq!(cfg.auth.max_unknown_lookups_per_second, 1_000);
    let off = parse("[auth]\nmax_unknown_lookups_per_second = 0\n").expect("0 turns it off");
    assert_eq!(off.auth.max_unknown_lookups_per_second, 0);
    assert!(matches!(
        Config::parse_with_env("", Path::new("x"), &no_env),
        Err(ConfigError::NoDatabase)
    ));
}

#[test]
fn database_url_env_overrides_the_file() {
    let cfg = parse("[database]\nurl = \"postgres://file/db\"\n").expect("valid");
    assert_eq!(cfg.database.url, "postgres://u:p@localhost/db");
    let cfg =
        Config::parse_with_env("[database]\nurl = \"postgres://file/db\"\n", Path::new("x"), &no_env).expect("valid");
    assert_eq!(cfg.database.url, "postgres://file/db");
}

#[test]
fn interpolates_environment_variables() {
    let env = |n: &str| match n {
        "DB" => Some("postgres://h/db".to_string()),
        "TOKEN" => Some("abc".to_string()),
        _ => None,
    };
    let text = "[database]\nurl = \"${DB}\"\n[upstream]\nurl = \"http://u:1\"\n[upstream.headers]\nauthorization = \"Bearer ${TOKEN}\"\n";
    let cfg = Config::parse_with_env(text, Path::new("x"), &env).expect("valid");
    assert_eq!(cfg.database.url, "postgres://h/db");
    let up = cfg.upstream().expect("upstream");
    assert_eq!(up.headers[0].1.to_str().expect("ascii"), "Bearer abc");
    assert!(up.headers[0].1.is_sensitive());
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    assert!(err("[server]\nlisen = \"0.0.0.0:1\"\n").starts_with("config key `server.lisen`: unknown field `lisen`"));
    assert!(err("[serverz]\n").contains("unknown field `serverz`"));
    assert!(err("[[routes]]\nprefix = \"/a\"\nscope = [\"x\"]\n").contains("routes[0].scope"));
}

#[test]
fn syntax_errors_name_the_file() {
    let e = err("[server\n");
    assert!(e.starts_with("config file test.toml is not valid TOML"), "{e}");
}

#[test]
fn wrong_types_name_the_key() {
    assert!(err("[server]\nhttp2 = \"yes\"\n").starts_with("config key `server.http2`"));
}

#[test]
fn each_rule_names_its_key() {
    let cases: &[(&str, &str)] = &[
        ("[server]\nlisten = \"nowhere\"", "server.listen"),
        ("[server]\nadmin_listen = \"1.2.3.4\"", "server.admin_listen"),
        ("[server]\nheader_read_timeout = \"0s\"", "server.header_read_timeout"),
        ("[server]\nbody_idle_timeout = \"fast\"", "server.body_idle_timeout"),
        ("[server]\nmax_header_bytes = \"10\"", "server.max_header_bytes"),
        ("[server]\nmax_body_bytes = \"lots\"", "server.max_body_bytes"),
        ("[server]\nmax_connections = 0", "server.max_connections"),
        ("[server]\nruntime = \"threads\"", "server.runtime"),
        ("[server]\nworkers = 5000", "server.workers"),
        ("[server]\nworkers = -1", "server.workers"),
        ("[server]\nshutdown_grace = \"x\"", "server.shutdown_grace"),
        ("[upstream]\nconnect_timeout = \"1s\"", "upstream.url"),
        ("[upstream]\nurl = \"ftp://x\"", "upstream.url"),
        ("[upstream]\nurl = \"/just/a/path\"", "upstream.url"),
        ("[upstream]\nurl = \"http://x/?a=b\"", "upstream.url"),
        (
            "[upstream]\nurl = \"http://x\"\nresponse_timeout = \"0ms\"",
            "upstream.response_timeout",
        ),
        (
            "[upstream]\nurl = \"http://x\"\npool_max_idle_per_host = -1",
            "upstream.pool_max_idle_per_host",
        ),
        (
            "[upstream]\nurl = \"http://x\"\n[upstream.headers]\n\"bad header\" = \"v\"",
            "upstream.headers.bad header",
        ),
        (
            "[upstream]\nurl = \"http://x\"\n[upstream.headers]\nx-a = \"line\\nbreak\"",
            "upstream.headers.x-a",
        ),
        ("[database]\npool_size = 0", "database.pool_size"),
        ("[database]\nstatement_timeout = \"0s\"", "database.statement_timeout"),
        ("[auth]\nkey_headers = []", "auth.key_headers"),
        ("[auth]\nkey_headers = [\"bad header\"]", "auth.key_headers"),
        ("[auth]\ncache_ttl = \"0s\"", "auth.cache_ttl"),
        ("[auth]\nmax_concurrent_lookups = 0", "auth.max_concurrent_lookups"),
        ("[auth]\nfailed_auth_per_minute = -1", "auth.failed_auth_per_minute"),
        (
            "[auth]\nmax_unknown_lookups_per_second = -1",
            "auth.max_unknown_lookups_per_second",
        ),
        (
            "[auth]\nmax_unknown_lookups_per_second = 4294967296",
            "auth.max_unknown_lookups_per_second",
        ),
        ("[auth]\nlookup_timeout = \"0s\"", "auth.lookup_timeout"),
        ("[auth]\nserve_stale_for = \"soon\"", "auth.serve_stale_for"),
        ("[auth]\nbreaker_failures = -2", "auth.breaker_failures"),
        ("[auth]\nbreaker_cooldown = \"0s\"", "auth.breaker_cooldown"),
        ("[server]\nrequest_timeout = \"0s\"", "server.request_timeout"),
        ("[limits]\nmax_concurrent_per_key = -1", "limits.max_concurrent_per_key"),
        ("[limits]\nflush_interval = \"10ms\"", "limits.flush_interval"),
        ("[identity_headers]\nplan = \"x-api-key\"", "identity_headers.plan"),
        (
            "[identity_headers]\nplan = \"x-a\"\nscopes = \"x-a\"",
            "identity_headers",
        ),
        ("[[routes]]\nscopes = [\"a\"]", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"v1\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"/v1/../admin\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"/%61dmin\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"/admin%zz\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"//admin\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"/admin;x\"", "routes[0].prefix"),
        ("[[routes]]\nprefix = \"/v1\"\nmethods = [\"G T\"]", "routes[0].methods"),
        ("[[routes]]\nprefix = \"/v1\"\nscopes = [\"a,b\"]", "routes[0].scopes"),
        ("[log]\nformat = \"xml\"", "log.format"),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]",
            "server.trusted_proxies",
        ),
        ("[limits]\ntracking_retention = \"0s\"", "limits.tracking_retention"),
        ("[usage]\nqueue_capacity = 0", "usage.queue_capacity"),
        ("[usage]\nbatch_size = -5", "usage.batch_size"),
        ("[usage]\nflush_interval = \"0s\"", "usage.flush_interval"),
        ("[usage]\npool_size = 0", "usage.pool_size"),
        ("[usage]\nspool_dir = \"\"", "usage.spool_dir"),
        ("[usage]\nmax_spool_bytes = \"1KiB\"", "usage.max_spool_bytes"),
        ("[usage]\ntokens_header = \"bad header\"", "usage.tokens_header"),
        ("[usage]\ninject_stream_usage = \"yes\"", "usage.inject_stream_usage"),
        ("[usage]\nfold_interval = \"0s\"", "usage.fold_interval"),
        ("[usage]\nfold_interval = \"999ms\"", "usage.fold_interval"),
        ("[usage]\nfold_interval = \"61m\"", "usage.fold_interval"),
        ("[usage]\nfold_interval = 30", "usage.fold_interval"),
        (
            "[pricing.default]\nprompt_per_1k = -1.0",
            "pricing.default.prompt_per_1k",
        ),
        (
            "[pricing.models.m]\ncompletion_per_1k = nan",
            "pricing.models.m.completion_per_1k",
        ),
        ("[log]\nlevel = \"=[\"", "log.level"),
        ("[admin]\ntoken = \"too-short\"", "admin.token"),
        ("[admin]\ntoken = \"sixteen chars but spaces\"", "admin.token"),
        ("[admin]\ntoken = 42", "admin.token"),
    ];
    for (text, key) in cases {
        let e = err(text);
        assert!(e.starts_with(&format!("config key `{key}`")), "{text:?} gave {e:?}");
    }
    // The TLS rules read files: a real pair made here, and files that are not what is asked.
    let dir = tempfile::tempdir().expect("tmp");
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let (a, b) = (self_signed(), self_signed());
    let (cert, key) = (
        file("c.pem", &a.cert.pem()),
        file("k.pem", &a.signing_key.serialize_pem()),
    );
    let (other_key, junk) = (
        file("o.pem", &b.signing_key.serialize_pem()),
        file("j.pem", "not pem\n"),
    );
    let tls = |c: &str, k: &str| format!("[server.tls]\ncert_path = \"{c}\"\nkey_path = \"{k}\"");
    parse(&tls(&cert, &key)).expect("a matching pair is valid");
    let tls_cases = [
        ("[server.tls]\nkey_path = \"k.pem\"".to_string(), "server.tls.cert_path"),
        (format!("[server.tls]\ncert_path = \"{cert}\""), "server.tls.key_path"),
        (tls("/nonexistent/cert.pem", &key), "server.tls.cert_path"),
        (tls(&junk, &key), "server.tls.cert_path"),
        (tls(&cert, "/nonexistent/key.pem"), "server.tls.key_path"),
        (tls(&cert, &cert), "server.tls.key_path"),
        (tls(&cert, &other_key), "server.tls.key_path"),
    ];
    for (text, key) in &tls_cases {
        let e = err(text);
        assert!(e.starts_with(&format!("config key `{key}`")), "{text:?} gave {e:?}");
    }
}

fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
    rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("test certificate")
}

#[test]
fn database_url_must_parse_and_error_masks_password() {
    let env = |n: &str| (n == "DATABASE_URL").then(|| "postgres://u:hunter2@h:notaport/db".to_string());
    let e = Config::parse_with_env("", Path::new("x"), &env)
        .expect_err("bad url")
        .to_string();
    assert!(e.starts_with("config key `database.url`"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn upstream_base_path_is_normalised() {
    let cfg = parse("[upstream]\nurl = \"https://api.example.com/base/\"").expect("valid");
    assert_eq!(
        cfg.upstream().expect("up").url.to_string(),
        "https://api.example.com/base"
    );
    let cfg = parse("[server]\nadmin_listen = \"\"").expect("valid");
    assert!(cfg.server.admin_listen.is_none());
}

#[test]
fn usage_pricing_and_trusted_proxies() {
    let cfg = parse(
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n[usage]\ntokens_header = \"\"\ninject_stream_usage = false\n\
         [pricing.default]\nprompt_per_1k = 0.001\n[pricing.models.big]\nprompt_per_1k = 0.01\ncompletion_per_1k = 0.03\n",
    )
    .expect("valid");
    assert_eq!(cfg.server.trusted_proxies.len(), 2);
    assert!(cfg.server.trusted_proxies[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().expect("ip")));
    assert!(cfg.usage.tokens_header.is_none());
    assert!(!cfg.usage.inject_stream_usage);
    assert_eq!(cfg.pricing.price(Some("big")).completion_per_1k, 0.03);
    assert_eq!(cfg.pricing.price(Some("other")).prompt_per_1k, 0.001);
    assert_eq!(cfg.pricing.price(None).completion_per_1k, 0.0);
    let d = parse("").expect("defaults");
    assert_eq!(
        d.usage.tokens_header.as_ref().map(|h| h.as_str()),
        Some("x-usage-tokens")
    );
    assert_eq!(d.usage.queue_capacity, 65_536);
    assert!(d.usage.inject_stream_usage, "on unless turned off");
}

#[test]
fn admin_token_is_off_unless_set_and_never_shown() {
    assert!(parse("").expect("defaults").admin.token.is_none());
    assert!(parse("[admin]\ntoken = \"\"").expect("empty").admin.token.is_none());
    let secret = "s3cret-admin-token-0123456789";
    let env = |n: &str| match n {
        "KEYGATE_ADMIN_TOKEN" => Some(secret.to_string()),
        other => env_with_db(other),
    };
    let cfg =
        Config::parse_with_env("[admin]\ntoken = \"${KEYGATE_ADMIN_TOKEN:-}\"", Path::new("x"), &env).expect("valid");
    assert_eq!(cfg.admin.token.as_ref().map(|t| t.expose()), Some(secret));
    assert!(!format!("{cfg:?}").contains(secret), "Debug shows the admin token");
    // A token that is refused is not echoed in the error either.
    let e = err("[admin]\ntoken = \"short-secret\"");
    assert!(!e.contains("short-secret"), "{e}");
}

#[test]
fn the_compose_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/compose.toml");
    let cfg = Config::load_with_env(&path, &env_with_db).expect("compose config is valid");
    assert_eq!(
        cfg.upstream().expect("upstream").url.to_string(),
        "http://upstream:8000/"
    );
    assert_eq!(cfg.server.admin_listen.map(|a| a.port()), Some(9090));
}

/// Found by the config-loader fuzz target: a field-value filter used to compile a regex
/// DFA exponential in its dots, and two of them for one span broke an invariant
/// tracing-subscriber asserts in debug builds. Field filters are refused.
#[test]
fn a_pathological_log_filter_parses_quickly() {
    let started = std::time::Instant::now();
    let dots = ".".repeat(40);
    let e = err(&format!("[log]\nlevel = \"[{{x=a{dots}}}]\""));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(e.contains("log.level") && e.contains("field filters"), "{e}");
    let e = err("[log]\nlevel = \"hyper[c{i=d}]=trace,hyper[c{i=d}]=debug\"");
    assert!(e.contains("field filters"), "{e}");
    // Span filters without fields are fine.
    assert!(parse("[log]\nlevel = \"info,hyper[conn]=debug\"").is_ok());
}

#[test]
fn a_route_prefix_must_be_written_as_requests_are_matched() {
    let e = err("[[routes]]\nprefix = \"/v1/./chat/../%61dmin\"\n");
    assert!(e.contains("is matched as `/v1/admin`"), "{e}");
    let e = err("[[routes]]\nprefix = \"/admin%2Fkeys\"\n");
    assert!(e.contains("escaped separator"), "{e}");
    // Escapes of reserved characters are the normalized form, so they are fine.
    let c = parse("[[routes]]\nprefix = \"/files/a%20b\"\n[[routes]]\nprefix = \"/admin/\"\n").expect("valid");
    assert_eq!(c.routes.len(), 2);
}
