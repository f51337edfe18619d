//! `keygate usage report` and `keygate usage prune` against rows written with SQL.

mod common;

use common::*;

/// Inserts `n` usage rows spread over days, keys and endpoints, and returns the org id.
async fn populate(db: &TestDb) -> uuid::Uuid {
    let c = db.client().await;
    let org: uuid::Uuid = c
        .query_one("SELECT id FROM organizations WHERE slug = 'default'", &[])
        .await
        .expect("org")
        .get(0);
    c.batch_execute(
        r#"
        INSERT INTO api_keys (organization_id, key_prefix, key_hash, key_hint, name)
        SELECT id, 'pk_test_', repeat('a', 64), 'aaaa', 'second' FROM organizations WHERE slug = 'default';
        INSERT INTO api_key_usage (id, api_key_id, organization_id, "timestamp", endpoint, method, status_code,
                                   response_time_ms, tokens_used, cost_usd)
        SELECT gen_random_uuid(),
               (SELECT id FROM api_keys ORDER BY name LIMIT 1 OFFSET (g % 2)),
               (SELECT id FROM organizations WHERE slug = 'default'),
               date_trunc('month', now()) + make_interval(days => g % 5, secs => g),
               CASE WHEN g % 3 = 0 THEN '/chat' ELSE '/v1/chat/completions' END,
               'POST',
               CASE WHEN g % 10 = 0 THEN 429 WHEN g % 7 = 0 THEN 502 ELSE 200 END,
               10 + g % 50,
               CASE WHEN g % 4 = 0 THEN NULL ELSE g END,
               CASE WHEN g % 4 = 0 THEN NULL ELSE g * 0.000123 END
        FROM generate_series(1, 500) AS g;
        "#,
    )
    .await
    .expect("rows");
    org
}

