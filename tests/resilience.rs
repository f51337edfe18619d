//! Faults under load: the database frozen (SIGSTOP) rather than down.

mod common;

use std::time::{Duration, Instant};

use common::net::*;
use common::*;

#[tokio::test]
async fn postgres_frozen_under_load_cached_keys_work_uncached_get_503_and_nothing_is_lost() {
    let cluster = Cluster::start();
    let db = cluster.fresh_db().await;
    db.migrate();
    db.ok(&[
        "orgs",
        "create",
        "--name",
        "Big",
        "--slug",
        "big",
        "--rate-limit",
        "1000000",
        "--monthly-limit",
        "100000000",
    ]);
    let warm = db.ok(&["keys", "create", "--org", "big", "--name", "warm"]);
    let cold = db.ok(&["keys", "create", "--org", "big", "--name", "cold"]);
    let up = Upstream::start(&[]).await;
    let extra = "[database]\nconnect_timeout = \"500ms\"\npool_wait_timeout = \"500ms\"\nstatement_timeout = \"2s\"\n\
                 [auth]\nlookup_timeout = \"1s\"\n[usage]\nflush_interval = \"200ms\"\nqueue_capacity = 64\n";
    let gw = Gateway::start(&db, up.port, extra).await;
    let (warm_auth, cold_auth) = (bearer(&warm), bearer(&cold));
    assert_eq!(
        get(&gw.url("/echo"), &[("authorization", &warm_auth)]).await.status,
        200
    );

    let url = gw.url("/echo");
    let stop_at = Instant::now() + Duration::from_secs(26);
    let load = tokio::spawn({
        let (url, auth) = (url.clone(), warm_auth.clone());
        async move {
            let (mut ok, mut failed) = (1u64, Vec::new());
            while Instant::now() < stop_at {
                let r = get(&url, &[("authorization", &auth)]).await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push(r.status.as_u16());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.signal_all("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // An uncached key gets 503 within the lookup budget, with Retry-After.
    let asked = Instant::now();
    let r = get(&url, &[("authorization", &cold_auth)]).await;
    let took = asked.elapsed();
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (503, "key_store_unavailable")
    );
    assert!(r.header("retry-after").is_some());
    assert!(took < Duration::from_secs(3), "503 took {took:?}");

    tokio::time::sleep(Duration::from_secs(18)).await;
    cluster.signal_all("CONT");
    let thawed = Instant::now();
    let mut cold_ok = 0u64;
    let mut recovered = None;
    while thawed.elapsed() < Duration::from_secs(10) {
        if get(&url, &[("authorization", &cold_auth)]).await.status == 200 {
            cold_ok += 1;
            recovered = Some(thawed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("uncached key never recovered");
    assert!(recovered < Duration::from_secs(5), "recovery took {recovered:?}");

    let (ok, failed) = load.await.expect("load");
    assert!(
        failed.is_empty(),
        "the cached key failed {} times while the database was frozen",
        failed.len()
    );
    let want = (ok + cold_ok) as i64;
    let start = Instant::now();
    let mut have = 0;
    while start.elapsed() < Duration::from_secs(40) {
        have = db
            .client()
            .await
            .query_one("SELECT count(*) FROM api_key_usage", &[])
            .await
            .expect("count")
            .get(0);
        if have >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(have, want, "usage rows must equal identified responses exactly");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM api_key_usage", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(again, want, "a row was written twice");
    eprintln!(
        "frozen 20 s: {ok} cached-key responses, 0 failures; uncached 503 in {took:?}; recovered in {recovered:?}"
    );
}
