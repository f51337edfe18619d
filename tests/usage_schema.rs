//! The usage table's schema guarantees that live below the parent table: reference
//! checks on every month partition (migration 11), the writer's counter update in key
//! order (migration 12) and its pending counts folded into `api_keys` exactly once
//! (migration 13), by folds that take keys in the writers' order (migration 15), against
//! a real PostgreSQL.

mod common;

use common::*;
use uuid::Uuid;

/// The SQLSTATE of a refused statement.
fn sqlstate(r: Result<u64, tokio_postgres::Error>) -> Option<String> {
    r.err().and_then(|e| e.code().map(|c| c.code().to_string()))
}

async fn seeded_key(c: &tokio_postgres::Client) -> (Uuid, Uuid) {
    let r = c
        .query_one("SELECT id, organization_id FROM api_keys LIMIT 1", &[])
        .await
        .expect("key");
    (r.get(0), r.get(1))
}

/// `n` more keys in `org`; their ids.
async fn add_keys(c: &tokio_postgres::Client, org: Uuid, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    c.execute(
        "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name) \
         SELECT id, $2, 'pk_test_', encode(sha256(id::text::bytea), 'hex'), 'abcd', 'k' FROM unnest($1::uuid[]) AS id",
        &[&ids, &org],
    )
    .await
    .expect("keys");
    ids
}

/// Partition-level reference triggers, by table.
async fn partition_checks(c: &tokio_postgres::Client) -> Vec<(String, i64)> {
    c.query(
        "SELECT i.inhrelid::regclass::text, \
                (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = i.inhrelid \
                   AND t.tgname LIKE 'kg_api_key_usage_part_references_%') \
         FROM pg_inherits i WHERE i.inhparent = 'api_key_usage'::regclass ORDER BY 1",
        &[],
    )
    .await
    .expect("partitions")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// What the parent refuses, each partition refuses too when a statement names it
/// directly: an existing month, the default partition, one made later by
/// `keygate_usage_partition`, and one attached by hand and given the checks.
#[tokio::test]
async fn partitions_check_references_like_the_parent() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, org) = seeded_key(&c).await;
    let nobody = Uuid::now_v7();
    let current: String = c
        .query_one("SELECT keygate_usage_partition(now())", &[])
        .await
        .expect("current partition")
        .get(0);
    let later: String = c
        .query_one("SELECT keygate_usage_partition('2031-05-17T00:00:00Z')", &[])
        .await
        .expect("a partition made after the migration")
        .get(0);
    c.batch_execute(
        "CREATE TABLE usage_by_hand (LIKE api_key_usage INCLUDING DEFAULTS);
         ALTER TABLE api_key_usage ATTACH PARTITION usage_by_hand
             FOR VALUES FROM ('2032-01-01T00:00:00Z') TO ('2032-02-01T00:00:00Z');
         SELECT keygate_usage_partition_checks('usage_by_hand');",
    )
    .await
    .expect("a partition attached by hand");

    let cases = [
        (current.as_str(), "now()"),
        ("api_key_usage_default", "'1990-06-01T00:00:00Z'"),
        (later.as_str(), "'2031-05-20T00:00:00Z'"),
        ("usage_by_hand", "'2032-01-09T00:00:00Z'"),
    ];
    for (table, at) in cases {
        let insert = format!(
            "INSERT INTO {table} (api_key_id, organization_id, \"timestamp\", endpoint, method, status_code) \
             VALUES ($1, $2, {at}, '/chat', 'POST', 200)"
        );
        assert_eq!(
            sqlstate(c.execute(insert.as_str(), &[&nobody, &org]).await).as_deref(),
            Some("23503"),
            "{table}: a key that does not exist"
        );
        assert_eq!(
            sqlstate(c.execute(insert.as_str(), &[&key, &nobody]).await).as_deref(),
            Some("23503"),
            "{table}: an organisation that does not exist"
        );
        assert_eq!(c.execute(insert.as_str(), &[&key, &org]).await.expect("a valid row"), 1);
        let repoint = format!("UPDATE {table} SET api_key_id = $1");
        assert_eq!(
            sqlstate(c.execute(repoint.as_str(), &[&nobody]).await).as_deref(),
            Some("23503"),
            "{table}: repointing a row"
        );
    }
    let stored: i64 = c
        .query_one("SELECT count(*) FROM api_key_usage", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 4, "only the valid rows");
    // Every partition, including the two made after the migration, carries both checks.
    for (table, n) in partition_checks(&c).await {
        assert_eq!(n, 2, "{table}");
    }
}

