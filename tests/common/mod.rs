//! Shared test harness: a throwaway PostgreSQL cluster per test binary, a fresh
//! database per test, and helpers to run the real `keygate` binary.
//!
//! With `DATABASE_URL` set, that server is used instead of a throwaway cluster (each
//! test still gets its own database). Nothing here mocks Postgres or the network.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod net;
pub mod recorder;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

pub struct Server {
    /// URL of the maintenance database, used to create per-test databases.
    admin_url: String,
    /// `postgres://user@host:port` with no database, for building per-test URLs.
    base_url: String,
    /// Set for a cluster this harness started.
    pub data_dir: Option<PathBuf>,
    pub port: u16,
}

static SERVER: OnceLock<Server> = OnceLock::new();

pub fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => external(url),
        _ => start_cluster(),
    })
}

fn external(url: String) -> Server {
    let cfg: tokio_postgres::Config = url.parse().expect("DATABASE_URL must be a PostgreSQL URL");
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let auth = match cfg.get_password() {
        Some(p) => format!("{user}:{}", String::from_utf8_lossy(p)),
        None => user.to_string(),
    };
    Server {
        admin_url: url,
        base_url: format!("postgres://{auth}@{host}:{port}"),
        data_dir: None,
        port,
    }
}

fn is_root() -> bool {
    // SAFETY-free check: `id -u` avoids a libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Finds a PostgreSQL server binary: on PATH, else Debian's versioned directories.
pub fn pg_bin(name: &str) -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("{name} not found: install the postgresql package or set DATABASE_URL"))
}