#[tokio::test]
async fn report_numbers_equal_sql_aggregates() {
    let (db, _key) = seeded_db().await;
    let org = populate(&db).await;
    let c = db.client().await;
    // The rows span the first five days of this month; the default window ends now, which
    // early in a month would leave some of them in the future. Ask for the whole month.
    let (from, to): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = {
        let r = c
            .query_one(
                "SELECT date_trunc('month', now()), date_trunc('month', now()) + interval '1 month'",
                &[],
            )
            .await
            .expect("month");
        (r.get(0), r.get(1))
    };
    let (from, to) = (from.to_rfc3339(), to.to_rfc3339());
    let window = ["--from", from.as_str(), "--to", to.as_str()];
    let report = |args: &[&str]| {
        let mut all = vec!["usage", "report", "--org", "default"];
        all.extend_from_slice(args);
        all.extend_from_slice(&window);
        db.ok(&all)
    };
    for by in ["day", "key", "endpoint"] {
        let json = report(&["--by", by, "--format", "json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
        let total = rows.iter().find(|r| r["group"] == "TOTAL").expect("total row");
        let expect = c
            .query_one(
                r#"SELECT count(*), count(*) FILTER (WHERE status_code >= 400), count(*) FILTER (WHERE status_code = 429),
                          sum(tokens_used)::bigint, sum(cost_usd)::numeric(20,6)::text,
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY response_time_ms),
                          percentile_cont(0.95) WITHIN GROUP (ORDER BY response_time_ms)
                   FROM api_key_usage WHERE organization_id = $1"#,
                &[&org],
            )
            .await
            .expect("aggregate");
        assert_eq!(total["requests"], expect.get::<_, i64>(0));
        assert_eq!(total["errors"], expect.get::<_, i64>(1));
        assert_eq!(total["rate_limited"], expect.get::<_, i64>(2));
        assert_eq!(total["tokens"], expect.get::<_, i64>(3));
        assert_eq!(total["cost_usd"], expect.get::<_, String>(4));
        assert_eq!(total["p50_ms"].as_f64(), Some(expect.get::<_, f64>(5)));
        assert_eq!(total["p95_ms"].as_f64(), Some(expect.get::<_, f64>(6)));
        // The groups add up to the total.
        let sum: i64 = rows
            .iter()
            .filter(|r| r["group"] != "TOTAL")
            .map(|r| r["requests"].as_i64().expect("n"))
            .sum();
        assert_eq!(sum, 500, "{by}");
    }
    let days = report(&["--by", "day", "--format", "json"]);
    let days: Vec<serde_json::Value> = serde_json::from_str(&days).expect("json");
    assert_eq!(days.len(), 6, "5 days and a total");
    let per_endpoint = report(&["--by", "endpoint", "--format", "csv"]);
    let lines: Vec<&str> = per_endpoint.lines().collect();
    assert_eq!(
        lines[0],
        "endpoint,requests,errors,rate-limited,tokens,cost-usd,p50-ms,p95-ms"
    );
    assert!(lines.iter().any(|l| l.starts_with("POST /chat,166,")), "{per_endpoint}");
    let table = report(&["--by", "key"]);
    assert!(
        table.contains("Default Test Key (pk_test_…") && table.contains("TOTAL"),
        "{table}"
    );

    // A window that holds nothing reports a zero total.
    let empty = db.ok(&[
        "usage",
        "report",
        "--org",
        "default",
        "--from",
        "2001-01-01",
        "--to",
        "2001-01-31",
        "--format",
        "json",
    ]);
    let empty: Vec<serde_json::Value> = serde_json::from_str(&empty).expect("json");
    assert_eq!(empty.len(), 1);
    assert_eq!(empty[0]["requests"], 0);
    let bad = db.keygate(&["usage", "report", "--org", "nope"]);
    assert!(!bad.status.success() && stderr(&bad).contains("organization `nope` not found"));
}

#[tokio::test]
async fn prune_drops_old_months_and_keeps_the_rest() {
    let (db, _key) = seeded_db().await;
    populate(&db).await;
    let c = db.client().await;
    // Two old months, as if the table had been in use for a while.
    c.batch_execute(
        r#"SELECT keygate_usage_partition(date_trunc('month', now()) - interval '2 months');
           SELECT keygate_usage_partition(date_trunc('month', now()) - interval '1 month');
           INSERT INTO api_key_usage (api_key_id, organization_id, "timestamp", endpoint, method, status_code)
           SELECT k.id, k.organization_id, date_trunc('month', now()) - interval '2 months' + make_interval(hours => g), '/old', 'GET', 200
           FROM api_keys k, generate_series(1, 30) g WHERE k.name = 'second';
           INSERT INTO api_key_usage (api_key_id, organization_id, "timestamp", endpoint, method, status_code)
           SELECT k.id, k.organization_id, date_trunc('month', now()) - interval '1 month' + make_interval(days => g), '/old', 'GET', 200
           FROM api_keys k, generate_series(0, 19) g WHERE k.name = 'second';"#,
    )
    .await
    .expect("old rows");
    let cutoff: chrono::DateTime<chrono::Utc> = c
        .query_one(
            "SELECT date_trunc('month', now()) - interval '1 month' + interval '10 days'",
            &[],
        )
        .await
        .expect("cutoff")
        .get(0);
    let cutoff = cutoff.to_rfc3339();
    let dry = db.keygate(&["usage", "prune", "--before", &cutoff, "--dry-run"]);
    assert!(stderr(&dry).contains("would remove 40 rows"), "{}", stderr(&dry));
    let count = async || -> i64 {
        c.query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .expect("q")
            .get(0)
    };
    assert_eq!(count().await, 550);
    let out = db.keygate(&["usage", "prune", "--before", &cutoff]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("removed 40 rows"), "{}", stderr(&out));
    assert_eq!(count().await, 510);
    let old_partitions: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_class ch ON ch.oid = i.inhrelid
             WHERE p.relname = 'api_key_usage' AND ch.relname = 'api_key_usage_y' || to_char(date_trunc('month', now()) - interval '2 months', 'YYYY\"m\"MM')",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(old_partitions, 0, "the fully covered month should be dropped");
}

#[tokio::test]
async fn maintenance_prunes_old_windows_and_makes_partitions_ahead() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    c.batch_execute(
        r#"INSERT INTO rate_limit_tracking (api_key_id, window_start, window_end, request_count)
           SELECT k.id, now() - make_interval(mins => g), now() - make_interval(mins => g - 1), 1
           FROM api_keys k, generate_series(1, 3000) g"#,
    )
    .await
    .expect("windows");
    let pool = keygate::db::pool(&db.database_config(), 2).expect("pool");
    keygate::maintenance::once(&pool, std::time::Duration::from_secs(3600))
        .await
        .expect("maintenance");
    let left: i64 = c
        .query_one("SELECT count(*) FROM rate_limit_tracking", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(left, 60, "windows ending within the last hour stay");
    let ahead: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'api_key_usage_y' || to_char(now() + interval '2 months', 'YYYY\"m\"MM')",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(ahead, 1);
}
