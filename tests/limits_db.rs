//! The limits engine against a real PostgreSQL: replicas sharing one database, the
//! monthly count surviving restarts, flushes that fail, and the quota migration.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use keygate::auth::Authenticator;
use keygate::config::AuthConfig;
use keygate::db::{self, counters, keys, orgs, DbError};
use keygate::keys::{Environment, KeyDigest};
use keygate::limits::{window, Decision, KeyLimits, LimitKind, Limiter};
use keygate::model::Plan;
use uuid::Uuid;

use common::*;

struct Fixture {
    db: TestDb,
    pool: deadpool_postgres::Pool,
    client: tokio_postgres::Client,
}

async fn fixture() -> Fixture {
    let db = fresh_db().await;
    let mut client = db.client().await;
    db::migrate::up(&mut client).await.expect("migrate up");
    let pool = db::pool(&db.database_config(), 4).expect("pool");
    Fixture { db, pool, client }
}

impl Fixture {
    async fn org(&self, monthly: i64) -> Uuid {
        let slug = format!("org-{}", Uuid::new_v4().simple());
        let new = orgs::NewOrganization {
            name: slug.clone(),
            slug,
            email: None,
            plan: Plan::Pro,
            monthly_request_limit: Some(monthly),
            rate_limit_per_minute: Some(60),
            max_api_keys: Some(100),
        };
        orgs::create(&self.client, &new).await.expect("org").id
    }

    /// A key of `org` with its limits as the proxy would derive them.
    async fn key(&mut self, org: Uuid, per_minute: i64, monthly: i64) -> KeyLimits {
        self.key_and_digest(org, per_minute, monthly).await.0
    }

    /// `key`, with the digest a client presenting it would be looked up by.
    async fn key_and_digest(&mut self, org: Uuid, per_minute: i64, monthly: i64) -> (KeyLimits, KeyDigest) {
        let slug: String = self
            .client
            .query_one("SELECT slug::text FROM organizations WHERE id = $1", &[&org])
            .await
            .expect("slug")
            .get(0);
        let spec = keys::KeySpec {
            name: "limits".into(),
            description: None,
            environment: Environment::Test,
            scopes: Vec::new(),
            custom_rate_limit: Some(per_minute),
            expires_at: None,
        };
        let (key, secret) = keys::create(&mut self.client, &slug, &spec).await.expect("key");
        let limits = KeyLimits {
            key_id: key.id,
            org_id: org,
            per_minute,
            monthly,
        };
        (limits, secret.digest)
    }

    /// Counts as other replicas would have flushed them, through the flush's own
    /// statements: `minute` and `previous` for the key's current and previous minute of
    /// `at`, `month` for its organisation's month.
    async fn counted_elsewhere(&self, k: &KeyLimits, at: DateTime<Utc>, minute: i64, previous: i64, month: i64) {
        let this = window::minute_start_of(at);
        let cell = |window_start, count| counters::WindowCount {
            id: k.key_id,
            window_start,
            count,
        };
        let cells = [cell(this, minute), cell(this - chrono::Duration::minutes(1), previous)];
        counters::add_key_minutes(&self.client, &cells, &[])
            .await
            .expect("minute rows");
        let month = counters::WindowCount {
            id: k.org_id,
            window_start: window::month_start_of(at),
            count: month,
        };
        counters::add_org_months(&self.client, &[month], &[])
            .await
            .expect("month row");
    }

    async fn minute_total(&self, key: Uuid, at: DateTime<Utc>) -> i64 {
        self.client
            .query_opt(
                "SELECT request_count FROM rate_limit_tracking WHERE api_key_id = $1 AND window_start = $2",
                &[&key, &window::minute_start_of(at)],
            )
            .await
            .expect("minute row")
            .map_or(0, |r| r.get(0))
    }

    async fn month_total(&self, org: Uuid, at: DateTime<Utc>) -> i64 {
        self.client
            .query_opt(
                "SELECT request_count FROM organization_monthly_usage WHERE organization_id = $1 AND month_start = $2",
                &[&org, &window::month_start_of(at)],
            )
            .await
            .expect("month row")
            .map_or(0, |r| r.get(0))
    }
}

/// Waits out the last seconds of a minute, for tests that read the real clock more
/// than once and must not see two minutes.
async fn not_near_a_minute_boundary() {
    let into = Utc::now().timestamp_millis().rem_euclid(60_000);
    if into > 55_000 {
        tokio::time::sleep(Duration::from_millis(u64::try_from(60_500 - into).unwrap_or(0))).await;
    }
}

