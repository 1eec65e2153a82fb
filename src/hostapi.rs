//! The one interface between the gateway and its host, in two halves: [`Read`] (headers as bytes, body
//! buffers, shared data, properties, time) is all the exchange's decision code may use; [`Host`] adds
//! everything that changes something (headers, buffers, local replies, callouts, shared data, metrics,
//! properties, the tick, log) and is called only by [`crate::adapter`], which applies the exchange's
//! effects. `abi::Wasm` implements both over the proxy-wasm ABI; [`fake::Fake`] implements them in
//! memory so the whole request lifecycle runs in `cargo test`.
//!
//! Every call returns the host's status instead of panicking; header values are bytes (decode them
//! with [`text`] when a string is needed, lossily: a byte >= 0x80 can never crash the filter).

#[allow(unused_imports)]
use crate::prelude::*;

use alloc::borrow::Cow;

/// A header map the filter reads or changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
    CallResponseHeaders,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buffer {
    RequestBody,
    ResponseBody,
    CallResponseBody,
    PluginConfiguration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Header name/value pairs as bytes.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A host status other than Ok.
pub type Status = u32;

/// What the exchange may read from its host: nothing here changes the request, the response or the
/// VM. The exchange's decision code sees only this trait (see [`crate::exchange`]); every change it
/// wants is an [`crate::exchange::Effect`] that [`crate::adapter`] applies through [`Host`].
pub trait Read {
    fn headers(&self, map: Map) -> Result<Headers, Status>;
    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, Status>;
    fn buffer(&self, b: Buffer, start: usize, max: usize) -> Result<Vec<u8>, Status>;
    fn shared_get(&self, key: &str) -> Result<Option<Vec<u8>>, Status>;
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status>;
    fn now_ms(&self) -> u64;
}

/// The side of the host that changes things: only [`crate::adapter`] (and the logger) call it.
pub trait Host: Read {
    fn set_header(&self, map: Map, name: &str, value: &[u8]) -> Result<(), Status>;
    fn remove_header(&self, map: Map, name: &str) -> Result<(), Status>;
    fn set_buffer(&self, b: Buffer, start: usize, size: usize, data: &[u8]) -> Result<(), Status>;
    fn send_response(
        &self,
        code: u32,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<(), Status>;
    /// An HTTP callout; the answer arrives in `on_http_call_response` with the returned token.
    fn call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, Status>;
    fn resume_request(&self) -> Result<(), Status>;
    fn shared_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), Status>;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, id: u32, by: u64);
    /// Adds `delta` (possibly negative) to a gauge.
    fn add_gauge(&self, id: u32, delta: i64);
    fn record_metric(&self, id: u32, value: u64);
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status>;
    fn set_tick_ms(&self, ms: u32) -> Result<(), Status>;
    /// The VM finished what it had to do after `on_done` returned false.
    fn done(&self) -> Result<(), Status>;
    fn log(&self, level: Level, msg: &str);
}

/// A header value as text: lossy (invalid UTF-8 becomes U+FFFD), never a panic.
pub fn text(v: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(v)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    let a: [u8; 4] = s.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(a)).ok()
}

/// Decodes a proxy-wasm serialized header map (`count`, then `count` pairs of sizes, then the
/// NUL-terminated names and values) into owned pairs. Malformed input yields the pairs decoded so
/// far, never a panic. (The filter reads maps in place, through [`Headers`]; this is its list form.)
pub fn decode_pairs(b: &[u8]) -> Pairs {
    Headers::from_serialized(b.to_vec())
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

/// Where each name and value of a serialized header map lies (`[name start, name end, value start,
/// value end]`), in order, up to the first malformed pair.
fn spans(b: &[u8]) -> Vec<[u32; 4]> {
    // Each pair takes at least 10 bytes: a count larger than that is a lie.
    let n = u32_at(b, 0).map_or(0, |n| n.min(b.len() / 10));
    let mut out = Vec::with_capacity(n);
    let mut p = 4 + n * 8;
    for i in 0..n {
        let s = 4 + i * 8;
        let (Some(kl), Some(vl)) = (u32_at(b, s), u32_at(b, s + 4)) else {
            break;
        };
        let k_end = p.saturating_add(kl);
        let v_start = k_end.saturating_add(1);
        let v_end = v_start.saturating_add(vl);
        // Both end within the buffer (the NULs after them are not checked, as before).
        if v_end > b.len() || k_end > b.len() {
            break;
        }
        let at = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        out.push([at(p), at(k_end), at(v_start), at(v_end)]);
        p = v_end.saturating_add(1);
    }
    out
}

/// Serializes a header map for the host.
pub fn encode_pairs(map: &[(&str, &[u8])]) -> Vec<u8> {
    encode_map(map.iter().map(|(k, v)| (k.as_bytes(), *v)))
}

/// [`encode_pairs`] over any pairs of bytes (no list of them built first).
pub fn encode_map<'a>(map: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let size = 4 + map
        .clone()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum::<usize>();
    let mut b = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    b.extend_from_slice(&len(map.clone().count()));
    for (k, v) in map.clone() {
        b.extend_from_slice(&len(k.len()));
        b.extend_from_slice(&len(v.len()));
    }
    for (k, v) in map {
        b.extend_from_slice(k);
        b.push(0);
        b.extend_from_slice(v);
        b.push(0);
    }
    b
}

