//! The authentication cache against a real PostgreSQL: TTLs and negative answers, single
//! flight and the lookup cap, no resurrection of invalidated rows, invalidation across
//! replicas through LISTEN/NOTIFY (including a lost listener), preload, and store
//! failure with serve-stale.
//!
//! Owns these behaviours' tests only; the harness is `common`. Where a test must hold a
//! load in flight it does so with the database itself (`LOCK TABLE`) or, for the one
//! instant Postgres cannot freeze (between reading a row and caching it), with the
//! authenticator's real on-load hook.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use keygate::auth::{AuthError, Authenticator, BreakerState};
use keygate::config::{AuthConfig, KeySource};
use keygate::db::keys::KeySpec;
use keygate::keys::{Environment, KeyDigest};
use keygate::model::KeyStatus;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);

fn cfg(ttl: Duration, negative_ttl: Duration, max_lookups: usize) -> AuthConfig {
    AuthConfig {
        key_sources: vec![KeySource::Bearer],
        cache_ttl: ttl,
        negative_cache_ttl: negative_ttl,
        max_concurrent_lookups: max_lookups,
        preload: false,
        listen_notify: true,
        fail_open: false,
        failed_auth_per_minute: 0,
        max_unknown_lookups_per_second: 0,
        lookup_timeout: Duration::from_secs(2),
        serve_stale_for: Duration::from_secs(3600),
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(2),
    }
}

fn default_cfg() -> AuthConfig {
    cfg(Duration::from_secs(60), Duration::from_secs(5), 16)
}

fn random_digest() -> KeyDigest {
    KeyDigest::of(&Uuid::new_v4().to_string())
}

struct Fixture {
    db: TestDb,
    client: Client,
    digest: KeyDigest,
    key_id: Uuid,
    org_id: Uuid,
}

async fn fixture() -> Fixture {
    let (db, key) = seeded_db().await;
    let client = db.client().await;
    let digest = KeyDigest::of(&key);
    let row = client
        .query_one(
            "SELECT id, organization_id FROM api_keys WHERE key_hash = $1",
            &[&digest.to_hex()],
        )
        .await
        .expect("seeded key");
    Fixture {
        db,
        client,
        digest,
        key_id: row.get(0),
        org_id: row.get(1),
    }
}

impl Fixture {
    fn authenticator(&self, cfg: &AuthConfig) -> Arc<Authenticator> {
        let pool = keygate::db::pool(&self.db.database_config(), 8).expect("pool");
        Arc::new(Authenticator::new(cfg, pool))
    }

    async fn new_key(&self, name: &str) -> (Uuid, KeyDigest) {
        let spec = KeySpec {
            name: name.into(),
            description: None,
            environment: Environment::Test,
            scopes: vec![],
            custom_rate_limit: None,
            expires_at: None,
        };
        let (key, new) = keygate::db::keys::insert_unchecked(&self.client, self.org_id, &spec)
            .await
            .expect("insert key");
        (key.id, new.digest)
    }

    async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Lets connections to this database in or keeps them out. Run from the maintenance
    /// database: Postgres refuses to change this for the database one is connected to.
    async fn allow_connections(&self, allow: bool) {
        let maintenance = match self.db.url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/postgres"),
            None => panic!("unexpected test database url"),
        };
        let sql = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}", self.db.name);
        connect(&maintenance)
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    async fn revoke(&self, key_id: Uuid) {
        self.client
            .execute(
                "UPDATE api_keys SET revoked_at = now(), is_active = false WHERE id = $1",
                &[&key_id],
            )
            .await
            .expect("revoke");
    }

    /// Runs `run_sync` and waits until its LISTEN session is up.
    async fn start_sync(&self, auth: &Arc<Authenticator>) -> CancellationToken {
        let cancel = CancellationToken::new();
        tokio::spawn(auth.clone().run_sync(self.db.database_config(), cancel.clone()));
        assert!(
            eventually(DEADLINE, async || auth.stats().listener_connected).await,
            "listener never connected"
        );
        cancel
    }

    /// Backends of this database stuck waiting on a lock.
    async fn lock_waiters(&self) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }
}

async fn status(auth: &Authenticator, digest: &KeyDigest) -> Option<KeyStatus> {
    auth.authenticate(digest).await.ok().map(|r| r.status(Utc::now()))
}