/// Ten seconds into the current minute, so a test never straddles a boundary.
fn early_in_minute() -> DateTime<Utc> {
    window::minute_start_of(Utc::now()) + chrono::Duration::seconds(10)
}

fn allowed(l: &Limiter, k: &KeyLimits, n: usize, now: DateTime<Utc>) -> usize {
    (0..n).filter(|_| l.check(k, now).is_allowed()).count()
}

#[tokio::test]
async fn two_replicas_enforce_one_limit_after_a_flush() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let k = f.key(org, 10, 1_000).await;
    let (a, b) = (Limiter::new(), Limiter::new());
    let now = early_in_minute();

    // Each replica alone would allow 10; they count 4 each before talking.
    assert_eq!(allowed(&a, &k, 4, now), 4);
    assert_eq!(allowed(&b, &k, 4, now), 4);
    let stats = a.flush(&f.pool, now).await.expect("flush a");
    assert_eq!((stats.key_deltas, stats.org_deltas), (1, 1));
    b.flush(&f.pool, now).await.expect("flush b");
    // `a` wrote nothing new; it still reads what `b` added.
    a.flush(&f.pool, now).await.expect("flush a again");
    assert_eq!(f.minute_total(k.key_id, now).await, 8);

    assert_eq!(allowed(&a, &k, 5, now), 2, "8 of 10 are spent across both");
    a.flush(&f.pool, now).await.expect("flush a");
    b.flush(&f.pool, now).await.expect("flush b");
    match b.check(&k, now) {
        Decision::Limited { which, info, .. } => {
            assert_eq!(which, LimitKind::PerMinute);
            assert_eq!(info.remaining, 0);
        }
        d => panic!("b should see the shared limit reached, got {d:?}"),
    }
    assert_eq!(f.minute_total(k.key_id, now).await, 10);
    assert_eq!(f.month_total(org, now).await, 10);
}

/// A replica's last deltas for a minute reach the database after the minute ended (its
/// flush was due a few seconds later); the other replica reads that minute back while
/// such deltas may still come, so its sliding estimate in the new minute counts them.
#[tokio::test]
async fn late_deltas_for_the_previous_minute_still_count_elsewhere() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let k = f.key(org, 20, 1_000).await;
    let (a, b) = (Limiter::new(), Limiter::new());
    let m = window::minute_start_of(Utc::now()) - chrono::Duration::minutes(5);
    let s = |secs| m + chrono::Duration::seconds(secs);
    assert_eq!(allowed(&a, &k, 5, s(50)), 5);
    assert_eq!(allowed(&b, &k, 10, s(59)), 10);
    a.flush(&f.pool, s(59)).await.expect("flush a");
    b.flush(&f.pool, s(65)).await.expect("flush b, late");
    a.flush(&f.pool, s(66)).await.expect("flush a");
    assert_eq!(f.minute_total(k.key_id, m).await, 15);
    // 6 s into the next minute the estimate is 15 * 54/60 = 13.5 before this minute's
    // own: 6 more fit under 20. Had `a` kept its own 5, it would allow all 10.
    assert_eq!(allowed(&a, &k, 10, s(66)), 6);
}

#[tokio::test]
async fn the_monthly_count_survives_a_restart() {
    let mut f = fixture().await;
    let org = f.org(7).await;
    let k = f.key(org, 100, 7).await;
    let now = early_in_minute();
    {
        let before = Limiter::new();
        assert_eq!(allowed(&before, &k, 5, now), 5);
        before.flush(&f.pool, now).await.expect("flush");
    }

    let conn = f.pool.get().await.expect("pooled connection");
    let snap = counters::load(&conn, k.key_id, org, now).await.expect("load");
    assert_eq!((snap.month_count, snap.minute_count), (5, 5));
    assert_eq!(snap.previous_minute_count, 0);
    let other = f.key(org, 100, 7).await;
    let many = counters::load_many(&f.client, &[(other.key_id, org), (k.key_id, org)], now)
        .await
        .expect("load many");
    assert_eq!(many[0].0, other.key_id);
    assert_eq!((many[0].1.minute_count, many[0].1.month_count), (0, 5));
    assert_eq!(many[1], (k.key_id, snap));

    let after = Limiter::new();
    after.seed(&k, &snap, now);
    assert_eq!(allowed(&after, &k, 5, now), 2);
    // A sibling key of the same org, seeded by the proxy's path, finds it spent.
    let again = Limiter::new();
    again.flush(&f.pool, now).await.expect("nothing to flush");
    after.flush(&f.pool, now).await.expect("flush after");
    again.ensure_seeded(&f.pool, &other, now).await;
    assert!(again.is_known(&other));
    match again.check(&other, now) {
        Decision::Limited { which, .. } => assert_eq!(which, LimitKind::Monthly),
        d => panic!("the month is spent, got {d:?}"),
    }
    assert_eq!(f.month_total(org, now).await, 7);
}

