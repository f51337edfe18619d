//! One fold cadence for the cluster (migration 14): replicas claim a fold before they
//! fold the writers' pending counts into `api_keys`, so N replicas fold no more often
//! than one, against a real PostgreSQL and real keygate processes.

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::*;
use keygate::db::key_counters::fold_if_due;
use uuid::Uuid;

const HOUR: Duration = Duration::from_secs(3600);

async fn total_requests(c: &tokio_postgres::Client, key: Uuid) -> i64 {
    c.query_one("SELECT total_requests FROM api_keys WHERE id = $1", &[&key])
        .await
        .expect("key")
        .get(0)
}

async fn bump(c: &tokio_postgres::Client, key: Uuid, n: i64) {
    c.execute(
        "SELECT keygate_bump_key_counters($1, $2, $3)",
        &[&vec![key], &vec![n], &vec![chrono::Utc::now()]],
    )
    .await
    .expect("bump");
}

async fn claim(c: &impl tokio_postgres::GenericClient, interval: &str) -> bool {
    c.query_one(&format!("SELECT keygate_fold_claim(interval '{interval}')"), &[])
        .await
        .expect("claim")
        .get(0)
}

/// A claim within the interval of the last one is refused, whichever replica made it,
/// and leaves the pending counts where they are; of two claims at once, the one that
/// waited on the other's lock loses.
#[tokio::test]
async fn a_fold_is_claimed_once_per_interval_by_any_replica() {
    let (db, _key) = seeded_db().await;
    let (a, b) = (db.client().await, db.client().await);
    let key: Uuid = a
        .query_one("SELECT id FROM api_keys LIMIT 1", &[])
        .await
        .expect("key")
        .get(0);
    let before = total_requests(&a, key).await;
    bump(&a, key, 2).await;
    assert_eq!(fold_if_due(&a, HOUR).await.expect("fold"), Some(1), "nobody folded yet");
    assert_eq!(total_requests(&a, key).await, before + 2);
    bump(&a, key, 3).await;
    assert_eq!(
        fold_if_due(&b, HOUR).await.expect("fold"),
        None,
        "another replica's claim counts"
    );
    assert_eq!(fold_if_due(&a, HOUR).await.expect("fold"), None, "and its own");
    assert_eq!(total_requests(&a, key).await, before + 2, "pending counts wait");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        fold_if_due(&b, Duration::from_millis(10)).await.expect("fold"),
        Some(1),
        "a shorter interval is over"
    );
    assert_eq!(total_requests(&a, key).await, before + 5);

    a.execute("UPDATE keygate_fold_clock SET last_fold_at = '-infinity'", &[])
        .await
        .expect("reset");
    let mut holder = db.client().await;
    let tx = holder.transaction().await.expect("tx");
    assert!(claim(&tx, "1 hour").await, "due");
    let waiting = tokio::spawn(async move { claim(&b, "1 hour").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second claim waits on the first's lock");
    tx.commit().await.expect("commit");
    assert!(!waiting.await.expect("join"), "and loses to it");
}

/// Two keygates on one database, each trying every second, fold about once a second
/// between them, not twice; the counts reach `api_keys` while they serve, and a clean
/// stop of both folds the rest.
#[tokio::test]
async fn two_replicas_fold_no_more_often_than_one() {
    let (db, _key) = seeded_db().await;
    let c = db.client().await;
    // Counts calls of the fold functions in this database's sessions, keygate's too.
    c.batch_execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_functions = ''all''', current_database()); END $$",
    )
    .await
    .expect("track functions");
    let up = Upstream::start(&[]).await;
    let extra = "[usage]\nflush_interval = \"100ms\"\nfold_interval = \"1s\"\n";
    // Folds start with the first keygate, so the bound is over its whole life.
    let first_started = Instant::now();
    let mut one = Gateway::start(&db, up.port, extra).await;
    let mut two = Gateway::start(&db, up.port, extra).await;
    db.ok(&["orgs", "create", "--name", "F", "--slug", "f"]);
    let plaintext = db.ok(&["keys", "create", "--org", "f", "--name", "k", "--rate-limit", "100000"]);
    let auth = bearer(&plaintext);
    let key: Uuid = c
        .query_one("SELECT id FROM api_keys WHERE name = 'k'", &[])
        .await
        .expect("key")
        .get(0);

    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        for gw in [&one, &two] {
            assert_eq!(get(&gw.url("/echo/f"), &[("authorization", &auth)]).await.status, 200);
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let folded_while_serving = eventually(Duration::from_secs(5), async || total_requests(&c, key).await > 0).await;
    assert!(folded_while_serving, "no fold while serving");
    for gw in [&mut one, &mut two] {
        assert!(gw.proc.terminate(Duration::from_secs(20)).is_some_and(|s| s.success()));
    }
    let elapsed = first_started.elapsed().as_secs_f64();
    assert_eq!(total_requests(&c, key).await, sent, "a clean stop folds the rest");

    // Backends report their function counts when they exit, as keygate's have.
    let calls = |name: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions WHERE funcname = $1",
                &[&name],
            )
            .await
            .expect("stats")
            .get::<_, i64>(0)
        }
    };
    let mut folds = 0;
    let mut claims = 0;
    let seen = eventually(Duration::from_secs(10), async || {
        (folds, claims) = (
            calls("keygate_pending_key_ids").await,
            calls("keygate_fold_claim").await,
        );
        claims > 0
    })
    .await;
    assert!(seen, "no function statistics");
    // Each fold lists the pending keys once; each keygate's stop adds one unclaimed fold.
    let periodic = folds - 2;
    let most = (elapsed / 0.9).ceil() as i64 + 1;
    assert!(periodic >= 2, "{periodic} folds in {elapsed:.1}s");
    assert!(
        periodic <= most,
        "{periodic} folds in {elapsed:.1}s from {claims} claims: more than one replica's cadence"
    );
    assert!(
        claims > periodic,
        "both replicas tried: {claims} claims, {periodic} folds"
    );
}
