//! The filter's JSON reader: parses bytes into a [`serde_json::Value`], or only validates them.
//!
//! It replaces `serde_json`'s deserializer in the wasm (issue 10, `.wasm` size): that one is generic
//! code instantiated per visitor, and its error messages pull in `core`'s float formatting (~18 KB).
//! The rules are `serde_json`'s: RFC 8259 JSON, UTF-8 strings, surrogate pairs in `\u` escapes, 128
//! levels of nesting, a duplicate key keeps its last value; numbers become `u64`, `i64` or `f64`
//! exactly as `serde_json` (without `float_roundtrip`) makes them, so values and re-serialized
//! numbers do not change. Errors read like `serde_json`'s: `EOF while parsing a value at line 1
//! column 9`. Unit tests compare both on valid and invalid documents.

#[allow(unused_imports)]
use crate::prelude::*;

use serde_json::{Map, Number, Value};

/// Nesting limit (`serde_json`'s).
const MAX_DEPTH: usize = 128;

/// A parse error: what, and where (line and column, 1-based, as `serde_json` counts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    what: &'static str,
    /// The key of a `duplicate field` error ([`validate_top`]).
    key: &'static str,
    line: usize,
    column: usize,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.what)?;
        if !self.key.is_empty() {
            write!(f, " `{}`", self.key)?;
        }
        write!(f, " at line {} column {}", self.line, self.column)
    }
}

/// Parses a whole document (only whitespace may follow the value).
pub fn parse(b: &[u8]) -> Result<Value, Error> {
    let mut p = Parser::new(b, true, &[], &mut []);
    let v = p.value(0)?;
    p.end()?;
    Ok(v)
}

/// Byte spans (start, end) of the values of wanted keys, `None` for a key not there.
pub type Spans<const N: usize> = [Option<(usize, usize)>; N];

/// Checks that `b` is one JSON document, building nothing. What `serde_json` accepts when it skips a
/// value (`IgnoredAny`): strings are not decoded (invalid UTF-8 and lone surrogates in `\u` escapes
/// pass), numbers are checked for their syntax only (`1e999` passes); but nesting is still limited.
pub fn validate(b: &[u8]) -> Result<(), Error> {
    validate_top(b, []).map(|_| ())
}