#[tokio::test]
async fn hits_skip_the_database_and_unknown_keys_are_cached_negatively() {
    let f = fixture().await;
    let auth = f.authenticator(&cfg(Duration::from_secs(60), Duration::from_millis(300), 16));

    let rec = auth.authenticate(&f.digest).await.expect("seeded key");
    assert_eq!(rec.key_id, f.key_id);
    let again = auth.authenticate(&f.digest).await.expect("cached");
    assert_eq!(
        format!("{rec:?}"),
        format!("{again:?}"),
        "a hit hands out the cached record"
    );
    assert_eq!(auth.stats().db_lookups, 1);

    let unknown = random_digest();
    assert_eq!(auth.authenticate(&unknown).await.err(), Some(AuthError::Unknown));
    assert_eq!(auth.authenticate(&unknown).await.err(), Some(AuthError::Unknown));
    let s = auth.stats();
    assert_eq!((s.db_lookups, s.cached, s.negative), (2, 1, 1));
    assert_eq!((s.hits, s.misses), (2, 2));

    // The negative answer expires after its own, shorter TTL.
    assert!(
        eventually(DEADLINE, async || {
            let _ = auth.authenticate(&unknown).await;
            auth.stats().db_lookups == 3
        })
        .await,
        "negative entry never expired"
    );
    assert_eq!(auth.stats().db_lookups, 3, "the positive entry must still be cached");
}

#[tokio::test]
async fn positive_entries_expire_and_expiry_is_judged_at_use_time() {
    let f = fixture().await;
    let auth = f.authenticator(&cfg(Duration::from_millis(300), Duration::from_secs(5), 16));
    auth.authenticate(&f.digest).await.expect("key");
    assert!(
        eventually(DEADLINE, async || {
            let _ = auth.authenticate(&f.digest).await;
            auth.stats().db_lookups == 2
        })
        .await,
        "positive entry never expired"
    );

    // A long TTL and an expiry in the near future: the cached row is not reloaded, yet
    // its status turns Expired on time, because status is computed at use.
    let auth = f.authenticator(&default_cfg());
    f.exec(&format!(
        "UPDATE api_keys SET expires_at = now() + interval '700 milliseconds' WHERE id = '{}'",
        f.key_id
    ))
    .await;
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Active));
    assert!(
        eventually(DEADLINE, async || status(&auth, &f.digest).await
            == Some(KeyStatus::Expired))
        .await
    );
    assert_eq!(auth.stats().db_lookups, 1, "the expiry was seen without a reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_for_one_uncached_digest_makes_one_query() {
    let f = fixture().await;
    let auth = f.authenticator(&default_cfg());
    let locker = f.db.client().await;
    // An unknown digest, then the real key: each burst must share one load.
    for (round, digest, want) in [
        (1, random_digest(), Err(AuthError::Unknown)),
        (2, f.digest, Ok(f.key_id)),
    ] {
        // Hold the lookup at the table lock so all 100 callers arrive while the first
        // load is still in flight; without single flight each would query.
        locker
            .batch_execute("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock");
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.authenticate(&digest).await.map(|r| r.key_id) })
            })
            .collect();
        assert!(
            eventually(DEADLINE, async || auth.stats().misses == 100 * round).await,
            "callers never all missed"
        );
        assert!(
            eventually(DEADLINE, async || f.lock_waiters().await == 1).await,
            "expected one waiting query"
        );
        locker.batch_execute("COMMIT").await.expect("unlock");
        for t in tasks {
            assert_eq!(t.await.expect("task"), want);
        }
        assert_eq!(
            auth.stats().db_lookups,
            round,
            "100 concurrent callers made more than one query"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_across_digests_are_capped() {
    let f = fixture().await;
    let auth = f.authenticator(&cfg(Duration::from_secs(60), Duration::from_secs(5), 2));
    let locker = f.db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(&random_digest()).await.err() })
        })
        .collect();
    assert!(
        eventually(DEADLINE, async || auth.stats().misses == 10
            && f.lock_waiters().await == 2)
        .await,
        "two lookups should be waiting on the lock"
    );
    // The pool has 8 connections; only the cap keeps the other 8 flights out. Give them
    // a window in which they would have reached the database.
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(300) {
        assert_eq!(
            auth.stats().db_lookups,
            2,
            "more than max_concurrent_lookups queries in flight"
        );
        assert!(f.lock_waiters().await <= 2);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    locker.batch_execute("COMMIT").await.expect("unlock");
    for t in tasks {
        assert_eq!(t.await.expect("task"), Some(AuthError::Unknown));
    }
    assert_eq!(auth.stats().db_lookups, 10);
}

