//! The binary COPY stream of a batch of usage rows, encoded by hand.
//!
//! Why: tokio-postgres's `BinaryCopyInWriter` takes each row as seventeen `&dyn ToSql`,
//! checks every value's type, and awaits a flush of the connection every 4 KiB. Under
//! callgrind that was about 3,800 instructions per usage row. Here the columns' types
//! are fixed by the two COPY statements (`usage` and `usage_direct`, which share the
//! column order), so each value is written straight into one buffer, and the buffer
//! goes to the connection in 64 KiB pieces without a flush in between.
//!
//! Owns PostgreSQL's `COPY … (FORMAT binary)` framing (signature, flags, per-row field
//! count, length-prefixed values, trailer) and the binary form of each column's type.
//! It does not know which table the stream goes to, or send any statement.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::CopyInSink;

use super::usage::Cleaned;
use super::usage_direct::Micros;
use crate::usage::UsageRecord;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Columns per row, in the COPY statements' order.
const COLUMNS: i16 = 17;

/// Bytes gathered before a piece is handed to the connection.
const PIECE: usize = 64 * 1024;

/// PostgreSQL's epoch (2000-01-01T00:00:00Z) in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// How the cost column is typed in the receiving table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CostColumn {
    /// The staging table's `int8` micro-dollars.
    Micros,
    /// `api_key_usage.cost_usd`, `numeric(12,6)`.
    Numeric,
}

/// Writes `rows` into an open COPY and completes it; returns the rows PostgreSQL took.
pub(super) async fn copy_rows(
    sink: CopyInSink<Bytes>,
    rows: &[UsageRecord],
    cost: CostColumn,
) -> Result<u64, tokio_postgres::Error> {
    let mut sink = std::pin::pin!(sink);
    let mut enc = Encoder::new(cost);
    for r in rows {
        enc.row(r);
        if enc.buf.len() >= PIECE {
            sink.as_mut().feed(enc.buf.split().freeze()).await?;
        }
    }
    sink.as_mut().feed(enc.finish()).await?;
    sink.as_mut().finish().await
}

/// The stream being built: header first, rows after, trailer on [`Encoder::finish`].
struct Encoder {
    buf: BytesMut,
    cost: CostColumn,
}

impl Encoder {
    fn new(cost: CostColumn) -> Encoder {
        let mut buf = BytesMut::with_capacity(PIECE + 4096);
        buf.put_slice(SIGNATURE);
        buf.put_i32(0); // flags: no OIDs
        buf.put_i32(0); // header extension length
        Encoder { buf, cost }
    }

    fn row(&mut self, r: &UsageRecord) {
        let c = Cleaned::new(r);
        let b = &mut self.buf;
        b.put_i16(COLUMNS);
        for id in [r.id, r.api_key_id, r.organization_id] {
            b.put_i32(16);
            b.put_slice(id.as_bytes());
        }
        b.put_i32(8);
        b.put_i64(r.timestamp.timestamp_micros().saturating_sub(PG_EPOCH_MICROS));
        text(b, Some(&c.endpoint));
        text(b, Some(&c.method));
        int4(b, Some(r.status_code));
        int4(b, Some(r.response_time_ms));
        int4(b, r.prompt_tokens);
        int4(b, r.completion_tokens);
        int4(b, r.tokens_used);
        match (r.cost_micros, self.cost) {
            (None, _) => b.put_i32(-1),
            (Some(m), CostColumn::Micros) => {
                b.put_i32(8);
                b.put_i64(m);
            }
            (Some(m), CostColumn::Numeric) => {
                let at = b.len();
                b.put_i32(0);
                Micros(m).encode(b);
                set_len(b, at);
            }
        }
        text(b, c.model.as_deref());
        text(b, c.ip());
        text(b, c.agent.as_deref());
        text(b, c.code.as_deref());
        text(b, c.message.as_deref());
    }

    fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

fn text(b: &mut BytesMut, v: Option<&str>) {
    match v {
        // Cleaned values are cut to their columns, and `error_message` is short by
        // construction; the cut to `i32::MAX` only keeps the framing true whatever comes.
        Some(s) => {
            let s = s.as_bytes();
            let s = s.get(..s.len().min(i32::MAX as usize)).unwrap_or_default();
            b.put_i32(s.len() as i32);
            b.put_slice(s);
        }
        None => b.put_i32(-1),
    }
}

fn int4(b: &mut BytesMut, v: Option<i32>) {
    match v {
        Some(n) => {
            b.put_i32(4);
            b.put_i32(n);
        }
        None => b.put_i32(-1),
    }
}

/// Writes the length of the value that starts after the 4-byte slot at `at`.
fn set_len(b: &mut BytesMut, at: usize) {
    let len = i32::try_from(b.len() - at - 4).unwrap_or(i32::MAX);
    if let Some(slot) = b.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}
