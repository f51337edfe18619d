//! Incremental `text/event-stream` framing for the token meter.
//!
//! Owns the SSE line grammar (LF, CRLF and lone CR line ends, a CR/LF pair split across
//! chunks, an optional leading BOM, `:` comments, `field:value` with one optional space,
//! blank lines ending events) and routes each event's `data` bytes, multi-line data joined
//! with `\n` as the spec says, straight into a [`JsonScan`] without buffering the event.
//! Memory is therefore constant per stream: an event of any size costs only the scanner's
//! bounded capture, and a malformed or oversized event is forgotten at the next blank line.
//! It does not interpret the JSON (the meter's sink does) and ignores `event`, `id` and
//! `retry`, which carry nothing about tokens.
//!
//! One deliberate difference from a browser's EventSource: a value completed inside an
//! event counts even if the stream stops before that event's blank line, so a stream cut
//! just after its usage arrived is still billed.

use super::json_scan::{Field, JsonScan};

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
const DATA: &[u8] = b"data";

/// Where in the current line the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Start of the stream: this many bytes of a UTF-8 BOM matched so far.
    Bom(u8),
    Start,
    /// In a field name; `matched` bytes equal the start of "data" and `other` when it cannot be "data".
    Name {
        matched: u8,
        other: bool,
    },
    /// Just after `data:`; one space may follow and is not part of the value.
    DataStart,
    Data,
    /// A comment or a field we ignore, up to the end of the line.
    Skip,
}

#[derive(Debug)]
pub(crate) struct SseScan {
    line: Line,
    /// The last byte was CR: an LF right after it (maybe in the next chunk) ends no new line.
    after_cr: bool,
    /// The current event already had a data line, so the next one is joined with `\n`.
    event_has_data: bool,
    json: JsonScan,
}

fn is_eol(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

impl SseScan {
    pub(crate) fn new(wanted: &'static [Field]) -> Self {
        Self {
            line: Line::Bom(0),
            after_cr: false,
            event_has_data: false,
            json: JsonScan::new(wanted),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.json.heap_bytes()
    }

    pub(crate) fn feed<F: FnMut(Field, &[u8])>(&mut self, chunk: &[u8], sink: &mut F) {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                i += 1;
                continue;
            }
            if !is_eol(b) && matches!(self.line, Line::Data | Line::Skip) {
                // Whole runs up to the line end: the scanner (or nothing) takes them at once.
                let rest = chunk.get(i..).unwrap_or_default();
                // memchr2: a data line is a whole JSON chunk, long enough to pay for it.
                let run = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
                if self.line == Line::Data {
                    self.json.feed(rest.get(..run).unwrap_or_default(), sink);
                }
                i += run;
                continue;
            }
            self.byte(b, sink);
            i += 1;
        }
    }

    fn byte<F: FnMut(Field, &[u8])>(&mut self, b: u8, sink: &mut F) {
        if is_eol(b) {
            self.after_cr = b == b'\r';
            self.end_line(sink);
            return;
        }
        match self.line {
            Line::Bom(n) => {
                if BOM.get(usize::from(n)) == Some(&b) {
                    self.line = if usize::from(n) + 1 == BOM.len() {
                        Line::Start
                    } else {
                        Line::Bom(n + 1)
                    };
                } else {
                    // No BOM after all. A partial one is part of a field name that can no
                    // longer be "data"; either way this byte is re-read in the new state.
                    self.line = if n == 0 {
                        Line::Start
                    } else {
                        Line::Name {
                            matched: 0,
                            other: true,
                        }
                    };
                    self.byte(b, sink);
                }
            }
            Line::Start if b == b':' => self.line = Line::Skip,
            Line::Start => {
                self.line = Line::Name {
                    matched: 0,
                    other: false,
                };
                self.byte(b, sink);
            }
            Line::Name { matched, other } => {
                let is_data = !other && usize::from(matched) == DATA.len();
                if b == b':' {
                    if is_data {
                        self.begin_data(sink);
                        self.line = Line::DataStart;
                    } else {
                        self.line = Line::Skip;
                    }
                } else if !other && DATA.get(usize::from(matched)) == Some(&b) {
                    self.line = Line::Name {
                        matched: matched + 1,
                        other,
                    };
                } else {
                    self.line = Line::Name { matched, other: true };
                }
            }
            Line::DataStart => {
                self.line = Line::Data;
                if b != b' ' {
                    self.json.feed(&[b], sink);
                }
            }
            Line::Data => self.json.feed(&[b], sink),
            Line::Skip => {}
        }
    }

    fn end_line<F: FnMut(Field, &[u8])>(&mut self, sink: &mut F) {
        match self.line {
            // A blank line (also one at the very start) ends the event.
            Line::Start | Line::Bom(0) => {
                self.json.reset();
                self.event_has_data = false;
            }
            // A bare `data` line is a data field with an empty value.
            Line::Name { matched, other: false } if usize::from(matched) == DATA.len() => self.begin_data(sink),
            _ => {}
        }
        self.line = Line::Start;
    }

    fn begin_data<F: FnMut(Field, &[u8])>(&mut self, sink: &mut F) {
        if self.event_has_data {
            self.json.feed(b"\n", sink);
        }
        self.event_has_data = true;
    }
}