/// [`validate`], and in the same pass the byte spans of the values of the top-level `keys` (when the
/// document is an object). A key present twice is refused (`duplicate field`).
pub fn validate_top<const N: usize>(b: &[u8], keys: [&'static str; N]) -> Result<Spans<N>, Error> {
    top(b, &keys, true).map(|(spans, _)| spans)
}

/// [`validate_top`] of the value at the start of `b` (whatever follows it is ignored), and where it
/// ends.
pub fn prefix_top<const N: usize>(
    b: &[u8],
    keys: [&'static str; N],
) -> Result<(Spans<N>, usize), Error> {
    top(b, &keys, false)
}

fn top<const N: usize>(
    b: &[u8],
    keys: &[&'static str; N],
    whole: bool,
) -> Result<(Spans<N>, usize), Error> {
    let mut spans = [None; N];
    let mut p = Parser::new(b, false, keys, &mut spans);
    p.value(0)?;
    if whole {
        p.end()?;
    }
    let end = p.i;
    Ok((spans, end))
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// Build values (`false`: validate only, every value reads as `null`).
    build: bool,
    /// Top-level keys whose value spans are wanted, and the spans found (the caller's array: no
    /// allocation).
    keys: &'a [&'static str],
    spans: &'a mut [Option<(usize, usize)>],
}

/// Bytes of `s` before its first `"`, `\` or control character; eight bytes at a time while none is
/// there (the scan is most of the parse).
fn plain_len(s: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Nonzero when a byte of `v` is below `n` (n <= 128).
    let below = |v: u64, n: u64| v.wrapping_sub(ONES * n) & !v & HIGH;
    let mut i = 0;
    for chunk in s.chunks_exact(8) {
        let v = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
        if below(v, 0x20)
            | below(v ^ (ONES * u64::from(b'"')), 1)
            | below(v ^ (ONES * u64::from(b'\\')), 1)
            != 0
        {
            break;
        }
        i += 8;
    }
    let tail = s.get(i..).unwrap_or_default();
    i + tail
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(tail.len())
}

/// `a * 10 + d` would pass `max`.
fn overflows(a: u64, d: u64, max: u64) -> bool {
    a >= max / 10 && (a > max / 10 || d > max % 10)
}

impl<'a> Parser<'a> {
    fn new(
        b: &'a [u8],
        build: bool,
        keys: &'a [&'static str],
        spans: &'a mut [Option<(usize, usize)>],
    ) -> Self {
        Parser {
            b,
            i: 0,
            build,
            keys,
            spans,
        }
    }

    /// The error at the current position.
    fn err(&self, what: &'static str) -> Error {
        let upto = self.b.get(..self.i.min(self.b.len())).unwrap_or_default();
        let line_start = upto.iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
        Error {
            what,
            key: "",
            line: 1 + upto.iter().filter(|&&c| c == b'\n').count(),
            column: upto.len() - line_start,
        }
    }

    /// The error at the next byte (counted as read).
    fn err_next(&mut self, what: &'static str) -> Error {
        self.i = (self.i + 1).min(self.b.len());
        self.err(what)
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        if !matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            return;
        }
        let rest = self.b.get(self.i..).unwrap_or_default();
        self.i += rest
            .iter()
            .position(|c| !matches!(c, b' ' | b'\n' | b'\t' | b'\r'))
            .unwrap_or(rest.len());
    }

    fn end(&mut self) -> Result<(), Error> {
        self.skip_ws();
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.err_next("trailing characters")),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        self.skip_ws();
        let Some(c) = self.peek() else {
            return Err(self.err("EOF while parsing a value"));
        };
        match c {
            b'n' => self.ident(b"null", Value::Null),
            b't' => self.ident(b"true", Value::Bool(true)),
            b'f' => self.ident(b"false", Value::Bool(false)),
            b'"' => {
                self.i += 1;
                let s = self.string()?;
                Ok(if self.build {
                    Value::String(s)
                } else {
                    Value::Null
                })
            }
            b'-' => {
                self.i += 1;
                self.number(false)
            }
            b'0'..=b'9' => self.number(true),
            b'[' | b'{' => {
                if depth + 1 >= MAX_DEPTH {
                    return Err(self.err_next("recursion limit exceeded"));
                }
                self.i += 1;
                if c == b'[' {
                    self.array(depth + 1)
                } else {
                    self.object(depth + 1)
                }
            }
            _ => Err(self.err_next("expected value")),
        }
    }

    fn ident(&mut self, word: &[u8], v: Value) -> Result<Value, Error> {
        for &w in word {
            match self.peek() {
                None => return Err(self.err("EOF while parsing a value")),
                Some(c) if c == w => self.i += 1,
                Some(_) => return Err(self.err_next("expected ident")),
            }
        }
        Ok(if self.build { v } else { Value::Null })
    }

    fn array(&mut self, depth: usize) -> Result<Value, Error> {
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek().is_none() && self.build {
            // (Skipping a value, `serde_json` says "EOF while parsing a value" here, as `value` does.)
            return Err(self.err("EOF while parsing a list"));
        }
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(if self.build {
                Value::Array(items)
            } else {
                Value::Null
            });
        }
        loop {
            let v = self.value(depth)?;
            if self.build {
                items.push(v);
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        return Err(self.err_next("trailing comma"));
                    }
                }
                Some(b']') => {
                    self.i += 1;
                    return Ok(if self.build {
                        Value::Array(items)
                    } else {
                        Value::Null
                    });
                }
                Some(_) => return Err(self.err_next("expected `,` or `]`")),
                None => return Err(self.err("EOF while parsing a list")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, Error> {
        let mut map = Map::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(if self.build {
                Value::Object(map)
            } else {
                Value::Null
            });
        }
        loop {
            match self.peek() {
                Some(b'"') => self.i += 1,
                Some(_) => return Err(self.err_next("key must be a string")),
                None => return Err(self.err("EOF while parsing an object")),
            }
            let key_start = self.i - 1;
            let key = self.string()?;
            let wanted = if depth == 1 && !self.keys.is_empty() {
                self.wanted(key_start)
            } else {
                None
            };
            self.skip_ws();
            match self.peek() {
                Some(b':') => self.i += 1,
                Some(_) => return Err(self.err_next("expected `:`")),
                None => return Err(self.err("EOF while parsing an object")),
            }
            self.skip_ws();
            let value_start = self.i;
            let v = self.value(depth)?;
            if let Some(k) = wanted {
                let end = self.i;
                match self.spans.get_mut(k) {
                    Some(Some(_)) => {
                        let mut e = self.err("duplicate field");
                        e.key = self.keys.get(k).copied().unwrap_or_default();
                        return Err(e);
                    }
                    Some(slot) => *slot = Some((value_start, end)),
                    None => {}
                }
            }
            if self.build {
                map.insert(key, v);
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                    match self.peek() {
                        Some(b'}') => return Err(self.err_next("trailing comma")),
                        None => return Err(self.err("EOF while parsing a value")),
                        Some(_) => {}
                    }
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(if self.build {
                        Value::Object(map)
                    } else {
                        Value::Null
                    });
                }
                Some(_) => return Err(self.err_next("expected `,` or `}`")),
                None => return Err(self.err("EOF while parsing an object")),
            }
        }
    }

    /// Which of the wanted top-level keys the string just read (quotes included, from `start`) is.
    fn wanted(&self, start: usize) -> Option<usize> {
        let raw = self.b.get(start..self.i)?;
        let inner = raw.get(1..raw.len().saturating_sub(1))?;
        if inner.contains(&b'\\') {
            let key = parse(raw).ok()?;
            self.keys.iter().position(|k| key.as_str() == Some(k))
        } else {
            self.keys.iter().position(|k| k.as_bytes() == inner)
        }
    }

    /// A string, after its opening quote (empty when not building).
    fn string(&mut self) -> Result<String, Error> {
        let mut out = String::new();
        // Invalid UTF-8 is reported at the closing quote, as `serde_json` checks a string whole: the
        // decoded bytes before the first invalid one, and (from there) all the decoded bytes.
        let mut bad: Option<usize> = None;
        let mut len = 0;
        loop {
            let start = self.i;
            let rest = self.b.get(start..).unwrap_or_default();
            let n = plain_len(rest);
            self.i += n;
            // Validating only, strings are not decoded (as `serde_json` skips them).
            if self.build {
                match (bad, core::str::from_utf8(rest.get(..n).unwrap_or_default())) {
                    (None, Ok(s)) => out.push_str(s),
                    (None, Err(e)) => {
                        bad = Some(out.len() + e.valid_up_to());
                        len = out.len() + n;
                    }
                    (Some(_), _) => len += n,
                }
            }
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    if let Some(valid) = bad {
                        // `serde_json`'s column: back from the quote by the bytes from the bad one.
                        let mut e = self.err("invalid unicode code point");
                        e.column = e.column.saturating_sub(len - valid);
                        return Err(e);
                    }
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.escape()?;
                    match bad {
                        _ if !self.build => {}
                        None => out.push(c),
                        Some(_) => len += c.len_utf8(),
                    }
                }
                Some(_) => {
                    return Err(self.err_next(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ))
                }
                None => return Err(self.err("EOF while parsing a string")),
            }
        }
    }

    /// The character of an escape, after its backslash.
    fn escape(&mut self) -> Result<char, Error> {
        let Some(c) = self.peek() else {
            return Err(self.err("EOF while parsing a string"));
        };
        self.i += 1;
        Ok(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                if !self.build {
                    // Skipped as `serde_json` skips it: four hex digits, whatever they encode.
                    return Ok('u');
                }
                let code = match hi {
                    0xDC00..=0xDFFF => return Err(self.err("lone leading surrogate in hex escape")),
                    0xD800..=0xDBFF => {
                        for want in [b'\\', b'u'] {
                            match self.peek() {
                                Some(c) if c == want => self.i += 1,
                                Some(_) => {
                                    return Err(self.err_next("unexpected end of hex escape"))
                                }
                                None => return Err(self.err("EOF while parsing a string")),
                            }
                        }
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(self.err("lone leading surrogate in hex escape"));
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    _ => hi,
                };
                char::from_u32(code).ok_or_else(|| self.err("invalid unicode code point"))?
            }
            _ => return Err(self.err("invalid escape")),
        })
    }

    /// Four hex digits; as `serde_json` reads them: all four, then the error (at their end).
    fn hex4(&mut self) -> Result<u32, Error> {
        let Some(digits) = self.b.get(self.i..self.i + 4) else {
            self.i = self.b.len();
            return Err(self.err("EOF while parsing a string"));
        };
        self.i += 4;
        let mut n = 0;
        for &c in digits {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(self.err("invalid escape")),
            };
            n = n * 16 + u32::from(d);
        }
        Ok(n)
    }

    #[inline(always)]
    fn digit(&self) -> Option<u64> {
        match self.peek() {
            Some(c @ b'0'..=b'9') => Some(u64::from(c - b'0')),
            _ => None,
        }
    }

    /// A number, after its sign (`serde_json`'s algorithm, step for step).
    fn number(&mut self, positive: bool) -> Result<Value, Error> {
        let first = match self.peek() {
            Some(c @ b'0'..=b'9') => c,
            Some(_) => return Err(self.err_next("invalid number")),
            None => return Err(self.err("EOF while parsing a value")),
        };
        self.i += 1;
        let mut significand = u64::from(first - b'0');
        if first == b'0' {
            if self.digit().is_some() {
                return Err(self.err_next("invalid number"));
            }
        } else {
            while let Some(d) = self.digit() {
                if overflows(significand, d, u64::MAX) {
                    // Too large for u64: the remaining integer digits only scale it.
                    let mut exponent = 0i32;
                    while self.digit().is_some() {
                        self.i += 1;
                        exponent = exponent.saturating_add(1);
                    }
                    return self.float_tail(positive, significand, exponent);
                }
                self.i += 1;
                significand = significand * 10 + d;
            }
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return self.float_tail(positive, significand, 0);
        }
        if !self.build {
            return Ok(Value::Null);
        }
        Ok(if positive {
            Value::Number(significand.into())
        } else {
            let neg = (significand as i64).wrapping_neg();
            if neg >= 0 {
                // Underflow, or `-0`: a float.
                self.float_value(-(significand as f64))
            } else {
                Value::Number(neg.into())
            }
        })
    }

    /// The fraction and exponent of a number whose integer part is read.
    fn float_tail(
        &mut self,
        positive: bool,
        mut significand: u64,
        mut exponent: i32,
    ) -> Result<Value, Error> {
        if self.peek() == Some(b'.') {
            self.i += 1;
            let mut fraction_digits = 0;
            let mut overflowed = false;
            while let Some(d) = self.digit() {
                self.i += 1;
                fraction_digits += 1;
                if overflowed || overflows(significand, d, u64::MAX) {
                    // The next digits would overflow: ignored.
                    overflowed = true;
                    continue;
                }
                significand = significand * 10 + d;
                exponent = exponent.saturating_sub(1);
            }
            if fraction_digits == 0 {
                return Err(match self.peek() {
                    Some(_) => self.err_next("invalid number"),
                    None => self.err("EOF while parsing a value"),
                });
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            let positive_exp = match self.peek() {
                Some(b'+') => {
                    self.i += 1;
                    true
                }
                Some(b'-') => {
                    self.i += 1;
                    false
                }
                _ => true,
            };
            let mut exp = match self.digit() {
                Some(d) => d as i32,
                None if self.peek().is_none() => return Err(self.err("EOF while parsing a value")),
                None => return Err(self.err_next("invalid number")),
            };
            self.i += 1;
            while let Some(d) = self.digit() {
                self.i += 1;
                if overflows(exp as u64, d, i32::MAX as u64) {
                    // Infinite exponent: zero, or out of range.
                    if significand != 0 && positive_exp && self.build {
                        return Err(self.err("number out of range"));
                    }
                    while self.digit().is_some() {
                        self.i += 1;
                    }
                    let zero = if positive { 0.0 } else { -0.0 };
                    return Ok(self.float_value(zero));
                }
                exp = exp * 10 + d as i32;
            }
            exponent = if positive_exp {
                exponent.saturating_add(exp)
            } else {
                exponent.saturating_sub(exp)
            };
        }
        if !self.build {
            // Validating: the syntax only (`serde_json` skips a number without its value).
            return Ok(Value::Null);
        }
        let mut f = significand as f64;
        loop {
            match POW10.get(exponent.unsigned_abs() as usize) {
                Some(&pow) => {
                    if exponent >= 0 {
                        f *= pow;
                        if f.is_infinite() {
                            return Err(self.err("number out of range"));
                        }
                    } else {
                        f /= pow;
                    }
                    break;
                }
                None => {
                    if f == 0.0 {
                        break;
                    }
                    if exponent >= 0 {
                        return Err(self.err("number out of range"));
                    }
                    f /= 1e308;
                    exponent += 308;
                }
            }
        }
        Ok(self.float_value(if positive { f } else { -f }))
    }

    fn float_value(&self, f: f64) -> Value {
        match Number::from_f64(f) {
            Some(n) if self.build => Value::Number(n),
            _ => Value::Null,
        }
    }
}

