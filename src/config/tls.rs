//! `[server.tls]`: the main listener's certificate chain and private key, read and
//! checked once at load into a ready rustls server config.
//!
//! Owns reading the PEM files, pairing key and certificate, and the protocol and ALPN
//! choices. It does not own the handshake or its timeout (`proxy::listener`), and it is
//! not used for the upstream side (`proxy::forward`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::raw::RawTls;
use super::ConfigError;

const CERT_KEY: &str = "server.tls.cert_path";
const KEY_KEY: &str = "server.tls.key_path";

/// A validated `[server.tls]`: the paths as configured and the rustls config built from
/// what they held at load time.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// SHA-256 over both files as read, so a reload can tell a renewed certificate at
    /// the same path from an unchanged one.
    pub fingerprint: [u8; 32],
    pub server_config: Arc<rustls::ServerConfig>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path && self.key_path == other.key_path && self.fingerprint == other.fingerprint
    }
}

impl std::fmt::Debug for TlsSettings {
    // The key material stays out of every printed config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// `None` when `[server.tls]` is absent: the listener speaks plain HTTP.
pub(super) fn tls(raw: Option<RawTls>, http2: bool) -> Result<Option<TlsSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let cert_path = path(CERT_KEY, raw.cert_path)?;
    let key_path = path(KEY_KEY, raw.key_path)?;
    let cert_pem = read(CERT_KEY, &cert_path)?;
    let key_pem = read(KEY_KEY, &key_path)?;

    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::invalid(CERT_KEY, format!("{} is not valid PEM: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            CERT_KEY,
            format!("{} holds no PEM certificate", cert_path.display()),
        ));
    }
    // PKCS#8, PKCS#1 (RSA) or SEC1 (EC), whichever the file holds first.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ConfigError::invalid(
            KEY_KEY,
            format!("{} holds no usable PEM private key: {e}", key_path.display()),
        )
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| ConfigError::invalid(KEY_KEY, format!("{} is not a usable key: {e}", key_path.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("server.tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => ConfigError::invalid(
                KEY_KEY,
                format!(
                    "{} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
            ),
            other => ConfigError::invalid(CERT_KEY, format!("{}: {other}", cert_path.display())),
        })?;
    // ALPN is how a TLS client picks h2; offering it while h2 is off would strand clients.
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };

    let mut hash = Sha256::new();
    hash.update(&cert_pem);
    hash.update(&key_pem);
    Ok(Some(TlsSettings {
        cert_path,
        key_path,
        fingerprint: hash.finalize().into(),
        server_config: Arc::new(config),
    }))
}

fn path(key: &str, v: Option<String>) -> Result<PathBuf, ConfigError> {
    match v {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(ConfigError::invalid(key, "is required when [server.tls] is present")),
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    /// The rules' error cases are in `config::tests::each_rule_names_its_key`.
    #[test]
    fn h2_is_offered_only_when_http2_is_on_and_debug_hides_the_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("test certificate");
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, pair.cert.pem()).expect("write");
        std::fs::write(&key, pair.signing_key.serialize_pem()).expect("write");
        let parse = |h2: bool| {
            let text = format!(
                "[server]\nhttp2 = {h2}\n[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"",
                cert.display(),
                key.display()
            );
            let env = |n: &str| (n == "DATABASE_URL").then(|| "postgres://u@h/db".to_string());
            Config::parse_with_env(&text, std::path::Path::new("t.toml"), &env).expect("valid")
        };
        let alpn = |h2| parse(h2).server.tls.expect("tls").server_config.alpn_protocols.clone();
        assert_eq!(alpn(true), [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(alpn(false), [b"http/1.1".to_vec()]);
        let shown = format!("{:?}", parse(true));
        assert!(shown.contains("cert_path") && !shown.contains("PRIVATE KEY"), "{shown}");
    }
}
