//! Server-sent events, parsed incrementally: bytes may be split at any boundary (inside a line, inside
//! a UTF-8 sequence, between `\r` and `\n`); events come out exactly as if the stream arrived whole.

/// One event: the `event:` field (if any) and the `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Incremental parser. Holds only the unfinished tail of the stream.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    has_data: bool,
    /// The previous chunk ended in `\r`: a leading `\n` in the next chunk belongs to it.
    pending_cr: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.pending_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.line.push(b),
            }
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

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.first() == Some(&b':') {
            return; // comment
        }
        let text = String::from_utf8_lossy(&line);
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
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if self.has_data {
            out.push(SseEvent {
                event,
                data: self.data.join("\n"),
            });
        }
        self.data.clear();
        self.has_data = false;
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