/// Powers of ten as `f64` literals (each correctly rounded), `serde_json`'s table.
#[rustfmt::skip]
static POW10: [f64; 309] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9,
    1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
    1e20, 1e21, 1e22, 1e23, 1e24, 1e25, 1e26, 1e27, 1e28, 1e29,
    1e30, 1e31, 1e32, 1e33, 1e34, 1e35, 1e36, 1e37, 1e38, 1e39,
    1e40, 1e41, 1e42, 1e43, 1e44, 1e45, 1e46, 1e47, 1e48, 1e49,
    1e50, 1e51, 1e52, 1e53, 1e54, 1e55, 1e56, 1e57, 1e58, 1e59,
    1e60, 1e61, 1e62, 1e63, 1e64, 1e65, 1e66, 1e67, 1e68, 1e69,
    1e70, 1e71, 1e72, 1e73, 1e74, 1e75, 1e76, 1e77, 1e78, 1e79,
    1e80, 1e81, 1e82, 1e83, 1e84, 1e85, 1e86, 1e87, 1e88, 1e89,
    1e90, 1e91, 1e92, 1e93, 1e94, 1e95, 1e96, 1e97, 1e98, 1e99,
    1e100, 1e101, 1e102, 1e103, 1e104, 1e105, 1e106, 1e107, 1e108, 1e109,
    1e110, 1e111, 1e112, 1e113, 1e114, 1e115, 1e116, 1e117, 1e118, 1e119,
    1e120, 1e121, 1e122, 1e123, 1e124, 1e125, 1e126, 1e127, 1e128, 1e129,
    1e130, 1e131, 1e132, 1e133, 1e134, 1e135, 1e136, 1e137, 1e138, 1e139,
    1e140, 1e141, 1e142, 1e143, 1e144, 1e145, 1e146, 1e147, 1e148, 1e149,
    1e150, 1e151, 1e152, 1e153, 1e154, 1e155, 1e156, 1e157, 1e158, 1e159,
    1e160, 1e161, 1e162, 1e163, 1e164, 1e165, 1e166, 1e167, 1e168, 1e169,
    1e170, 1e171, 1e172, 1e173, 1e174, 1e175, 1e176, 1e177, 1e178, 1e179,
    1e180, 1e181, 1e182, 1e183, 1e184, 1e185, 1e186, 1e187, 1e188, 1e189,
    1e190, 1e191, 1e192, 1e193, 1e194, 1e195, 1e196, 1e197, 1e198, 1e199,
    1e200, 1e201, 1e202, 1e203, 1e204, 1e205, 1e206, 1e207, 1e208, 1e209,
    1e210, 1e211, 1e212, 1e213, 1e214, 1e215, 1e216, 1e217, 1e218, 1e219,
    1e220, 1e221, 1e222, 1e223, 1e224, 1e225, 1e226, 1e227, 1e228, 1e229,
    1e230, 1e231, 1e232, 1e233, 1e234, 1e235, 1e236, 1e237, 1e238, 1e239,
    1e240, 1e241, 1e242, 1e243, 1e244, 1e245, 1e246, 1e247, 1e248, 1e249,
    1e250, 1e251, 1e252, 1e253, 1e254, 1e255, 1e256, 1e257, 1e258, 1e259,
    1e260, 1e261, 1e262, 1e263, 1e264, 1e265, 1e266, 1e267, 1e268, 1e269,
    1e270, 1e271, 1e272, 1e273, 1e274, 1e275, 1e276, 1e277, 1e278, 1e279,
    1e280, 1e281, 1e282, 1e283, 1e284, 1e285, 1e286, 1e287, 1e288, 1e289,
    1e290, 1e291, 1e292, 1e293, 1e294, 1e295, 1e296, 1e297, 1e298, 1e299,
    1e300, 1e301, 1e302, 1e303, 1e304, 1e305, 1e306, 1e307, 1e308,
];