/// `migrate down` to 10 takes the partitions' checks and the counter function away and
/// puts 0005's partition function back; `migrate up` restores both.
#[tokio::test]
async fn migrations_11_and_12_roll_back_and_forth() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, org) = seeded_key(&c).await;
    let steps = (keygate::db::migrate::latest_version() - 10).to_string();
    let out = db.keygate(&["migrate", "down", "--steps", &steps]);
    assert!(out.status.success(), "{}", stderr(&out));
    let checks = partition_checks(&c).await;
    assert!(!checks.is_empty());
    assert!(checks.iter().all(|(_, n)| *n == 0), "{checks:?}");
    let bump: Option<String> = c
        .query_one("SELECT to_regproc('keygate_bump_key_counters')::text", &[])
        .await
        .expect("regproc")
        .get(0);
    assert_eq!(bump, None);
    let src: String = c
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE proname = 'keygate_usage_partition'",
            &[],
        )
        .await
        .expect("function")
        .get(0);
    assert!(!src.contains("keygate_usage_partition_checks"), "{src}");
    // At 10 a direct write into a partition is not checked: what migration 11 closes.
    let part: String = c
        .query_one("SELECT keygate_usage_partition(now())", &[])
        .await
        .expect("partition")
        .get(0);
    let insert = format!(
        "INSERT INTO {part} (api_key_id, organization_id, endpoint, method, status_code) \
         VALUES ($1, $2, '/chat', 'POST', 200)"
    );
    let nobody = Uuid::now_v7();
    assert_eq!(
        c.execute(insert.as_str(), &[&nobody, &org])
            .await
            .expect("unchecked at 10"),
        1
    );
    c.execute("DELETE FROM api_key_usage WHERE api_key_id = $1", &[&nobody])
        .await
        .expect("cleanup");

    db.migrate();
    let checks = partition_checks(&c).await;
    assert!(checks.iter().all(|(_, n)| *n == 2), "{checks:?}");
    assert_eq!(
        sqlstate(c.execute(insert.as_str(), &[&nobody, &org]).await).as_deref(),
        Some("23503")
    );
    c.execute(insert.as_str(), &[&key, &org]).await.expect("a valid row");
    c.execute(
        "SELECT keygate_bump_key_counters($1, $2, $3)",
        &[&vec![key], &vec![5i64], &vec![chrono::Utc::now()]],
    )
    .await
    .expect("the counter function is back");
}