#[tokio::test]
async fn a_failed_flush_loses_no_delta() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let k = f.key(org, 100, 1_000).await;
    let now = early_in_minute();
    let limiter = Limiter::new();
    assert_eq!(allowed(&limiter, &k, 6, now), 6);

    let mut down = f.db.database_config();
    down.url = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    down.connect_timeout = Duration::from_millis(300);
    let dead = db::pool(&down, 1).expect("pool");
    let err: DbError = limiter.flush(&dead, now).await.expect_err("no database there");
    assert!(err.is_unavailable(), "{err}");
    // Local enforcement goes on meanwhile, and its counts join the retried deltas.
    assert_eq!(allowed(&limiter, &k, 3, now), 3);
    assert!(limiter.flush(&dead, now).await.is_err());

    limiter.flush(&f.pool, now).await.expect("flush");
    assert_eq!(f.minute_total(k.key_id, now).await, 9);
    assert_eq!(f.month_total(org, now).await, 9);
    // Nothing is written twice.
    limiter.flush(&f.pool, now).await.expect("flush");
    assert_eq!(f.month_total(org, now).await, 9);
}

#[tokio::test]
async fn a_deleted_key_does_not_wedge_the_flush() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let (gone, kept) = (f.key(org, 100, 1_000).await, f.key(org, 100, 1_000).await);
    let now = early_in_minute();
    let limiter = Limiter::new();
    allowed(&limiter, &gone, 2, now);
    allowed(&limiter, &kept, 3, now);
    f.client
        .execute("DELETE FROM api_keys WHERE id = $1", &[&gone.key_id])
        .await
        .expect("delete key");
    limiter.flush(&f.pool, now).await.expect("flush");
    assert_eq!(f.minute_total(kept.key_id, now).await, 3);
    assert_eq!(f.month_total(org, now).await, 5);
    assert_eq!(limiter.tracked().spilled, 0);
}

#[tokio::test]
async fn replicas_flushing_the_same_keys_at_once_add_up() {
    let mut f = fixture().await;
    let org = f.org(1_000_000).await;
    let mut ks = Vec::new();
    for _ in 0..20 {
        ks.push(f.key(org, 1_000, 1_000_000).await);
    }
    let now = early_in_minute();
    let replicas: Vec<Limiter> = (0..4).map(|_| Limiter::new()).collect();
    for round in 0..5 {
        for (i, r) in replicas.iter().enumerate() {
            // Different orders per replica, the way deadlocks would arise.
            let order: Vec<&KeyLimits> = if (i + round) % 2 == 0 {
                ks.iter().collect()
            } else {
                ks.iter().rev().collect()
            };
            for k in order {
                allowed(r, k, 3, now);
            }
        }
        let flushes = replicas.iter().map(|r| r.flush(&f.pool, now));
        for res in futures_util::future::join_all(flushes).await {
            res.expect("concurrent flush");
        }
    }
    for k in &ks {
        assert_eq!(f.minute_total(k.key_id, now).await, 4 * 5 * 3);
    }
    assert_eq!(f.month_total(org, now).await, 20 * 4 * 5 * 3);
}

#[tokio::test]
async fn the_quota_migration_rolls_back_and_checks_month_starts() {
    let mut f = fixture().await;
    let org = f.org(10).await;
    let mid_month = window::month_start_of(Utc::now()) + chrono::Duration::days(3);
    let err = f
        .client
        .execute(
            "INSERT INTO organization_monthly_usage (organization_id, month_start) VALUES ($1, $2)",
            &[&org, &mid_month],
        )
        .await
        .expect_err("a mid-month start is refused");
    assert!(err.to_string().contains("month_check") || format!("{err:?}").contains("month_check"));

    // Down to just before 0003, whatever came after it.
    let steps = usize::try_from(db::migrate::latest_version() - 2).expect("steps");
    db::migrate::down(&mut f.client, steps).await.expect("down");
    let exists: bool = f
        .client
        .query_one("SELECT to_regclass('organization_monthly_usage') IS NOT NULL", &[])
        .await
        .expect("regclass")
        .get(0);
    assert!(!exists);
    db::migrate::up(&mut f.client).await.expect("up again");
}