/// A property path for the host: segments separated by NUL.
pub fn encode_path(path: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            b.push(0);
        }
        b.extend_from_slice(part.as_bytes());
    }
    b
}

/// A request's (or response's) headers, read in one host call and kept as the host serialized them:
/// one buffer per map and one table of where each name and value lies, looked up by lower-case name
/// (no allocation per header).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Headers {
    buf: Vec<u8>,
    spans: Vec<[u32; 4]>,
}

impl Headers {
    /// A map in the host's serialized form (malformed input keeps the pairs before the first bad one).
    pub fn from_serialized(buf: Vec<u8>) -> Self {
        let spans = spans(&buf);
        Headers { buf, spans }
    }

    /// A map of these pairs (tests, the fake host).
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Self {
        Self::from_serialized(encode_map(
            pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
        ))
    }

    /// The pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let slice = |a: u32, b: u32| self.buf.get(a as usize..b as usize);
        self.spans
            .iter()
            .filter_map(move |&[k0, k1, v0, v1]| Some((slice(k0, k1)?, slice(v0, v1)?)))
    }

    /// The first value of `name`. Names of another length are passed over without touching their
    /// bytes (most are: a lookup costs a few instructions per header).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let n = name.as_bytes();
        self.spans
            .iter()
            .find(|[k0, k1, _, _]| {
                k1.wrapping_sub(*k0) as usize == n.len()
                    && self.buf.get(*k0 as usize..*k1 as usize) == Some(n)
            })
            .and_then(|&[_, _, v0, v1]| self.buf.get(v0 as usize..v1 as usize))
    }

    /// The value as text, lossily decoded.
    pub fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        self.get(name).map(text)
    }

    /// The value as text; an error when present but not valid UTF-8.
    pub fn utf8(&self, name: &str) -> Result<Option<&str>, core::str::Utf8Error> {
        self.get(name).map(core::str::from_utf8).transpose()
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// An in-memory host for tests (and the fuzz crate, through the `fake-host` feature): records
/// everything the filter does.
#[cfg(any(test, feature = "fake-host"))]
pub mod fake {
    use super::*;
    use alloc::collections::BTreeMap;
    use core::cell::RefCell;

    /// A local reply: status, headers, body.
    pub type Reply = (u32, Vec<(String, Vec<u8>)>, Vec<u8>);
    /// A callout: cluster, headers, body.
    pub type Call = (String, Vec<(String, String)>, Vec<u8>);

    #[derive(Default, Debug)]
    pub struct State {
        pub request_headers: Pairs,
        pub response_headers: Pairs,
        pub call_response_headers: Pairs,
        pub request_body: Vec<u8>,
        pub response_body: Vec<u8>,
        pub call_response_body: Vec<u8>,
        pub config: Vec<u8>,
        pub shared: BTreeMap<String, Vec<u8>>,
        pub metrics: Vec<(MetricKind, String)>,
        pub metric_values: BTreeMap<u32, u64>,
        pub properties: BTreeMap<String, Vec<u8>>,
        pub now_ms: u64,
        pub local_replies: Vec<Reply>,
        pub calls: Vec<Call>,
        pub resumed: usize,
        pub logs: Vec<(Level, String)>,
        /// Makes every fallible call fail with this status (host misbehaviour).
        pub fail_with: Option<Status>,
        /// Makes `set_buffer` alone fail with this status.
        pub fail_set_buffer: Option<Status>,
    }

    #[derive(Default)]
    pub struct Fake(pub RefCell<State>);

    impl Fake {
        pub fn st(&self) -> core::cell::RefMut<'_, State> {
            self.0.borrow_mut()
        }

        fn fail(&self) -> Result<(), Status> {
            match self.0.borrow().fail_with {
                Some(s) => Err(s),
                None => Ok(()),
            }
        }

        /// The value of a metric by name.
        pub fn metric(&self, name: &str) -> Option<u64> {
            let s = self.0.borrow();
            let id = s.metrics.iter().position(|(_, n)| n == name)?;
            s.metric_values
                .get(&u32::try_from(id).ok()?)
                .copied()
                .or(Some(0))
        }
    }

    fn map_mut(s: &mut State, m: Map) -> &mut Pairs {
        match m {
            Map::RequestHeaders => &mut s.request_headers,
            Map::ResponseHeaders => &mut s.response_headers,
            Map::CallResponseHeaders => &mut s.call_response_headers,
        }
    }

    fn buf_mut(s: &mut State, b: Buffer) -> &mut Vec<u8> {
        match b {
            Buffer::RequestBody => &mut s.request_body,
            Buffer::ResponseBody => &mut s.response_body,
            Buffer::CallResponseBody => &mut s.call_response_body,
            Buffer::PluginConfiguration => &mut s.config,
        }
    }

    impl Read for Fake {
        fn headers(&self, map: Map) -> Result<Headers, Status> {
            self.fail()?;
            Ok(Headers::from_pairs(map_mut(&mut self.st(), map)))
        }
        fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
            self.fail()?;
            Ok(map_mut(&mut self.st(), map)
                .iter()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| v.clone()))
        }
        fn buffer(&self, b: Buffer, start: usize, max: usize) -> Result<Vec<u8>, Status> {
            self.fail()?;
            let mut s = self.st();
            let buf = buf_mut(&mut s, b);
            let end = start.saturating_add(max).min(buf.len());
            Ok(buf.get(start..end).unwrap_or_default().to_vec())
        }
        fn shared_get(&self, key: &str) -> Result<Option<Vec<u8>>, Status> {
            self.fail()?;
            Ok(self.st().shared.get(key).cloned())
        }
        fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
            self.fail()?;
            Ok(self.st().properties.get(&path.join(".")).cloned())
        }
        fn now_ms(&self) -> u64 {
            self.0.borrow().now_ms
        }
    }

    impl Host for Fake {
        fn set_header(&self, map: Map, name: &str, value: &[u8]) -> Result<(), Status> {
            self.fail()?;
            let mut s = self.st();
            let m = map_mut(&mut s, map);
            m.retain(|(k, _)| k.as_slice() != name.as_bytes());
            m.push((name.as_bytes().to_vec(), value.to_vec()));
            Ok(())
        }
        fn remove_header(&self, map: Map, name: &str) -> Result<(), Status> {
            self.fail()?;
            map_mut(&mut self.st(), map).retain(|(k, _)| k.as_slice() != name.as_bytes());
            Ok(())
        }
        fn set_buffer(
            &self,
            b: Buffer,
            start: usize,
            size: usize,
            data: &[u8],
        ) -> Result<(), Status> {
            self.fail()?;
            let mut s = self.st();
            if let Some(e) = s.fail_set_buffer {
                return Err(e);
            }
            let buf = buf_mut(&mut s, b);
            let end = start.saturating_add(size).min(buf.len());
            let start = start.min(end);
            // One bulk copy of the tail and the data (a byte-wise `splice` costs ~6,000
            // instructions per chunk in the benchmark; the real host is one call).
            let tail = buf.split_off(end);
            buf.truncate(start);
            buf.reserve(data.len() + tail.len());
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            Ok(())
        }
        fn send_response(
            &self,
            code: u32,
            headers: &[(&str, &[u8])],
            body: &[u8],
        ) -> Result<(), Status> {
            self.fail()?;
            let h = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            self.st().local_replies.push((code, h, body.to_vec()));
            Ok(())
        }
        fn call(
            &self,
            cluster: &str,
            headers: &[(&str, &str)],
            body: &[u8],
            _timeout_ms: u64,
        ) -> Result<u32, Status> {
            self.fail()?;
            let mut s = self.st();
            let h = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            s.calls.push((cluster.to_string(), h, body.to_vec()));
            Ok(u32::try_from(s.calls.len()).unwrap_or(u32::MAX))
        }
        fn resume_request(&self) -> Result<(), Status> {
            self.fail()?;
            self.st().resumed += 1;
            Ok(())
        }
        fn shared_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), Status> {
            self.fail()?;
            let mut s = self.st();
            match value {
                Some(v) => s.shared.insert(key.to_string(), v.to_vec()),
                None => s.shared.remove(key),
            };
            Ok(())
        }
        fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, Status> {
            self.fail()?;
            let mut s = self.st();
            if let Some(i) = s.metrics.iter().position(|(_, n)| n == name) {
                return Ok(u32::try_from(i).unwrap_or(u32::MAX));
            }
            s.metrics.push((kind, name.to_string()));
            Ok(u32::try_from(s.metrics.len() - 1).unwrap_or(u32::MAX))
        }
        fn increment_metric(&self, id: u32, by: u64) {
            *self.st().metric_values.entry(id).or_default() += by;
        }
        fn add_gauge(&self, id: u32, delta: i64) {
            let mut s = self.st();
            let v = s.metric_values.entry(id).or_default();
            *v = v.saturating_add_signed(delta);
        }
        fn record_metric(&self, id: u32, value: u64) {
            self.st().metric_values.insert(id, value);
        }
        fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
            self.fail()?;
            self.st().properties.insert(path.join("."), value.to_vec());
            Ok(())
        }
        fn set_tick_ms(&self, _ms: u32) -> Result<(), Status> {
            self.fail()
        }
        fn done(&self) -> Result<(), Status> {
            self.fail()
        }
        fn log(&self, level: Level, msg: &str) {
            self.st().logs.push((level, msg.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_with_arbitrary_bytes() {
        let v: &[u8] = b"\xff\x00\x80abc";
        let enc = encode_pairs(&[("x-a", v), (":path", b"/p")]);
        let dec = decode_pairs(&enc);
        assert_eq!(dec.len(), 2);
        assert_eq!(dec[0], (b"x-a".to_vec(), v.to_vec()));
        assert_eq!(dec[1], (b":path".to_vec(), b"/p".to_vec()));
    }

    #[test]
    fn malformed_maps_never_panic() {
        let enc = encode_pairs(&[("a", b"1"), ("bb", b"22")]);
        for cut in 0..enc.len() {
            let _ = decode_pairs(&enc[..cut]);
        }
        let mut lie = enc.clone();
        lie[0] = 0xff;
        lie[1] = 0xff;
        let _ = decode_pairs(&lie);
        let mut big = enc;
        big[4] = 0xff;
        big[7] = 0x7f;
        assert!(decode_pairs(&big).is_empty());
        for seed in 0u32..2000 {
            let bytes: Vec<u8> = (0..(seed % 64))
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            let _ = decode_pairs(&bytes);
        }
    }

    #[test]
    fn headers_decode_lossily() {
        let h = Headers::from_pairs(&[(b"x-a".as_slice(), b"a\xffb".as_slice())]);
        assert_eq!(h.text("x-a").unwrap(), "a\u{fffd}b");
        assert!(h.utf8("x-a").is_err());
        assert_eq!(h.utf8("x-b"), Ok(None));
        // Read in place from the host's form; a cut map keeps the whole pairs before the cut.
        let enc = encode_pairs(&[(":path", b"/p"), ("x-b", b"2"), ("x-b", b"3")]);
        let h = Headers::from_serialized(enc.clone());
        assert_eq!(h.get(":path"), Some(b"/p".as_slice()));
        assert_eq!(
            h.get("x-b"),
            Some(b"2".as_slice()),
            "the first of repeated names"
        );
        assert_eq!(h.iter().count(), 3);
        let cut = Headers::from_serialized(enc[..enc.len() - 3].to_vec());
        assert_eq!(cut.iter().count(), 2);
        assert_eq!(cut.get(":path"), Some(b"/p".as_slice()));
    }

    #[test]
    fn property_paths() {
        assert_eq!(encode_path(&["a", "b"]), b"a\0b");
        assert!(encode_path(&[]).is_empty());
    }
}