/// Writers that bump the same keys at once, each in its own order and each holding its
/// locks until it commits, never deadlock (the function locks in id order), and every
/// count lands: after a fold, `total_requests` is the sum, `last_used_at` the latest.
#[tokio::test]
async fn counter_bumps_in_any_order_never_deadlock() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (_, org) = seeded_key(&c).await;
    let ids = add_keys(&c, org, 300).await;
    const WRITERS: usize = 4;
    const ROUNDS: usize = 12;
    let base = chrono::Utc::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client = db.client().await;
        let mut ids = ids.clone();
        tasks.spawn(async move {
            for round in 0..ROUNDS {
                // A different order on every writer and round: reversed, rotated, interleaved.
                ids.rotate_left(37 * (w + 1) + round);
                if (w + round) % 2 == 1 {
                    ids.reverse();
                }
                let counts = vec![1i64; ids.len()];
                let at = base + chrono::Duration::milliseconds((w * ROUNDS + round) as i64);
                let last = vec![at; ids.len()];
                let tx = client.transaction().await?;
                tx.execute("SELECT keygate_bump_key_counters($1, $2, $3)", &[&ids, &counts, &last])
                    .await?;
                // Holding the locks a little widens the window in which two writers
                // that locked in different orders would each wait for the other.
                tx.execute("SELECT pg_sleep(0.005)", &[]).await?;
                tx.commit().await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        let result = done.expect("writer task");
        assert!(
            result.is_ok(),
            "a writer failed (40P01 is a deadlock): {:?}",
            result.err().and_then(|e| e.code().cloned())
        );
    }
    assert_eq!(fold_counters(&c).await, ids.len() as u64);
    let rows = c
        .query(
            "SELECT total_requests, last_used_at FROM api_keys WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("counters");
    assert_eq!(rows.len(), ids.len());
    let latest = base + chrono::Duration::milliseconds((WRITERS * ROUNDS - 1) as i64);
    for r in rows {
        assert_eq!(r.get::<_, i64>(0), (WRITERS * ROUNDS) as i64);
        let last: chrono::DateTime<chrono::Utc> = r.get(1);
        assert_eq!(last.timestamp_micros(), latest.timestamp_micros());
    }
}

async fn key_counts(c: &tokio_postgres::Client, key: Uuid) -> (i64, Option<chrono::DateTime<chrono::Utc>>) {
    let r = c
        .query_one(
            "SELECT total_requests, last_used_at FROM api_keys WHERE id = $1",
            &[&key],
        )
        .await
        .expect("key");
    (r.get(0), r.get(1))
}

async fn bump(c: &impl tokio_postgres::GenericClient, key: Uuid, n: i64, at: chrono::DateTime<chrono::Utc>) {
    c.execute(
        "SELECT keygate_bump_key_counters($1, $2, $3)",
        &[&vec![key], &vec![n], &vec![at]],
    )
    .await
    .expect("bump");
}

/// A bump waits in `keygate_key_counters` until a fold moves it into `api_keys`, once:
/// keygate's own reads add it in meanwhile, a fold skips (without waiting for) a count
/// whose writer has not committed, and a second fold finds nothing.
#[tokio::test]
async fn pending_counts_fold_exactly_once_without_waiting_for_writers() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, org) = seeded_key(&c).await;
    let other: Uuid = c
        .query_one(
            "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name) \
             VALUES ($1, $2, 'pk_test_', repeat('c', 64), 'cccc', 'other') RETURNING id",
            &[&Uuid::now_v7(), &org],
        )
        .await
        .expect("second key")
        .get(0);
    let (before, _) = key_counts(&c, key).await;
    let at = chrono::Utc::now() - chrono::Duration::seconds(5);
    bump(&c, key, 3, at).await;
    bump(&c, key, 4, at - chrono::Duration::seconds(1)).await;
    assert_eq!(key_counts(&c, key).await, (before, None), "api_keys waits for the fold");
    let listed = keygate::db::keys::get(&c, key).await.expect("get");
    assert_eq!(listed.total_requests, before + 7, "reads include what is pending");
    assert_eq!(
        listed.last_used_at.map(|t| t.timestamp_micros()),
        Some(at.timestamp_micros())
    );

    // A writer that has bumped `other` and not committed holds that counter's row,
    // which already has a committed count.
    bump(&c, other, 1, at).await;
    let mut w = db.client().await;
    let tx = w.transaction().await.expect("tx");
    bump(&tx, other, 5, at).await;
    let folded = tokio::time::timeout(std::time::Duration::from_secs(10), fold_counters(&c))
        .await
        .expect("a fold never waits for a writer");
    assert_eq!(folded, 1, "only the committed key");
    let (total, last) = key_counts(&c, key).await;
    assert_eq!(total, before + 7);
    assert_eq!(last.map(|t| t.timestamp_micros()), Some(at.timestamp_micros()));
    assert_eq!(key_counts(&c, other).await.0, 0);
    tx.commit().await.expect("commit");
    assert_eq!(fold_counters(&c).await, 1);
    assert_eq!(key_counts(&c, other).await.0, 6);
    assert_eq!(fold_counters(&c).await, 0, "nothing left to fold");
    assert_eq!(key_counts(&c, key).await.0, before + 7, "folded once");
}

/// `migrate down` to migration 12 folds what is pending into `api_keys` and gives the
/// writer's function back its migration-12 body and settings.
#[tokio::test]
async fn migration_13_rolls_back_with_nothing_lost() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (key, _) = seeded_key(&c).await;
    let (before, _) = key_counts(&c, key).await;
    bump(&c, key, 11, chrono::Utc::now()).await;
    let steps = (keygate::db::migrate::latest_version() - 12).to_string();
    let out = db.keygate(&["migrate", "down", "--steps", &steps]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(key_counts(&c, key).await.0, before + 11);
    let config: Option<Vec<String>> = c
        .query_one(
            "SELECT proconfig::text[] FROM pg_proc WHERE proname = 'keygate_bump_key_counters'",
            &[],
        )
        .await
        .expect("function")
        .get(0);
    assert!(config.is_some_and(|c| c.iter().any(|s| s == "enable_seqscan=off")));
    bump(&c, key, 1, chrono::Utc::now()).await;
    assert_eq!(
        key_counts(&c, key).await.0,
        before + 12,
        "12's function updates api_keys"
    );
    db.migrate();
    bump(&c, key, 2, chrono::Utc::now()).await;
    assert_eq!(fold_counters(&c).await, 1);
    assert_eq!(key_counts(&c, key).await.0, before + 14);
}