#[tokio::test]
async fn the_key_lookup_reads_what_a_seed_needs_in_the_same_statement() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let (k, digest) = f.key_and_digest(org, 100, 1_000).await;
    let now = early_in_minute();
    f.counted_elsewhere(&k, now, 3, 4, 9).await;
    let conn = f.pool.get().await.expect("pooled connection");
    let found = keys::lookup(&conn, &digest, now).await.expect("lookup").expect("found");
    assert_eq!(found.record.key_id, k.key_id);
    let c = found.counters;
    assert_eq!((c.minute_count, c.previous_minute_count, c.month_count), (3, 4, 9));
    assert_eq!(c, counters::load(&conn, k.key_id, org, now).await.expect("load"));
    // A key nobody counted yet reads zeros, not nothing.
    let (fresh, fresh_digest) = f.key_and_digest(org, 100, 1_000).await;
    let c = keys::lookup(&conn, &fresh_digest, now)
        .await
        .expect("lookup")
        .expect("found")
        .counters;
    assert_eq!(
        (c.minute_count, c.previous_minute_count, c.month_count),
        (0, 0, 9),
        "{fresh:?}"
    );

    // The statements are prepared once per connection. One deallocated under them (a
    // pooler's DISCARD ALL) or whose result type a migration changed is prepared again.
    conn.batch_execute("DEALLOCATE ALL").await.expect("deallocate");
    assert!(keys::lookup(&conn, &digest, now)
        .await
        .expect("after DEALLOCATE")
        .is_some());
    assert_eq!(
        counters::load(&conn, k.key_id, org, now)
            .await
            .expect("after DEALLOCATE"),
        found.counters
    );
    f.client
        .batch_execute("ALTER TABLE organizations ALTER COLUMN plan TYPE varchar(64)")
        .await
        .expect("alter");
    let again = keys::lookup(&conn, &digest, now)
        .await
        .expect("after ALTER")
        .expect("found");
    assert_eq!(again.record.key_hint(), found.record.key_hint());
}

#[tokio::test]
async fn a_key_seen_first_by_a_lookup_is_seeded_without_a_second_query() {
    let mut f = fixture().await;
    let org = f.org(1_000).await;
    let (k, digest) = f.key_and_digest(org, 5, 1_000).await;
    let (off, off_digest) = f.key_and_digest(org, 5, 1_000).await;
    not_near_a_minute_boundary().await;
    let now = Utc::now();
    f.counted_elsewhere(&k, now, 4, 0, 4).await;
    // The defaults an operator gets.
    let cfg: AuthConfig = keygate::config::Config::from_env(&|n| (n == "DATABASE_URL").then(|| f.db.url.clone()))
        .expect("config")
        .auth;

    let auth = Authenticator::new(&cfg, f.pool.clone());
    let limiter = std::sync::Arc::new(Limiter::new());
    let enabled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let on = enabled.clone();
    assert!(auth.set_on_load(
        limiter
            .clone()
            .seed_on_lookup(move || on.load(std::sync::atomic::Ordering::SeqCst))
    ));
    let record = auth.authenticate(&digest).await.expect("authenticated");
    assert_eq!(KeyLimits::from_auth(&record), k);
    // The proxy seeds only unknown keys (`ensure_seeded`, its own query); this one is
    // known, with the other replicas' 4 of 5 this minute already counted.
    assert!(limiter.is_known(&k));
    assert!(limiter.check(&k, Utc::now()).is_allowed());
    match limiter.check(&k, Utc::now()) {
        Decision::Limited { which, .. } => assert_eq!(which, LimitKind::PerMinute),
        d => panic!("4 counted elsewhere and 1 here spend a limit of 5, got {d:?}"),
    }

    // With limits off, a lookup seeds nothing.
    enabled.store(false, std::sync::atomic::Ordering::SeqCst);
    auth.authenticate(&off_digest).await.expect("authenticated");
    assert!(!limiter.is_known(&off));
}
