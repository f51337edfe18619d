//! Real processes and real sockets: the demo upstream, keygate gateways, an HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::{free_port, TestDb};

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    /// SIGTERM, then wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listening on port {port} after {timeout:?}");
}

pub struct Upstream {
    pub proc: Proc,
    pub port: u16,
}

impl Upstream {
    pub async fn start(extra: &[&str]) -> Upstream {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["demo-upstream", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo upstream");
        let up = Upstream {
            proc: Proc {
                child,
                name: "upstream",
            },
            port,
        };
        wait_for_port(port, Duration::from_secs(10)).await;
        up
    }
}

pub struct Gateway {
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
    pub config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    /// Where this gateway spools usage rows.
    pub spool: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

/// Every gateway a test starts is swept when dropped: no plaintext key may appear in its
/// log or its spool files, whatever the test sent it.
impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // A clean exit writes out the buffered log lines, so the sweep sees all of them.
        if let Ok(None) = self.proc.child.try_wait() {
            let _ = self.proc.terminate(Duration::from_secs(5));
        }
        if let Some(found) = find_plaintext_key(&self.logs()) {
            panic!("a plaintext key reached keygate's log: {found}");
        }
        for text in self.spool_texts() {
            if let Some(found) = find_plaintext_key(&text) {
                panic!("a plaintext key reached the spool: {found}");
            }
        }
    }
}

/// The first thing in `text` shaped like a whole key (prefix and at least 16 characters
/// of its body); hints (prefix, ellipsis, 4 characters) do not match.
pub fn find_plaintext_key(text: &str) -> Option<String> {
    for prefix in ["pk_live_", "pk_test_"] {
        for (i, _) in text.match_indices(prefix) {
            let body: String = text[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            if body.len() >= 16 {
                return Some(format!("{prefix}{body}"));
            }
        }
    }
    None
}

impl Gateway {
    /// Starts `keygate serve` on `db` in front of `upstream_port`, with `extra` TOML
    /// appended (a leading `[server]` section is merged; other sections must not repeat
    /// `[upstream]`), and waits until it is ready.
    pub async fn start(db: &TestDb, upstream_port: u16, extra: &str) -> Gateway {
        Self::start_raw(db, |port, admin_port| {
            // A leading [server] section in `extra` is merged into the one written here.
            let (server_extra, extra) = match extra.strip_prefix("[server]\n") {
                Some(rest) => match rest.find("\n[") {
                    Some(i) => (&rest[..=i], &rest[i + 1..]),
                    None => (rest, ""),
                },
                None => ("", extra),
            };
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nshutdown_grace = \"10s\"\n\
                 {server_extra}\n[upstream]\nurl = \"http://127.0.0.1:{upstream_port}\"\n{extra}\n"
            )
        })
        .await
    }

    /// Starts a gateway from a complete config file text (ports are filled in). The ports
    /// come from `free_port`, which another process can take before keygate binds them
    /// (an outgoing connection's ephemeral port, say): keygate then exits saying it cannot
    /// listen, and it is started again on new ports, up to three times in all.
    pub async fn start_raw(db: &TestDb, toml: impl Fn(u16, u16) -> String) -> Gateway {
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tmp");
            let config = dir.path().join("keygate.toml");
            let (port, admin_port) = (free_port(), free_port());
            let mut text = toml(port, admin_port);
            private_spool(&mut text, dir.path());
            std::fs::write(&config, text).expect("write config");
            if let Some(gw) = Self::start_with(db, config, port, admin_port, dir).await {
                return gw;
            }
        }
        panic!("keygate could not listen on free ports three times running");
    }

    /// `None` when keygate exited because a port was taken.
    async fn start_with(
        db: &TestDb,
        config: std::path::PathBuf,
        port: u16,
        admin_port: u16,
        dir: tempfile::TempDir,
    ) -> Option<Gateway> {
        // Logs go to a file the test can read (and to the terminal with KEYGATE_TEST_LOGS).
        let log = dir.path().join("keygate.log");
        let stderr = if std::env::var_os("KEYGATE_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::from(std::fs::File::create(&log).expect("log file"))
        };
        let spool = std::fs::read_to_string(&config).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("spool_dir"))
                .and_then(|rest| rest.split('"').nth(1))
                .map(std::path::PathBuf::from)
        });
        let child = db
            .command(&["serve", "--config", config.to_str().expect("utf8 path")])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn keygate serve");
        let mut gw = Gateway {
            proc: Proc { child, name: "keygate" },
            port,
            admin_port,
            config,
            log,
            spool,
            _dir: dir,
        };
        // Ready means the change listener has connected and done its first resync, which
        // invalidates the cache: traffic before that would race it. keygate binds its main
        // port before the admin one, so a ready answer also means the main port is open.
        let start = Instant::now();
        loop {
            let url = format!("http://127.0.0.1:{}/readyz", gw.admin_port);
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), try_get(&url)).await {
                if resp.contains("\"notify_listener\":\"ok\"") {
                    break;
                }
            }
            // A port was taken before keygate bound it: keygate has gone, try new ones.
            if gw.port_taken() {
                return None;
            }
            // Fail here, not later in a confusing assertion. 40 s covers a slow start on a
            // busy machine: the database checks before the ports bind, then the resync.
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "keygate never became ready; its log:\n{}",
                gw.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(gw)
    }

    /// Whether keygate has exited because it could not listen on a port; any other exit
    /// this early fails the test with its log.
    fn port_taken(&mut self) -> bool {
        let Ok(Some(status)) = self.proc.child.try_wait() else {
            return false;
        };
        let log = self.logs();
        assert!(
            log.contains("cannot listen on"),
            "keygate exited ({status}) before it was ready; its log:\n{log}"
        );
        true
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once lines buffered in the process have had time to reach the file: for
    /// checks that something is *not* logged.
    pub async fn flushed_logs(&self) -> String {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.logs()
    }

    /// Waits until the log holds `needle`: info lines reach the file within 100 ms, not at once.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The contents of every file in this gateway's spool directory.
    pub fn spool_texts(&self) -> Vec<String> {
        let Some(dir) = &self.spool else { return Vec::new() };
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Auth statistics as reported by /readyz on the admin listener.
    pub async fn ready_json(&self) -> serde_json::Value {
        let r = get(&format!("http://127.0.0.1:{}/readyz", self.admin_port), &[]).await;
        serde_json::from_slice(&r.body).expect("readyz json")
    }
}

/// Each gateway spools into its own directory unless the test chose one: a shared
/// spool would replay one test's rows into another test's database.
fn private_spool(text: &mut String, dir: &std::path::Path) {
    if text.contains("spool_dir") {
        return;
    }
    let spool = format!("spool_dir = \"{}\"\n", dir.join("spool").display());
    match text.find("[usage]\n") {
        Some(i) => text.insert_str(i + "[usage]\n".len(), &spool),
        None => text.push_str(&format!("\n[usage]\n{spool}")),
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A plain-text HTTP/2 client with prior knowledge (h2c, no upgrade).
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = client()
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn try_get(url: &str) -> Result<String, hyper_util::client::legacy::Error> {
    let req = Request::get(url).body(Full::new(Bytes::new())).expect("request");
    let resp = client().request(req).await?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send(Method::GET, url, headers, Bytes::new()).await
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    send(Method::POST, url, headers, Bytes::copy_from_slice(body.as_bytes())).await
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}