/// keygate's real write paths (first attempts and retries, four batches in flight)
/// over many keys, with folds running all the while as several replicas' would: when
/// the writers are done and a last fold has run, every key's `total_requests` is
/// exactly its number of rows, and nothing is pending.
#[tokio::test]
async fn writers_and_folds_at_once_count_every_row_once() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::Arc;
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (_, org) = seeded_key(&c).await;
    let keys = add_keys(&c, org, 200).await;
    let pool = keygate::db::pool(&db.database_config(), 6).expect("pool");
    let writing = Arc::new(AtomicBool::new(true));
    let mut folders = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (pool, writing) = (pool.clone(), writing.clone());
        folders.spawn(async move {
            let mut folded = 0;
            while writing.load(SeqCst) {
                let client = pool.get().await.expect("client");
                folded += keygate::db::key_counters::fold(&**client).await.expect("fold");
            }
            folded
        });
    }
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4usize {
        let (pool, keys) = (pool.clone(), keys.clone());
        writers.spawn(async move {
            for round in 0..10usize {
                // Every key, in a different order each time, a few rows each.
                let mut rows = Vec::new();
                for (i, &k) in keys.iter().enumerate() {
                    for _ in 0..1 + (i + w + round) % 3 {
                        rows.push(usage_row(k, org));
                    }
                }
                let n = rows.len();
                rows.rotate_left((w * 53 + round * 17) % n);
                let limit = std::time::Duration::from_secs(30);
                let out = if (w + round) % 3 == 0 {
                    keygate::db::usage::write_batch(&pool, &rows, limit).await
                } else {
                    keygate::db::usage::write_fresh_batch(&pool, &rows, limit).await
                };
                assert_eq!(out.expect("batch").inserted, rows.len() as u64);
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    writing.store(false, SeqCst);
    let mut folded = 0;
    while let Some(done) = folders.join_next().await {
        folded += done.expect("folder");
    }
    assert!(folded > 0, "the folds ran while the writers did");
    fold_counters(&c).await;
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM api_keys k WHERE k.id = ANY($1) \
               AND k.total_requests <> (SELECT count(*) FROM api_key_usage u WHERE u.api_key_id = k.id)",
            &[&keys],
        )
        .await
        .expect("compare")
        .get(0);
    assert_eq!(wrong, 0, "keys whose total_requests is not their row count");
    let pending: i64 = c
        .query_one(
            "SELECT coalesce(sum(pending_requests), 0)::int8 FROM keygate_key_counters",
            &[],
        )
        .await
        .expect("pending")
        .get(0);
    assert_eq!(pending, 0);
}

/// Counter rows laid out against id order: each key's row has one pending request, and
/// the table holds them from the highest id down.
async fn counters_against_id_order(c: &tokio_postgres::Client, org: Uuid, n: usize) -> Vec<Uuid> {
    let mut keys = add_keys(c, org, n).await;
    keys.sort();
    c.execute(
        "INSERT INTO keygate_key_counters (api_key_id, pending_requests) \
         SELECT id, 1 FROM unnest($1::uuid[]) AS id ORDER BY id DESC",
        &[&keys],
    )
    .await
    .expect("counter rows");
    keys
}

/// A fold locks and writes keys in id order, as writers do (migration 15), whatever
/// order the table holds them in or the list names them in, and still passes over a
/// key a writer holds. The one-argument form, which replicas not yet upgraded call,
/// folds the lowest pending ids.
#[tokio::test]
async fn folds_take_keys_in_id_order() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (_, org) = seeded_key(&c).await;
    let keys = counters_against_id_order(&c, org, 16).await;
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>();
    let pending = async || {
        ids(c
            .query(
                "SELECT api_key_id FROM keygate_key_counters WHERE pending_requests > 0 ORDER BY api_key_id",
                &[],
            )
            .await
            .expect("pending"))
    };
    let fold_list = |list: Vec<Uuid>| {
        let c = &c;
        async move {
            let n: i64 = c
                .query_one("SELECT keygate_fold_key_counters($1::uuid[])", &[&list])
                .await
                .expect("fold")
                .get(0);
            n
        }
    };
    let old_form: i64 = c
        .query_one("SELECT keygate_fold_key_counters(2)", &[])
        .await
        .expect("one-argument fold")
        .get(0);
    assert_eq!(old_form, 2);
    assert_eq!(pending().await, keys[2..], "the two lowest ids went first");

    // Named out of order, with a key that has nothing pending.
    assert_eq!(fold_list(vec![keys[9], keys[3], keys[0], keys[5]]).await, 3);
    let left: Vec<Uuid> = keys[2..]
        .iter()
        .copied()
        .filter(|k| ![keys[3], keys[5], keys[9]].contains(k))
        .collect();
    assert_eq!(pending().await, left);
    // Each new row version takes the page's next free slot, so the order of the
    // versions is the order the fold wrote (and locked) the rows in.
    let written = ids(c
        .query(
            "SELECT api_key_id FROM keygate_key_counters WHERE api_key_id = ANY($1) ORDER BY ctid",
            &[&vec![keys[3], keys[5], keys[9]]],
        )
        .await
        .expect("versions"));
    assert_eq!(written, [keys[3], keys[5], keys[9]], "written in id order");

    // A writer holds a key: the fold passes over it to the others.
    let mut w = db.client().await;
    let tx = w.transaction().await.expect("tx");
    bump(&tx, keys[4], 1, chrono::Utc::now()).await;
    let folded = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        fold_list(vec![keys[4], keys[6], keys[7]]),
    )
    .await
    .expect("a fold passes over a held key");
    assert_eq!(folded, 2);
    assert!(pending().await.contains(&keys[4]));
    tx.commit().await.expect("commit");
    let rest = pending().await.len() as u64;
    assert_eq!(fold_counters(&c).await, rest, "the rest, the key that was held too");
    assert!(pending().await.is_empty(), "nothing left");
}