/// Runs a PostgreSQL binary as the `postgres` user when we are root (it refuses root).
fn pg_command(name: &str) -> Command {
    let bin = pg_bin(name);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_cluster() -> Server {
    let c = Cluster::start_with(false);
    let base_url = format!("postgres://postgres@127.0.0.1:{}", c.port);
    let server = Server {
        admin_url: format!("{base_url}/postgres"),
        base_url,
        data_dir: Some(c.data.clone()),
        port: c.port,
    };
    // The shared cluster lives as long as the test process; the reaper removes it.
    std::mem::forget(c);
    server
}

/// A PostgreSQL cluster of one test's own, which the test may stop, restart or freeze.
pub struct Cluster {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    durable: bool,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("keygate-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of {} failed", dir.display());
        }
        let data = dir.join("data");
        let out = pg_command("initdb")
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        spawn_reaper(&dir, &data);
        let mut last_err = String::new();
        for _ in 0..5 {
            let c = Cluster {
                dir: dir.clone(),
                data: data.clone(),
                port: free_port(),
                durable,
            };
            match c.pg_ctl_start() {
                Ok(()) => return c,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start PostgreSQL: {last_err}");
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit={} \
             -c full_page_writes=off -c max_connections=400 -c shared_buffers=64MB",
            self.port,
            self.dir.display(),
            // A test that crashes its own cluster must not lose acknowledged commits
            // (asynchronous commit would, by design); the shared cluster is never crashed.
            if self.durable { "on" } else { "off" },
        );
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            Ok(())
        } else {
            Err(std::fs::read_to_string(self.dir.join("log")).unwrap_or_default())
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A fresh database on this cluster, wrapped like the shared harness's.
    pub async fn fresh_db(&self) -> TestDb {
        let name = format!("kg_test_{}", uuid::Uuid::new_v4().simple());
        connect(&self.url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create db");
        TestDb {
            url: self.url(&name),
            name,
        }
    }

    /// Stops the server (fast: open sessions are cut, as in a crash or failover).
    pub fn stop(&self) {
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        self.pg_ctl_start().unwrap_or_else(|e| panic!("restart failed: {e}"));
    }

    /// The postmaster's pid, for SIGSTOP/SIGCONT (a frozen, not a dead, database).
    pub fn postmaster_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).expect("postmaster.pid");
        text.lines().next().and_then(|l| l.trim().parse().ok()).expect("pid")
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the postmaster and all its backends.
    pub fn signal_all(&self, signal: &str) {
        let pid = self.postmaster_pid();
        let _ = Command::new("pkill")
            .args([&format!("-{signal}"), "-P", &pid.to_string()])
            .status();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Stops the cluster and removes its directory once this test process exits: statics
/// are never dropped, so a watcher process does the teardown.
#[allow(clippy::zombie_processes)] // The reaper must outlive us; init adopts it.
fn spawn_reaper(dir: &Path, data: &Path) {
    let pg_ctl = pg_bin("pg_ctl");
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!("{} -D {} -m immediate stop", pg_ctl.display(), data.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cluster reaper");
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Runs `keygate migrate up` on this database through the real binary.
    pub fn migrate(&self) -> &Self {
        let out = self.keygate(&["migrate", "up"]);
        assert!(out.status.success(), "migrate up failed: {}", stderr(&out));
        self
    }

    /// A `keygate` command with DATABASE_URL pointing here.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keygate"));
        c.args(args)
            .env("DATABASE_URL", &self.url)
            .env_remove("KEYGATE_CONFIG")
            .env_remove("RUST_LOG");
        c
    }

    pub fn keygate(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run keygate")
    }

    /// Runs keygate, asserts success, returns trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.keygate(args);
        assert!(out.status.success(), "keygate {args:?} failed: {}", stderr(&out));
        stdout(&out).trim().to_string()
    }

    pub fn database_config(&self) -> keygate::config::DatabaseConfig {
        keygate::config::Config::from_env(&|n| (n == "DATABASE_URL").then(|| self.url.clone()))
            .expect("config from url")
            .database
    }

    /// The proxy's lookup by digest (`db::keys::lookup`), on a pooled connection as the
    /// proxy makes it, as of now.
    pub async fn lookup(&self, digest: &keygate::keys::KeyDigest) -> Option<keygate::db::keys::Found> {
        let pool = keygate::db::pool(&self.database_config(), 1).expect("pool");
        let conn = pool.get().await.expect("pooled connection");
        keygate::db::keys::lookup(&conn, digest, chrono::Utc::now())
            .await
            .expect("lookup")
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Creates an empty database for the calling test.
pub async fn fresh_db() -> TestDb {
    let srv = server();
    let name = format!("kg_test_{}", uuid::Uuid::new_v4().simple());
    let admin = connect(&srv.admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    TestDb {
        url: format!("{}/{name}", srv.base_url),
        name,
    }
}

/// A migrated database, with the seed run; returns the database and the seeded key.
pub async fn seeded_db() -> (TestDb, String) {
    let db = fresh_db().await;
    db.migrate();
    let key = db.ok(&["seed"]);
    (db, key)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f().await {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Folds the usage writer's pending per-key counts into `api_keys` (migration 13), as
/// keygate's fold task does every few seconds, so that `api_keys.total_requests` and
/// `last_used_at` can be read exactly.
pub async fn fold_counters(c: &tokio_postgres::Client) -> u64 {
    keygate::db::key_counters::fold(c).await.expect("fold key counters")
}

/// A plain usage row for `key` of `org`, as the writer stores one: now (to the
/// microsecond PostgreSQL keeps), a 200 on a chat path, no tokens or client details.
pub fn usage_row(key: uuid::Uuid, org: uuid::Uuid) -> keygate::usage::UsageRecord {
    use chrono::SubsecRound;
    keygate::usage::UsageRecord {
        id: uuid::Uuid::now_v7(),
        api_key_id: key,
        organization_id: org,
        timestamp: chrono::Utc::now().trunc_subsecs(6),
        endpoint: "/v1/chat/completions".into(),
        method: "POST".into(),
        status_code: 200,
        response_time_ms: 1,
        prompt_tokens: None,
        completion_tokens: None,
        tokens_used: None,
        cost_micros: None,
        model: None,
        ip_address: None,
        user_agent: None,
        error_code: None,
        error_message: None,
    }
}
