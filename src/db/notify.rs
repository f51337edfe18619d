//! Change notifications: a dedicated session that LISTENs on `keygate_changes` and hands
//! the payloads on as plain [`Change`] values.
//!
//! Owns the LISTEN session (its connection, its application name, driving it) and the
//! payload format written by migration 4's triggers. It does not decide what a change
//! means for a cache, and it does not reconnect: when the session ends, [`ChangeListener::recv`]
//! returns `None` and the caller decides how to resynchronise, because anything sent
//! while nobody listened is lost for good.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

use super::{mask_url, pg_config, root_cause, DbError};
use crate::config::DatabaseConfig;

/// The channel migration 4's triggers notify on.
pub const CHANNEL: &str = "keygate_changes";

/// The listening session's `application_name`, so operators (and tests) can find it in
/// `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "keygate-listen";

/// Notifications buffered between the session and its consumer. When full, the session
/// stops reading from the socket and Postgres queues the rest server-side.
const BUFFER: usize = 1024;

/// One committed change to a row the auth cache depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An `api_keys` row was inserted, changed in a way that matters, or deleted.
    Key { id: Uuid, organization_id: Option<Uuid> },
    /// An `organizations` row was inserted, changed or deleted.
    Organization { id: Uuid },
    /// A notification on our channel that names no single row (a TRUNCATE) or that this
    /// build cannot read: everything cached may be stale.
    Everything,
}

#[derive(Deserialize)]
struct Payload<'a> {
    table: &'a str,
    id: Option<Uuid>,
    organization_id: Option<Uuid>,
}

impl Change {
    /// Reads a trigger payload. Never fails: anything unexpected widens to `Everything`,
    /// because dropping a notification could leave a revoked key cached.
    pub fn parse(payload: &str) -> Change {
        match serde_json::from_str::<Payload<'_>>(payload) {
            Ok(Payload {
                table: "api_keys",
                id: Some(id),
                organization_id,
            }) => Change::Key { id, organization_id },
            Ok(Payload {
                table: "organizations",
                id: Some(id),
                ..
            }) => Change::Organization { id },
            _ => Change::Everything,
        }
    }
}

/// A live LISTEN session. Dropping it ends the session.
pub struct ChangeListener {
    client: Client,
    events: mpsc::Receiver<Change>,
    /// Masked, for error messages.
    url: String,
}

impl ChangeListener {
    /// The next change, in commit order. `None` once the session has ended (connection
    /// lost, server shut down, backend terminated).
    pub async fn recv(&mut self) -> Option<Change> {
        self.events.recv().await
    }

    /// A change already received, without waiting.
    pub fn try_recv(&mut self) -> Option<Change> {
        self.events.try_recv().ok()
    }

    /// A round trip on the listening session. A half-open TCP connection never reports
    /// itself; this does, so the caller can resync instead of waiting for silence.
    pub async fn ping(&self, timeout: Duration) -> Result<(), DbError> {
        match tokio::time::timeout(timeout, self.client.simple_query("SELECT 1")).await {
            Ok(r) => r.map(|_| ()).map_err(DbError::from),
            Err(_) => Err(DbError::Unreachable {
                url: self.url.clone(),
                reason: "listen session ping timed out".into(),
            }),
        }
    }
}

/// Opens a dedicated session and LISTENs on [`CHANNEL`].
///
/// `db::connect` cannot be used here: it drives its connection with the `Future` impl,
/// which discards notifications. This drives it with `poll_message` instead.
pub async fn listen(cfg: &DatabaseConfig) -> Result<ChangeListener, DbError> {
    let mut pg = pg_config(cfg)?;
    pg.application_name(APPLICATION_NAME);
    let (client, mut conn) = tokio::time::timeout(cfg.connect_timeout + Duration::from_millis(500), pg.connect(NoTls))
        .await
        .map_err(|_| DbError::Unreachable {
            url: mask_url(&cfg.url),
            reason: "timed out".into(),
        })?
        .map_err(|e| DbError::Unreachable {
            url: mask_url(&cfg.url),
            reason: root_cause(&e),
        })?;
    let (tx, events) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        // Ends when the server closes the session, on an I/O error, or when the client
        // and the receiver are dropped; dropping `tx` then tells the consumer.
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                    if tx.send(Change::parse(n.payload())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "listen session ended");
                    break;
                }
                None => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(ChangeListener {
        client,
        events,
        url: mask_url(&cfg.url),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_map_to_changes_and_anything_odd_widens() {
        let k = Uuid::now_v7();
        let o = Uuid::now_v7();
        assert_eq!(
            Change::parse(&format!(
                r#"{{"table":"api_keys","op":"UPDATE","id":"{k}","organization_id":"{o}"}}"#
            )),
            Change::Key {
                id: k,
                organization_id: Some(o)
            }
        );
        assert_eq!(
            Change::parse(&format!(r#"{{"table":"organizations","op":"DELETE","id":"{o}"}}"#)),
            Change::Organization { id: o }
        );
        for odd in [
            r#"{"table":"api_keys","op":"TRUNCATE"}"#,
            r#"{"table":"something_else","id":"00000000-0000-0000-0000-000000000000"}"#,
            "not json",
            "",
        ] {
            assert_eq!(Change::parse(odd), Change::Everything, "{odd}");
        }
    }
}
