//! Decodes a protobuf `google.protobuf.Struct` (what Envoy hands the filter when its `configuration`
//! is written as native YAML with `@type: type.googleapis.com/google.protobuf.Struct`) into JSON, so
//! the gateway configuration can be written inline as YAML in Envoy (or Istio) config.

#[allow(unused_imports)]
use crate::prelude::*;

use serde_json::{Map, Number, Value};

/// Nesting limit: configuration is shallow; this only guards against hostile input.
const MAX_DEPTH: usize = 64;

pub fn struct_to_json(bytes: &[u8]) -> Result<Value, String> {
    decode_struct(bytes, 0).map(Value::Object)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.b.get(self.pos..end).ok_or("truncated field")?;
        self.pos = end;
        Ok(s)
    }

    /// Next `(field number, value)`, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                let raw = self.take(8)?;
                let mut arr = [0u8; 8];
                arr.copy_from_slice(raw);
                Field::Fixed64(u64::from_le_bytes(arr))
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Field::Varint(0)
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn decode_struct(bytes: &[u8], depth: usize) -> Result<Map<String, Value>, String> {
    if depth > MAX_DEPTH {
        return Err("configuration nested too deeply".into());
    }
    let mut map = Map::new();
    let mut r = Reader::new(bytes);
    while let Some((num, field)) = r.next()? {
        if let (1, Field::Bytes(entry)) = (num, field) {
            let mut er = Reader::new(entry);
            let (mut key, mut value) = (String::new(), Value::Null);
            while let Some((n, f)) = er.next()? {
                match (n, f) {
                    (1, Field::Bytes(k)) => {
                        key = String::from_utf8(k.to_vec()).map_err(|e| e.to_string())?
                    }
                    (2, Field::Bytes(v)) => value = decode_value(v, depth + 1)?,
                    _ => {}
                }
            }
            map.insert(key, value);
        }
    }
    Ok(map)
}

fn decode_value(bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("configuration nested too deeply".into());
    }
    let mut r = Reader::new(bytes);
    let mut out = Value::Null;
    while let Some((num, field)) = r.next()? {
        out = match (num, field) {
            (1, _) => Value::Null,
            (2, Field::Fixed64(bits)) => number(f64::from_bits(bits)),
            (3, Field::Bytes(s)) => {
                Value::String(String::from_utf8(s.to_vec()).map_err(|e| e.to_string())?)
            }
            (4, Field::Varint(b)) => Value::Bool(b != 0),
            (5, Field::Bytes(s)) => Value::Object(decode_struct(s, depth + 1)?),
            (6, Field::Bytes(l)) => {
                let mut items = Vec::new();
                let mut lr = Reader::new(l);
                while let Some((n, f)) = lr.next()? {
                    if let (1, Field::Bytes(v)) = (n, f) {
                        items.push(decode_value(v, depth + 1)?);
                    }
                }
                Value::Array(items)
            }
            _ => out,
        };
    }
    Ok(out)
}

/// Struct numbers are doubles; integral ones become JSON integers so they fit integer fields.
fn number(f: f64) -> Value {
    if f.abs() < 9.0e15 && (f as i64) as f64 == f {
        Value::Number(Number::from(f as i64))
    } else {
        Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn len_field(num: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }
    fn string_value(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        len_field(3, s.as_bytes(), &mut v);
        v
    }
    fn number_value(f: f64) -> Vec<u8> {
        let mut v = vec![2 << 3 | 1];
        v.extend_from_slice(&f.to_le_bytes());
        v
    }
    fn entry(k: &str, value: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        len_field(1, k.as_bytes(), &mut e);
        len_field(2, value, &mut e);
        let mut out = Vec::new();
        len_field(1, &e, &mut out);
        out
    }

    #[test]
    fn decodes_nested_struct() {
        let mut list = Vec::new();
        len_field(1, &string_value("a"), &mut list);
        len_field(1, &[4 << 3, 1], &mut list);
        let mut list_value = Vec::new();
        len_field(6, &list, &mut list_value);
        let inner = entry("n", &number_value(1.5));
        let mut struct_value = Vec::new();
        len_field(5, &inner, &mut struct_value);
        let mut top = entry("max", &number_value(4096.0));
        top.extend(entry("models", &list_value));
        top.extend(entry("inner", &struct_value));
        top.extend(entry("nothing", &[1 << 3, 0]));
        let v = struct_to_json(&top).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"max":4096,"models":["a",true],"inner":{"n":1.5},"nothing":null})
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for junk in [&[0x0a, 0xff][..], &[0x0a, 0x05, 0x01], &[0xff; 12], &[0x0f]] {
            assert!(struct_to_json(junk).is_err());
        }
    }
}
