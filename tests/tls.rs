//! TLS on the main listener, with a CA and certificate made at test time: real TLS
//! clients reach the demo upstream through keygate (HTTP/1.1 and h2 by ALPN), plain
//! HTTP is refused, a silent handshake is cut off, shutdown drains TLS connections, and
//! a bad certificate path stops `check-config` and `serve` with the key named.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;

use common::net::*;
use common::*;

/// A throwaway CA and a server certificate it signed for `localhost` and 127.0.0.1.
struct TestCerts {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
}

impl TestCerts {
    fn new() -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "keygate test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let dir = tempfile::tempdir().expect("tmp");
        // The chain as servers usually get it: leaf first, then the issuer.
        std::fs::write(dir.path().join("chain.pem"), format!("{}{}", leaf.pem(), ca.pem())).expect("write");
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).expect("write");
        TestCerts {
            ca: ca.der().clone(),
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn toml(&self) -> String {
        format!(
            "[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
            self.path("chain.pem"),
            self.path("key.pem")
        )
    }

    /// A complete gateway config with TLS and the given `[server]` extras.
    fn gateway_toml(&self, port: u16, admin: u16, upstream: u16, server_extra: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_grace = \"10s\"\n\
             {server_extra}\n{}\n[upstream]\nurl = \"http://127.0.0.1:{upstream}\"\n",
            self.toml()
        )
    }

    /// A client trusting only the test CA; `h2` offers h2 by ALPN as well as http/1.1.
    fn client(&self, h2: bool) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("add test CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.build()
        };
        Client::builder(TokioExecutor::new()).build(connector)
    }
}

async fn chat(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: &str,
    key: &str,
) -> (StatusCode, Version, serde_json::Value) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("authorization", bearer(key))
        .body(Full::new(Bytes::from_static(br#"{"message": "Hello over TLS"}"#)))
        .expect("request");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("TLS request to {url}: {e:?}"));
    let (status, version) = (resp.status(), resp.version());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, version, serde_json::from_slice(&body).expect("json body"))
}

#[tokio::test]
async fn a_tls_client_reaches_the_upstream_and_plain_http_is_refused() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let certs = TestCerts::new();
    let gw = Gateway::start(&db, up.port, &certs.toml()).await;
    let client = certs.client(false);
    for host in ["localhost", "127.0.0.1"] {
        let (status, version, body) = chat(&client, &format!("https://{host}:{}/chat", gw.port), &key).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(version, Version::HTTP_11);
        assert_eq!(body["reply"], "echo: Hello over TLS", "the demo upstream answered");
    }
    let plain = Request::get(gw.url("/healthz"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = tokio::time::timeout(Duration::from_secs(10), common::net::client().request(plain))
        .await
        .expect("a plain request is answered or cut off, not left hanging");
    assert!(
        answer.is_err(),
        "plain HTTP on the TLS port got {:?}",
        answer.map(|r| r.status())
    );
    assert!(gw.wait_log("tls=true", Duration::from_secs(5)).await, "{}", gw.logs());
    // Probes, scrapers and `keygate healthcheck` keep speaking plain HTTP to the admin listener.
    assert_eq!(gw.ready_json().await["status"], "ready");
    let probe = db.keygate(&["healthcheck", "--config", gw.config.to_str().expect("utf8")]);
    assert!(probe.status.success(), "{}", stderr(&probe));
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn_when_http2_is_on() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let certs = TestCerts::new();
    let gw = Gateway::start_raw(&db, |port, admin| {
        certs.gateway_toml(port, admin, up.port, "http2 = true")
    })
    .await;
    let url = format!("https://localhost:{}/chat", gw.port);
    let (status, version, body) = chat(&certs.client(true), &url, &key).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2), "{body}");
    assert_eq!(body["reply"], "echo: Hello over TLS");
    let (status, version, _) = chat(&certs.client(false), &url, &key).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_11));
}

#[tokio::test]
async fn a_silent_handshake_is_cut_off_and_frees_its_connection_slot() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&[]).await;
    let certs = TestCerts::new();
    let server = "max_connections = 1\nheader_read_timeout = \"1s\"";
    let gw = Gateway::start_raw(&db, |port, admin| certs.gateway_toml(port, admin, up.port, server)).await;
    // Connects and never says hello: it holds the only slot until the timeout.
    let mut silent = tokio::net::TcpStream::connect(gw.addr()).await.expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf))
        .await
        .expect("the server closes a silent handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "got {read:?}");
    let (status, _, _) = chat(
        &certs.client(false),
        &format!("https://localhost:{}/chat", gw.port),
        &key,
    )
    .await;
    assert_eq!(status, 200, "the slot was given back");
}

#[tokio::test]
async fn sigterm_lets_an_open_tls_stream_finish() {
    let (db, key) = seeded_db().await;
    let up = Upstream::start(&["--stream-interval", "100ms"]).await;
    let certs = TestCerts::new();
    let mut gw = Gateway::start(&db, up.port, &certs.toml()).await;
    let client = certs.client(false);
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("https://localhost:{}/v1/chat/completions", gw.port))
        .header("authorization", bearer(&key))
        .body(Full::new(Bytes::from_static(
            br#"{"model": "m", "stream": true, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}"#,
        )))
        .expect("request");
    let stream = tokio::spawn(async move {
        let resp = client.request(req).await.expect("stream starts");
        let status = resp.status();
        (
            status,
            resp.into_body().collect().await.expect("whole stream").to_bytes(),
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = gw
        .proc
        .terminate(Duration::from_secs(15))
        .expect("exits after draining");
    assert!(status.success());
    let (code, body) = stream.await.expect("join");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_bad_certificate_path_is_named_by_check_config_and_serve() {
    let db = fresh_db().await;
    let certs = TestCerts::new();
    let config = certs.dir.path().join("keygate.toml");
    let text = format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        certs.path("missing.pem"),
        certs.path("key.pem")
    );
    std::fs::write(&config, text).expect("write");
    let path = config.to_str().expect("utf8");
    for args in [["check-config", "--config", path], ["serve", "--config", path]] {
        let out = db.keygate(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains("config key `server.tls.cert_path`"), "{args:?}: {err}");
        assert!(err.contains("missing.pem"), "{err}");
    }
    let good = config.with_file_name("good.toml");
    std::fs::write(
        &good,
        format!("[upstream]\nurl = \"http://127.0.0.1:1\"\n{}", certs.toml()),
    )
    .expect("write");
    let out = db.keygate(&["check-config", "--config", good.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
}
