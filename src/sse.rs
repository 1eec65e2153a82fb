//! Server-sent events, parsed incrementally: bytes may be split at any boundary (inside a line, inside
//! a UTF-8 sequence, between `\r` and `\n`); events come out exactly as if the stream arrived whole.

#[allow(unused_imports)]
use crate::prelude::*;

/// Position of the first `a` or `b` in `hay`, eight bytes at a time while there is none (the filter
/// is built for size, so a byte-by-byte `position` is a call per byte).
pub(crate) fn find2(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero when a byte of `v` is zero (exact for the lowest such byte, which is all that counts:
    // the chunk is then scanned byte by byte).
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let (pa, pb) = (ONES * u64::from(a), ONES * u64::from(b));
    let mut i = 0;
    for chunk in hay.chunks_exact(8) {
        let v = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
        if zero(v ^ pa) | zero(v ^ pb) != 0 {
            break;
        }
        i += 8;
    }
    let tail = hay.get(i..)?;
    Some(i + tail.iter().position(|&c| c == a || c == b)?)
}

/// One event: the `event:` field (if any) and the `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// The most bytes one event may hold (its unfinished line plus its data lines). A larger event is
/// skipped (never buffered): its bytes still reach the client untouched, the parser only stops
/// reading it and reports [`SseParser::overflowed`]. Real chat events are a few hundred bytes.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Incremental parser. Holds only the unfinished tail of the stream, at most `max_event` bytes.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    /// Bytes held for the current event.
    held: usize,
    has_data: bool,
    /// The previous chunk ended in `\r`: a leading `\n` in the next chunk belongs to it.
    pending_cr: bool,
    max_event: usize,
    /// The current event passed the bound: skip it up to its blank line.
    skipping: bool,
    /// While skipping: the current line is not empty.
    skipped_line: bool,
    /// Events skipped because they passed the bound.
    pub skipped: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_limit(max_event: usize) -> Self {
        SseParser {
            line: Vec::new(),
            event: None,
            data: Vec::new(),
            held: 0,
            has_data: false,
            pending_cr: false,
            max_event,
            skipping: false,
            skipped_line: false,
            skipped: 0,
        }
    }

    /// Some event was larger than the bound and was not parsed.
    pub fn overflowed(&self) -> bool {
        self.skipped > 0
    }

    /// Feeds bytes; returns the events completed by them. Runs of line bytes are copied at once (the
    /// line breaks are found with one scan), not byte by byte.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            if self.pending_cr && !rest.is_empty() {
                self.pending_cr = false;
                if let Some(after) = rest.strip_prefix(b"\n") {
                    rest = after;
                    continue;
                }
            }
            let brk = find2(rest, b'\n', b'\r');
            let run = match brk {
                Some(i) => rest.get(..i).unwrap_or_default(),
                None => rest,
            };
            if !run.is_empty() {
                if self.skipping {
                    self.skipped_line = true;
                } else if self.held.saturating_add(run.len()) > self.max_event {
                    self.skip();
                } else {
                    self.line.extend_from_slice(run);
                    self.held += run.len();
                }
            }
            let Some(i) = brk else { break };
            if rest.get(i) == Some(&b'\r') {
                self.pending_cr = true;
            }
            self.end_line(&mut out);
            rest = rest.get(i + 1..).unwrap_or_default();
        }
        out
    }

    /// End of stream: a final event without its blank line still counts.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut out);
        }
        self.dispatch(&mut out);
        out
    }

    /// Drops what is held of the current event and ignores the rest of it.
    fn skip(&mut self) {
        self.skipping = true;
        self.skipped_line = true;
        self.skipped += 1;
        self.line = Vec::new();
        self.data = Vec::new();
        self.event = None;
        self.has_data = false;
        self.held = 0;
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        if self.skipping {
            // Only a blank line ends the skipped event.
            if !core::mem::take(&mut self.skipped_line) {
                self.skipping = false;
            }
            return;
        }
        if self.line.is_empty() {
            self.dispatch(out);
            return;
        }
        if self.line.first() == Some(&b':') {
            self.line.clear();
            return; // comment
        }
        // The line buffer keeps its capacity from line to line; valid UTF-8 is not copied here (and
        // checked by `from_utf8`, much cheaper than the lossy decoder, which only handles the rest).
        let text = match core::str::from_utf8(&self.line) {
            Ok(s) => alloc::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(&self.line),
        };
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                self.data.push(value.to_string());
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        self.line.clear();
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if self.has_data {
            out.push(SseEvent {
                event,
                data: match self.data.len() {
                    1 => self.data.pop().unwrap_or_default(),
                    _ => self.data.join("\n"),
                },
            });
        }
        self.data.clear();
        self.has_data = false;
        self.held = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b": keep-alive\r\nevent: message_start\r\ndata: {\"a\":\"\xc3\xa9\"}\r\n\r\ndata: line1\ndata: line2\n\nevent: ping\ndata:\n\ndata: [DONE]\n\n";

    fn whole() -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut v = p.push(STREAM);
        v.extend(p.finish());
        v
    }

    #[test]
    fn find2_finds_the_first_of_two_bytes() {
        for len in 0..40 {
            for at in 0..len {
                for other in [None, Some(at + 1), Some(at + 9)] {
                    let mut s = vec![b'x'; len];
                    s[at] = b'\r';
                    if let Some(o) = other.filter(|&o| o < len) {
                        s[o] = b'\n';
                    }
                    assert_eq!(find2(&s, b'\n', b'\r'), Some(at));
                    assert_eq!(find2(&s, b'\r', b'\r'), Some(at));
                }
            }
            assert_eq!(find2(&vec![0x80; len], b'\n', 0), None);
        }
        // A byte just above a match does not hide it, nor does one below it make a false one.
        assert_eq!(find2(b"\x01\x00abcdefgh", 0, 0), Some(1));
        assert_eq!(find2(b"abcdefg\x01\x02ij", 0, 1), Some(7));
    }

    #[test]
    fn parses_events() {
        let v = whole();
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[0],
            SseEvent {
                event: Some("message_start".into()),
                data: "{\"a\":\"é\"}".into()
            }
        );
        assert_eq!(v[1].data, "line1\nline2");
        assert_eq!(
            v[2],
            SseEvent {
                event: Some("ping".into()),
                data: String::new()
            }
        );
        assert_eq!(v[3].data, "[DONE]");
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let expected = whole();
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let mut p = SseParser::new();
                let mut v = p.push(&STREAM[..i]);
                v.extend(p.push(&STREAM[i..j]));
                v.extend(p.push(&STREAM[j..]));
                v.extend(p.finish());
                assert_eq!(v, expected, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn an_event_past_the_bound_is_skipped_not_buffered() {
        let mut p = SseParser::with_limit(64);
        let mut input = b"data: small\n\ndata: ".to_vec();
        input.extend(core::iter::repeat_n(b'x', 10_000));
        input.extend_from_slice(b"\ndata: more\n\ndata: after\n\n");
        let mut v = Vec::new();
        for c in input.chunks(7) {
            v.extend(p.push(c));
            assert!(p.line.len() <= 64 && p.held <= 64);
        }
        v.extend(p.finish());
        let data: Vec<_> = v.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["small", "after"]);
        assert!(p.overflowed());
        assert_eq!(p.skipped, 1);
    }

    #[test]
    fn many_data_lines_count_toward_the_bound() {
        let mut p = SseParser::with_limit(100);
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(b"data: 0123456789\n");
        }
        input.extend_from_slice(b"\ndata: ok\n\n");
        let v = p.push(&input);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].data, "ok");
    }

    #[test]
    fn unterminated_final_event() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: x").is_empty());
        assert_eq!(
            p.finish(),
            vec![SseEvent {
                event: None,
                data: "x".into()
            }]
        );
    }
}
