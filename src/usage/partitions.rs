//! Partition upkeep for the usage writer: before rows of a month are written, that
//! month's partition of `api_key_usage` is made (once per month per process).
//!
//! Owns only the bookkeeping of which months are done; the statement is
//! `db::usage::ensure_partition`'s. Rows of a month without a partition land in the
//! default partition, so this is an optimisation: no failure here loses a row.

use std::time::Duration;

use super::writer::Writer;
use crate::db::usage::{self as sql, UsageWriteError};
use crate::limits::window;

impl Writer {
    /// Makes the partitions of the months containing `times` (epoch ms). Rows of a
    /// month without one go to the default partition, so failures only cost speed.
    pub(super) async fn ensure_months(&mut self, times: impl IntoIterator<Item = i64>, limit: Duration) {
        let mut todo = Vec::new();
        let mut last = (0, 0);
        for ms in times {
            if ms >= last.0 && ms < last.1 {
                continue;
            }
            last = window::month_bounds(ms);
            if !self.months.contains(&last.0) && !todo.contains(&last.0) {
                todo.push(last.0);
            }
        }
        for month in todo {
            let Some(at) = chrono::DateTime::from_timestamp_millis(month) else {
                continue;
            };
            match sql::ensure_partition(&self.pool, at, limit).await {
                Ok(name) => {
                    tracing::debug!(partition = %name, "usage partition ready");
                    self.months.insert(month);
                }
                Err(UsageWriteError::Db(e)) if !e.is_unavailable() => {
                    // Refused (a role without CREATE, say): asking again every batch
                    // would not change the answer.
                    tracing::warn!(error = %e, month = %at, "cannot create usage partition; rows go to the default partition");
                    self.months.insert(month);
                }
                Err(e) => tracing::debug!(error = %e, "cannot create usage partition now"),
            }
        }
    }
}
