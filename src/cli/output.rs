//! Aligned plain-text tables and JSON for listings.

use std::io::Write;

use serde::Serialize;

use super::{CliError, Format};

/// Prints rows as an aligned table (header first) or as a JSON array of `items`.
pub fn print<T: Serialize>(
    format: Format,
    header: &[&str],
    rows: Vec<Vec<String>>,
    items: &[T],
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, items).map_err(|e| CliError::Io(e.into()))?;
            writeln!(out)?;
        }
        Format::Table => {
            let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: &mut dyn Iterator<Item = &str>| {
                let parts: Vec<String> = cells.zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                parts.join("  ").trim_end().to_string()
            };
            writeln!(out, "{}", line(&mut header.iter().copied()))?;
            for row in &rows {
                writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
            }
        }
    }
    Ok(())
}

pub fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or_else(|| "-".to_string(), |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
}