/// A fold of more keys than one batch (`FOLD_BATCH`) goes on from batch to batch and
/// folds every key's count exactly once.
#[tokio::test]
async fn a_fold_larger_than_a_batch_counts_every_key_once() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (_, org) = seeded_key(&c).await;
    let batch = keygate::db::key_counters::FOLD_BATCH;
    let keys = add_keys(&c, org, 2 * batch + 7).await;
    let counts: Vec<i64> = (0..keys.len() as i64).map(|i| 1 + i % 5).collect();
    let at = vec![chrono::Utc::now(); keys.len()];
    c.execute("SELECT keygate_bump_key_counters($1, $2, $3)", &[&keys, &counts, &at])
        .await
        .expect("bump");
    assert_eq!(fold_counters(&c).await, keys.len() as u64);
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM api_keys k JOIN unnest($1::uuid[], $2::int8[]) AS e(id, n) ON e.id = k.id \
             WHERE k.total_requests <> e.n",
            &[&keys, &counts],
        )
        .await
        .expect("totals")
        .get(0);
    assert_eq!(wrong, 0, "keys whose total is not their count");
    assert_eq!(fold_counters(&c).await, 0, "nothing left to fold");
}

/// Writers and folds hammering the same few keys, the table's rows laid out against id
/// order: no statement deadlocks, and every committed bump is counted once. Before
/// migration 15 a fold took rows in the table's order, and PostgreSQL's locking of a
/// row's newer versions (which waits even under SKIP LOCKED) let it wait for a writer
/// that was waiting for it; this run failed about one time in three.
#[tokio::test]
async fn folds_beside_writers_on_hot_keys_never_deadlock() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
    use std::sync::Arc;
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    let (_, org) = seeded_key(&c).await;
    let keys = counters_against_id_order(&c, org, 64).await;
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicI64::new(0));
    let mut folders = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, stop) = (db.client().await, stop.clone());
        folders.spawn(async move {
            let mut runs = 0u64;
            while !stop.load(SeqCst) {
                keygate::db::key_counters::fold(&client).await?;
                runs += 1;
            }
            Ok::<_, keygate::db::DbError>(runs)
        });
    }
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (mut client, stop, keys, commits) = (db.client().await, stop.clone(), keys.clone(), commits.clone());
        writers.spawn(async move {
            let counts = vec![1i64; keys.len()];
            let last = vec![chrono::Utc::now(); keys.len()];
            while !stop.load(SeqCst) {
                let tx = client.transaction().await?;
                tx.execute("SELECT keygate_bump_key_counters($1, $2, $3)", &[&keys, &counts, &last])
                    .await?;
                tx.commit().await?;
                commits.fetch_add(1, SeqCst);
            }
            Ok::<_, tokio_postgres::Error>(())
        });
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.store(true, SeqCst);
    while let Some(done) = writers.join_next().await {
        let result = done.expect("writer task");
        assert!(result.is_ok(), "a writer failed (40P01 is a deadlock): {result:?}");
    }
    let mut folds = 0;
    while let Some(done) = folders.join_next().await {
        folds += done.expect("fold task").expect("a fold failed (40P01 is a deadlock)");
    }
    assert!(folds > 0 && commits.load(SeqCst) > 0, "both sides ran");
    fold_counters(&c).await;
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM api_keys WHERE id = ANY($1) AND total_requests <> $2",
            &[&keys, &(commits.load(SeqCst) + 1)],
        )
        .await
        .expect("totals")
        .get(0);
    assert_eq!(
        wrong, 0,
        "keys whose total is not one per committed bump, plus the first"
    );
}