/// Appends `v`'s JSON text to `out`, byte for byte what `serde_json::to_vec` writes (compact, keys
/// in the map's order, only `"`, `\\` and control characters escaped; numbers through
/// `serde_json::Number`'s own formatting). `serde_json`'s writer needs `std::io` (the filter is
/// `no_std`); the unit tests and the `json` fuzz target compare both.
pub fn write(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, x);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            out.push(b'{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write(out, x);
            }
            out.push(b'}');
        }
    }
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    use core::fmt::Write;
    struct W<'a>(&'a mut Vec<u8>);
    impl Write for W<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    let _ = write!(W(out), "{n}");
}

/// A JSON string literal, escaped as `serde_json` escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(b.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            let hex = |n: u8| HEX.get(usize::from(n)).copied().unwrap_or(b'0');
            out.extend_from_slice(&[hex(c >> 4), hex(c & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(b.get(start..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both parsers accept `doc` with the same value (numbers to the bit), or both refuse it; and
    /// [`validate`] accepts what `serde_json` accepts when it skips a value.
    fn same(doc: &str) {
        let ours = parse(doc.as_bytes());
        let theirs = serde_json::from_str::<Value>(doc);
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "{doc}");
                assert_eq!(a.to_string(), b.to_string(), "{doc}");
                let mut written = Vec::new();
                write(&mut written, a);
                assert_eq!(written, serde_json::to_vec(b).unwrap(), "{doc}");
            }
            (Err(_), Err(_)) => {}
            _ => panic!("{doc}: ours {ours:?}, serde_json {theirs:?}"),
        }
        let skipped = serde_json::from_str::<serde::de::IgnoredAny>(doc).is_ok();
        assert_eq!(validate(doc.as_bytes()).is_ok(), skipped, "{doc}");
    }

    #[test]
    fn agrees_with_serde_json() {
        let docs = [
            r#"{"a":[1,-2,3.5,-0,-0.0,0.1,1e2,1E-2,1.5e+3,true,false,null,"x"],"b":{},"c":[]}"#,
            " \t\n{\"k\" : \"v\" , \"k\":2}\r\n ",
            r#""esc \" \\ \/ \b \f \n \r \t \u00e9 \ud83d\ude00 é""#,
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890.123e-5",
            "0.30000000000000004",
            "3.141592653589793238462643383279",
            "1.7976931348623157e308",
            "1e309",
            "-1e309",
            "2.2250738585072014e-308",
            "5e-324",
            "1e-400",
            "0e99999999999",
            "1e99999999999",
            "1e-99999999999",
            "1.00000000000000000000000000000000000001",
            "0.000000000000000000000000000000000000000000001",
            "4.9406564584124654e-324",
            "[1,2,]",
            r#"{"a":1,}"#,
            "01",
            "-",
            "-a",
            "1.",
            "1.e5",
            "1e",
            "1e+",
            ".5",
            "+1",
            "nul",
            "nulx",
            "tru",
            "[1 2]",
            r#"{"a" 1}"#,
            r#"{1:2}"#,
            r#"{"a":1"#,
            "[",
            "",
            "   ",
            r#""abc"#,
            "\"a\u{1}b\"",
            r#""\x""#,
            r#""\u12""#,
            r#""\ud800""#,
            r#""\ud800\u0041""#,
            r#""\udc00""#,
            "[1] x",
            "{}{}",
            "\"\\u0000\\u001f\\u007f \\u0008\\u000c \\ud800\\udc00 \\u2028\"",
            r#"{"z":1,"a":{"\n":[null,{"":""}]}}"#,
        ];
        for d in docs {
            same(d);
        }
        same(&format!("{}{}", "[".repeat(127), "]".repeat(127)));
        // Nesting is limited when validating too (serde_json does not limit a skipped value's).
        let deep = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(parse(deep.as_bytes()).is_err() && serde_json::from_str::<Value>(&deep).is_err());
        assert!(validate(deep.as_bytes()).is_err());
        // Invalid UTF-8 in a string (only validating: not decoded, as serde_json skips it).
        assert!(validate(b"\"\xff\"").is_ok());
        assert!(
            parse(b"\"\xff\"").is_err() && serde_json::from_slice::<Value>(b"\"\xff\"").is_err()
        );
    }

    #[test]
    fn numbers_agree_with_serde_json() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            let mut s = String::new();
            if next(3) == 0 {
                s.push('-');
            }
            let int_digits = 1 + next(25);
            for k in 0..int_digits {
                let d = if k == 0 && int_digits > 1 {
                    1 + next(9)
                } else {
                    next(10)
                };
                s.push(char::from(b'0' + d as u8));
            }
            if next(2) == 0 {
                s.push('.');
                for _ in 0..1 + next(25) {
                    s.push(char::from(b'0' + next(10) as u8));
                }
            }
            if next(3) == 0 {
                s.push(if next(2) == 0 { 'e' } else { 'E' });
                match next(3) {
                    0 => s.push('-'),
                    1 => s.push('+'),
                    _ => {}
                }
                s.push_str(&next(400).to_string());
            }
            same(&s);
        }
    }

    #[test]
    fn errors_read_like_serde_json() {
        for (doc, msg) in [
            (
                "{\"model\":",
                "EOF while parsing a value at line 1 column 9",
            ),
            ("[1,2", "EOF while parsing a list at line 1 column 4"),
            ("{\"a\":[ ", "EOF while parsing a list at line 1 column 7"),
            ("[1,", "EOF while parsing a value at line 1 column 3"),
            ("{\"a\":1, ", "EOF while parsing a value at line 1 column 8"),
            ("{ ", "EOF while parsing an object at line 1 column 2"),
            (
                "\"a\\ud800x\"",
                "unexpected end of hex escape at line 1 column 9",
            ),
            ("\"\\u12", "EOF while parsing a string at line 1 column 5"),
            ("\"\\u1x3z\"", "invalid escape at line 1 column 7"),
            ("{\"a\":1 x", "expected `,` or `}` at line 1 column 8"),
            ("{\"a\":1}\n x", "trailing characters at line 2 column 2"),
            ("[1,]", "trailing comma at line 1 column 4"),
        ] {
            assert_eq!(parse(doc.as_bytes()).unwrap_err().to_string(), msg);
            assert_eq!(
                serde_json::from_str::<Value>(doc).unwrap_err().to_string(),
                msg
            );
        }
    }

    #[test]
    fn validating_skips_values_as_serde_json_does() {
        // Out-of-range numbers and lone surrogates: refused by a parse, accepted by a skip.
        for doc in [
            "1e400",
            "-1e99999999999",
            r#""\ud800""#,
            r#""\udc00\u0041""#,
            r#"{"a":[1e309]}"#,
        ] {
            assert!(parse(doc.as_bytes()).is_err(), "{doc}");
            assert!(
                serde_json::from_str::<serde::de::IgnoredAny>(doc).is_ok(),
                "{doc}"
            );
            assert!(validate(doc.as_bytes()).is_ok(), "{doc}");
        }
        // But the syntax of both is checked.
        for doc in ["1e", "1.", r#""\u12x4""#, r#""\q""#] {
            assert!(validate(doc.as_bytes()).is_err(), "{doc}");
        }
    }

    #[test]
    fn prefix_spans_and_end() {
        let (spans, end) = prefix_top(br#" {"a":1, "b":[2]} ,"c":3}"#, ["b", "c"]).unwrap();
        assert_eq!((spans, end), ([Some((13, 16)), None], 17));
        assert!(prefix_top(br#"{"a":"#, ["a"]).is_err());
    }

    #[test]
    fn top_level_spans_in_the_validating_pass() {
        let doc = br#" {"model" : "m", "x":{"model":1}, "mod\u0065l2":[1, 2] ,"stream":true}"#;
        let [m, m2, s, none] = validate_top(doc, ["model", "model2", "stream", "none"]).unwrap();
        let text = |span: Option<(usize, usize)>| {
            let (a, b) = span.unwrap();
            core::str::from_utf8(&doc[a..b]).unwrap()
        };
        assert_eq!(
            (text(m), text(m2), text(s), none),
            ("\"m\"", "[1, 2]", "true", None)
        );
        assert_eq!(
            validate_top(br#"{"model":1,"model":2}"#, ["model"])
                .unwrap_err()
                .to_string(),
            "duplicate field `model` at line 1 column 20"
        );
        assert!(validate_top(br#"[{"model":1}]"#, ["model"]).unwrap()[0].is_none());
        assert!(validate_top(br#"{"model":1"#, ["model"]).is_err());
    }

    #[test]
    fn plain_runs_end_at_quotes_escapes_and_controls() {
        for stop in [b'"', b'\\', 0x00, 0x1f] {
            for at in 0..20 {
                let mut s = vec![b'a'; 20];
                s[at] = stop;
                assert_eq!(plain_len(&s), at);
            }
        }
        assert_eq!(
            plain_len(&[0x20, 0x7f, 0x80, 0xff, b'!', b'#', b'[', b']', b'a']),
            9
        );
        assert_eq!(plain_len(b""), 0);
    }
}