/// Counts index and sequential scans of `api_keys`: every lookup scans it exactly once.
async fn api_keys_scans(c: &Client) -> i64 {
    c.query_one(
        "SELECT seq_scan + COALESCE(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'api_keys'",
        &[],
    )
    .await
    .expect("pg_stat_user_tables")
    .get(0)
}

async fn other_backends(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lookup_counter_matches_what_postgres_saw() {
    let Fixture {
        db,
        client,
        digest: key,
        ..
    } = fixture().await;
    // Backends flush their statistics when they exit: end every session that touched
    // api_keys (the CLI's, the fixture's) and count from a fresh one that never does.
    drop(client);
    let stats = db.client().await;
    assert!(eventually(DEADLINE, async || other_backends(&stats).await == 0).await);
    assert!(eventually(DEADLINE, async || api_keys_scans(&stats).await > 0).await);
    let before = api_keys_scans(&stats).await;

    let pool = keygate::db::pool(&db.database_config(), 8).expect("pool");
    let auth = Arc::new(Authenticator::new(&default_cfg(), pool.clone()));
    let digests: Vec<KeyDigest> = (0..5).map(|_| random_digest()).chain([key]).collect();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let (auth, d) = (auth.clone(), digests[i % digests.len()]);
            tokio::spawn(async move { auth.authenticate(&d).await.is_ok() })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let counted = auth.stats().db_lookups;
    assert!(
        (6..300).contains(&counted),
        "single flight and caching should bound lookups, got {counted}"
    );
    pool.close();
    drop(auth);
    assert!(
        eventually(DEADLINE, async || other_backends(&stats).await == 0).await,
        "pool backends linger"
    );
    assert!(
        eventually(DEADLINE, async || api_keys_scans(&stats).await - before
            >= counted as i64)
        .await,
        "postgres saw fewer lookups than counted"
    );
    assert_eq!(api_keys_scans(&stats).await - before, counted as i64);
}

/// Loads `digest` with the on-load hook holding the load between reading its row and
/// caching it, runs `meanwhile`, then lets the load finish.
async fn race_a_load(auth: &Arc<Authenticator>, digest: KeyDigest, meanwhile: impl AsyncFnOnce()) {
    let (loaded_tx, loaded_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let armed = AtomicBool::new(true);
    assert!(auth.set_on_load(Box::new(move |_, _| {
        if armed.swap(false, Ordering::SeqCst) {
            let _ = loaded_tx.send(());
            let _ = go_rx.lock().expect("go").recv_timeout(DEADLINE);
        }
    })));
    let task = tokio::spawn({
        let auth = auth.clone();
        async move { auth.authenticate(&digest).await }
    });
    tokio::task::spawn_blocking(move || loaded_rx.recv_timeout(DEADLINE))
        .await
        .expect("join")
        .expect("load read its row");
    meanwhile().await;
    go_tx.send(()).expect("go");
    let first = task
        .await
        .expect("task")
        .expect("the in-flight load answers its callers");
    assert_eq!(
        first.status(Utc::now()),
        KeyStatus::Active,
        "the load read the row from before the change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_during_a_load_wins() {
    let f = fixture().await;

    // Control: the same race without an invalidation caches the old row, so the checks
    // below can tell the difference.
    let auth = f.authenticator(&default_cfg());
    race_a_load(&auth, f.digest, async || f.revoke(f.key_id).await).await;
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Active));
    assert_eq!(auth.stats().db_lookups, 1);
    f.exec(&format!(
        "UPDATE api_keys SET revoked_at = NULL, is_active = true WHERE id = '{}'",
        f.key_id
    ))
    .await;

    // Key revoked and invalidated while its load is in flight.
    let auth = f.authenticator(&default_cfg());
    race_a_load(&auth, f.digest, async || {
        f.revoke(f.key_id).await;
        auth.invalidate_key(f.key_id);
    })
    .await;
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Revoked));
    assert_eq!(auth.stats().db_lookups, 2, "the stale row was not cached");

    // Organisation disabled and invalidated while a load of one of its keys is in flight.
    let (_, digest) = f.new_key("second").await;
    let auth = f.authenticator(&default_cfg());
    race_a_load(&auth, digest, async || {
        f.exec(&format!(
            "UPDATE organizations SET is_active = false WHERE id = '{}'",
            f.org_id
        ))
        .await;
        auth.invalidate_org(f.org_id);
    })
    .await;
    let rec = auth.authenticate(&digest).await.expect("key");
    assert!(!rec.org_active, "the organisation's disablement was lost");
    assert_eq!(auth.stats().db_lookups, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_reach_every_replica_within_a_second() {
    let f = fixture().await;
    // Keys made before the replicas listen, so no notification is pending once they do.
    let (expiring_id, expiring) = f.new_key("expiring").await;
    let (rotated_id, rotated) = f.new_key("rotated").await;
    let (a, b) = (f.authenticator(&default_cfg()), f.authenticator(&default_cfg()));
    let _ca = f.start_sync(&a).await;
    let _cb = f.start_sync(&b).await;
    let all = [f.digest, expiring, rotated];
    for auth in [&a, &b] {
        for d in &all {
            assert_eq!(status(auth, d).await, Some(KeyStatus::Active));
        }
    }
    let within = Duration::from_secs(1);
    let seen_by_both = async |digest: KeyDigest, want: KeyStatus| {
        eventually(within, async || {
            status(&a, &digest).await == Some(want) && status(&b, &digest).await == Some(want)
        })
        .await
    };

    // Bookkeeping writes (usage counters) notify nobody; a real change after them does.
    let before = a.stats().invalidations;
    f.exec(&format!(
        "UPDATE api_keys SET total_requests = total_requests + 1, last_used_at = now() WHERE id = '{}'",
        f.key_id
    ))
    .await;
    f.revoke(f.key_id).await;
    assert!(
        seen_by_both(f.digest, KeyStatus::Revoked).await,
        "revocation not seen by both replicas within 1s"
    );
    assert_eq!(
        a.stats().invalidations - before,
        1,
        "a usage-only update invalidated the key"
    );

    f.exec(&format!(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = '{expiring_id}'"
    ))
    .await;
    assert!(
        seen_by_both(expiring, KeyStatus::Expired).await,
        "expiry change not seen within 1s"
    );

    // Rotation with no grace: the old key stops working, the new one works everywhere.
    let mut admin = f.db.client().await;
    let (_, _, new_key) = keygate::db::keys::rotate(&mut admin, rotated_id, Duration::ZERO)
        .await
        .expect("rotate");
    assert!(
        seen_by_both(rotated, KeyStatus::Expired).await,
        "rotation not seen within 1s"
    );
    assert!(seen_by_both(new_key.digest, KeyStatus::Active).await);

    f.exec(&format!(
        "UPDATE organizations SET is_active = false WHERE id = '{}'",
        f.org_id
    ))
    .await;
    let disabled = eventually(within, async || {
        let mut all_off = true;
        for auth in [&a, &b] {
            all_off &= auth.authenticate(&new_key.digest).await.is_ok_and(|r| !r.org_active);
        }
        all_off
    })
    .await;
    assert!(disabled, "organisation disablement not seen by both replicas within 1s");
}

/// The usage writer's batch bumps `total_requests` and `last_used_at` of every key it
/// counts; migration 6 compares only what the cache holds for such updates. The batch
/// must reach nobody, and scope and limit changes must still reach everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_batches_notify_nobody_while_scope_and_limit_changes_do() {
    let f = fixture().await;
    let auth = f.authenticator(&default_cfg());
    let _c = f.start_sync(&auth).await;
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Active));
    let before = auth.stats().invalidations;

    let pool = keygate::db::pool(&f.db.database_config(), 2).expect("pool");
    let rows: Vec<_> = (0..3).map(|_| usage_row(f.key_id, f.org_id)).collect();
    let outcome = keygate::db::usage::write_batch(&pool, &rows, DEADLINE)
        .await
        .expect("usage batch");
    assert_eq!(outcome.inserted, 3);

    // Notifications arrive in commit order: once a later change is seen, any
    // notification the batch sent would have been seen before it.
    let within = Duration::from_secs(1);
    f.exec(&format!(
        r#"UPDATE api_keys SET scopes = '["chat:write"]' WHERE id = '{}'"#,
        f.key_id
    ))
    .await;
    let rescoped = eventually(within, async || {
        auth.authenticate(&f.digest)
            .await
            .is_ok_and(|r| r.scopes().iter().map(AsRef::as_ref).eq(["chat:write"]))
    })
    .await;
    assert!(rescoped, "scope change not seen within 1s");
    assert_eq!(
        auth.stats().invalidations - before,
        1,
        "the usage batch invalidated the key"
    );

    f.exec(&format!(
        "UPDATE api_keys SET custom_rate_limit = 7 WHERE id = '{}'",
        f.key_id
    ))
    .await;
    let limited = eventually(within, async || {
        auth.authenticate(&f.digest)
            .await
            .is_ok_and(|r| r.custom_rate_limit() == Some(7))
    })
    .await;
    assert!(limited, "rate limit change not seen within 1s");
    assert_eq!(auth.stats().invalidations - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_listener_reconnects_and_resyncs() {
    lost_listener(false).await;
}

/// With preload the resync is a full reload: the change arrives without any lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_listener_reconnects_and_reloads_when_preloaded() {
    lost_listener(true).await;
}

async fn lost_listener(preload: bool) {
    let f = fixture().await;
    let auth = f.authenticator(&AuthConfig {
        preload,
        ..default_cfg()
    });
    if preload {
        auth.preload().await.expect("preload");
    }
    let _cancel = f.start_sync(&auth).await;
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Active));
    let resyncs = auth.stats().resyncs;

    // Keep the listener out while the key changes, so its notification is surely lost.
    f.allow_connections(false).await;
    f.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'keygate-listen' AND datname = current_database()")
        .await;
    assert!(
        eventually(DEADLINE, async || !auth.stats().listener_connected).await,
        "listener loss not noticed"
    );
    f.revoke(f.key_id).await;
    assert_eq!(
        status(&auth, &f.digest).await,
        Some(KeyStatus::Active),
        "nothing can have told the cache yet"
    );

    f.allow_connections(true).await;
    assert!(
        eventually(DEADLINE, async || status(&auth, &f.digest).await
            == Some(KeyStatus::Revoked))
        .await,
        "the change made while disconnected was never seen"
    );
    let s = auth.stats();
    assert!(s.listener_connected && s.resyncs > resyncs, "{s:?}");
    if preload {
        assert_eq!(
            s.db_lookups, 0,
            "the reload, not lookups, should bring the change: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preload_keeps_random_keys_away_from_the_database() {
    let f = fixture().await;
    for i in 0..20 {
        f.new_key(&format!("bulk {i}")).await;
    }
    let auth = f.authenticator(&AuthConfig {
        preload: true,
        ..default_cfg()
    });
    let loads = Arc::new(AtomicUsize::new(0));
    assert!(auth.set_on_load(Box::new({
        let loads = loads.clone();
        move |_, _| {
            loads.fetch_add(1, Ordering::SeqCst);
        }
    })));
    assert_eq!(auth.preload().await.expect("preload"), 21);
    for _ in 0..1000 {
        assert_eq!(
            auth.authenticate(&random_digest()).await.err(),
            Some(AuthError::Unknown)
        );
    }
    assert_eq!(status(&auth, &f.digest).await, Some(KeyStatus::Active));
    let s = auth.stats();
    assert_eq!((s.db_lookups, s.cached, s.negative), (0, 21, 0), "{s:?}");

    // Changes arrive by notification and reload just the changed rows. Each step waits
    // for the reload to finish (not for the answer: asking while a row is invalidated
    // and not yet reloaded would be a legitimate lookup) and counts the rows it read.
    let _cancel = f.start_sync(&auth).await; // its first resync reloads everything once
    let step = async |change: &str| {
        let (reloads, rows) = (auth.stats().db_reloads, loads.load(Ordering::SeqCst));
        f.exec(change).await;
        assert!(
            eventually(DEADLINE, async || auth.stats().db_reloads > reloads).await,
            "no reload after {change}"
        );
        assert_eq!(auth.stats().db_reloads, reloads + 1, "{change}");
        loads.load(Ordering::SeqCst) - rows
    };
    let new_id = Uuid::now_v7();
    let new_digest = random_digest();
    let insert = format!(
        "INSERT INTO api_keys (id, organization_id, key_prefix, key_hash, key_hint, name, scopes)
         VALUES ('{new_id}', '{}', 'pk_test_', '{}', 'late', 'late', '[]')",
        f.org_id,
        new_digest.to_hex()
    );
    assert_eq!(step(&insert).await, 1, "a new key should reload one row");
    assert_eq!(status(&auth, &new_digest).await, Some(KeyStatus::Active));

    let revoke = format!("UPDATE api_keys SET revoked_at = now(), is_active = false WHERE id = '{new_id}'");
    assert_eq!(step(&revoke).await, 1, "a changed key should reload one row");
    assert_eq!(status(&auth, &new_digest).await, Some(KeyStatus::Revoked));

    assert_eq!(step(&format!("DELETE FROM api_keys WHERE id = '{new_id}'")).await, 0);
    assert_eq!(auth.authenticate(&new_digest).await.err(), Some(AuthError::Unknown));

    let disable = format!("UPDATE organizations SET is_active = false WHERE id = '{}'", f.org_id);
    assert_eq!(
        step(&disable).await,
        21,
        "an organisation change reloads its keys, and only those"
    );
    assert!(!auth.authenticate(&f.digest).await.expect("key").org_active);
    assert_eq!(
        auth.stats().db_lookups,
        0,
        "the preloaded cache never looked a digest up"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_reported_not_mistaken_for_unknown() {
    let mut db = keygate::config::Config::from_env(&|n| {
        (n == "DATABASE_URL").then(|| format!("postgres://postgres@127.0.0.1:{}/nothing", free_port()))
    })
    .expect("config")
    .database;
    db.connect_timeout = Duration::from_millis(500);
    db.pool_wait_timeout = Duration::from_millis(500);
    let auth = Authenticator::new(&default_cfg(), keygate::db::pool(&db, 2).expect("pool"));
    let started = Instant::now();
    assert_eq!(
        auth.authenticate(&random_digest()).await.err(),
        Some(AuthError::StoreUnavailable)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(auth.stats().negative, 0, "a failure must not be cached as unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_records_are_served_stale_while_the_store_is_down() {
    let f = fixture().await;
    let auth = f.authenticator(&cfg(Duration::from_millis(200), Duration::from_secs(5), 16));
    let (other_id, other) = f.new_key("other").await;
    auth.authenticate(&f.digest).await.expect("key");
    auth.authenticate(&other).await.expect("other key");

    f.allow_connections(false).await;
    f.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .await;
    assert!(
        eventually(DEADLINE, async || auth.authenticate(&f.digest).await.is_ok()
            && auth.stats().stale_served > 0)
        .await,
        "the expired record was not served stale"
    );
    assert_eq!(
        auth.authenticate(&random_digest()).await.err(),
        Some(AuthError::StoreUnavailable)
    );
    // An invalidated record is never served stale: it may be a revocation.
    auth.invalidate_key(other_id);
    assert_eq!(auth.authenticate(&other).await.err(), Some(AuthError::StoreUnavailable));

    f.allow_connections(true).await;
    let lookups = auth.stats().db_lookups;
    assert!(
        eventually(DEADLINE, async || auth.authenticate(&other).await.is_ok()).await,
        "no recovery"
    );
    assert!(auth.stats().db_lookups > lookups);
}

/// A "database" that accepts connections and never answers: what a frozen PostgreSQL
/// looks like from outside. Counts the connections it was offered.
async fn black_hole() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(sock);
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_stops_asking_a_frozen_database_and_probes_after_the_cooldown() {
    let (port, accepted) = black_hole().await;
    let mut db = keygate::config::Config::from_env(&|n| {
        (n == "DATABASE_URL").then(|| format!("postgres://postgres@127.0.0.1:{port}/frozen"))
    })
    .expect("config")
    .database;
    db.connect_timeout = Duration::from_secs(5);
    db.pool_wait_timeout = Duration::from_secs(5);
    let mut c = default_cfg();
    c.lookup_timeout = Duration::from_millis(200);
    c.breaker_failures = 3;
    c.breaker_cooldown = Duration::from_secs(1);
    let auth = Authenticator::new(&c, keygate::db::pool(&db, 4).expect("pool"));

    for _ in 0..3 {
        assert_eq!(
            auth.authenticate(&random_digest()).await.err(),
            Some(AuthError::StoreUnavailable)
        );
    }
    assert_eq!(auth.stats().breaker, BreakerState::Open);
    let asked = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked >= 3, "each failed lookup tried the database ({asked})");

    // Open: 200 uncached keys are answered at once, and the database hears of none.
    let started = Instant::now();
    for _ in 0..200 {
        assert_eq!(
            auth.authenticate(&random_digest()).await.err(),
            Some(AuthError::StoreUnavailable)
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), asked);

    // After the cooldown one probe goes out (and fails: still frozen), reopening it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(auth.stats().breaker, BreakerState::HalfOpen);
    let probes: Vec<_> = (0..20).map(|_| random_digest()).collect();
    let answers = futures_util::future::join_all(probes.iter().map(|d| auth.authenticate(d))).await;
    assert!(answers
        .iter()
        .all(|a| a.as_ref().err() == Some(&AuthError::StoreUnavailable)));
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        asked + 1,
        "exactly one probe"
    );
    assert_eq!(auth.stats().breaker, BreakerState::Open);
    assert_eq!(auth.stats().breaker_opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_database_closes_the_breaker_with_one_probe() {
    let f = fixture().await;
    let mut c = cfg(Duration::from_secs(60), Duration::from_secs(5), 16);
    c.breaker_failures = 2;
    c.breaker_cooldown = Duration::from_millis(300);
    let auth = f.authenticator(&c);
    f.allow_connections(false).await;
    f.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .await;
    for _ in 0..10 {
        assert!(auth.authenticate(&random_digest()).await.is_err());
        if auth.stats().breaker == BreakerState::Open {
            break;
        }
    }
    assert_eq!(auth.stats().breaker, BreakerState::Open);
    f.allow_connections(true).await;
    // Recovery: within the cooldown plus one lookup, the real key authenticates again.
    let started = Instant::now();
    assert!(
        eventually(DEADLINE, async || auth.authenticate(&f.digest).await.is_ok()).await,
        "no recovery"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "recovery took {:?}",
        started.elapsed()
    );
    assert_eq!(auth.stats().breaker, BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_records_are_served_only_up_to_the_ceiling() {
    let f = fixture().await;
    let mut c = cfg(Duration::from_millis(200), Duration::from_secs(5), 16);
    c.serve_stale_for = Duration::from_millis(1500);
    c.breaker_failures = 0;
    let auth = f.authenticator(&c);
    auth.authenticate(&f.digest).await.expect("key");
    let loaded = Instant::now();
    f.allow_connections(false).await;
    f.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        auth.authenticate(&f.digest).await.is_ok(),
        "within the ceiling: served stale"
    );
    tokio::time::sleep(Duration::from_millis(1700).saturating_sub(loaded.elapsed())).await;
    assert_eq!(
        auth.authenticate(&f.digest).await.err(),
        Some(AuthError::StoreUnavailable),
        "past fresh + serve_stale_for the record is no longer trusted"
    );
    f.allow_connections(true).await;
}

/// A key in use is reloaded before its record expires: a hit in the last tenth of the
/// TTL (from between the last fifth and tenth, by digest) starts a background lookup and is answered from the cache at once, so active
/// keys never wait on the database, and a change that no notification announced still
/// arrives within the TTL.
#[tokio::test]
async fn records_in_use_are_refreshed_before_they_expire() {
    let f = fixture().await;
    let ttl = Duration::from_secs(4);
    let auth = f.authenticator(&AuthConfig {
        listen_notify: false,
        ..cfg(ttl, Duration::from_secs(5), 16)
    });
    let loaded = Instant::now();
    auth.authenticate(&f.digest).await.expect("first lookup");
    let lookups = || auth.stats().db_lookups;
    assert!(auth.cached(&f.digest).is_some());
    assert_eq!(
        (lookups(), auth.stats().refreshes),
        (1, 0),
        "an early hit starts nothing"
    );

    // Revoked behind the cache's back: no notification, no sync task.
    f.revoke(f.key_id).await;
    tokio::time::sleep_until((loaded + ttl * 91 / 100).into()).await;
    let served = auth.cached(&f.digest).expect("still fresh").expect("found");
    assert_eq!(served.status(Utc::now()), KeyStatus::Active, "answered from the cache");
    assert!(eventually(DEADLINE, async || lookups() == 2).await, "no reload started");
    assert!(auth.stats().refreshes >= 1);
    assert!(
        eventually(DEADLINE, async || {
            auth.cached(&f.digest)
                .and_then(Result::ok)
                .is_some_and(|r| r.status(Utc::now()) == KeyStatus::Revoked)
        })
        .await,
        "the reload did not bring the revocation in"
    );

    // Past the first record's TTL the reloaded one is still fresh: no request misses.
    tokio::time::sleep_until((loaded + ttl * 120 / 100).into()).await;
    assert!(
        auth.cached(&f.digest).is_some(),
        "the refreshed record should outlive the first"
    );
    assert_eq!(lookups(), 2);
}
