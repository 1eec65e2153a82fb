//! Reads configuration-shaped JSON by hand, from a [`serde_json::Value`] (parsed by `crate::json`).
//!
//! The configuration and control-plane types derive `Deserialize` for the sidecar, which shares them.
//! In the filter each derived deserializer costs kilobytes of wasm (one `serde_json` instantiation per
//! type and collection), so the filter reads these documents (its configuration, the sidecar's
//! answers, the attempt plan) through the readers next to each type, all built on the few
//! non-generic helpers here. Unit tests compare every reader with the derived deserializer.
//!
//! The rules are serde's: a field may come under its name or one of its aliases (two of them at
//! once are refused), `null` reads as absent only for optional fields, numbers must fit the integer
//! type, and types that refuse unknown fields (`Obj::new` with a field list) name the field. One
//! difference: serde also takes a struct written as an array of its fields in order; these readers
//! take objects only. Messages name the place in the document (`providers[1].models[0]: ...`).

#[allow(unused_imports)]
use crate::prelude::*;

use serde_json::{Map, Value};

pub type Res<T> = Result<T, String>;

/// One JSON object being read; `at` is its place in the document (`""` at the top), for messages.
///
/// The typed getters return plain values and keep the first error, which [`Obj::finish`] returns: a
/// reader is one struct literal, with no early exit (and no partial drop) per field.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: String,
    err: core::cell::Cell<Option<String>>,
}

/// `at: ` (nothing at the top of the document).
fn prefix(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!("{at}: ")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `at: invalid type: <kind>, expected <want>`.
/// Parses a JSON document whose top level is an object and reads it with `read` (through one
/// [`Obj`]: unknown fields are ignored, the first error is returned). The sidecar's answers.
pub fn document<T>(body: &[u8], read: impl FnOnce(&Obj) -> Res<T>) -> Res<T> {
    let v = crate::json::parse(body).map_err(|e| e.to_string())?;
    let o = Obj::new(&v, "", None)?;
    let t = read(&o)?;
    o.finish(t)
}

pub fn invalid(at: &str, v: &Value, want: &str) -> String {
    format!("{}invalid type: {}, expected {want}", prefix(at), kind(v))
}

/// A string value.
pub fn string(v: &Value, at: &str) -> Res<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(invalid(at, v, "a string")),
    }
}

/// An array value: its items with their places (`at[i]`).
pub fn items<'a>(v: &'a Value, at: &str) -> Res<Vec<(&'a Value, String)>> {
    match v {
        Value::Array(a) => Ok(a
            .iter()
            .enumerate()
            .map(|(i, x)| (x, format!("{at}[{i}]")))
            .collect()),
        _ => Err(invalid(at, v, "an array")),
    }
}

/// Reads every item of an array with `read`.
pub fn list<T>(v: &Value, at: &str, read: fn(&Value, &str) -> Res<T>) -> Res<Vec<T>> {
    // A plain loop: `collect` into a `Result` instantiates an adapter per item type.
    let mut out = Vec::new();
    for (x, at) in items(v, at)? {
        out.push(read(x, &at)?);
    }
    Ok(out)
}

impl<'a> Obj<'a> {
    /// `v` as an object. With `fields` (every accepted name and alias), any other field is refused.
    pub fn new(v: &'a Value, at: &str, fields: Option<&[&str]>) -> Res<Obj<'a>> {
        let Value::Object(map) = v else {
            return Err(invalid(at, v, "an object"));
        };
        if let Some(fields) = fields {
            if let Some(k) = map.keys().find(|k| !fields.contains(&k.as_str())) {
                let mut expected = String::new();
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        expected.push_str("`, `");
                    }
                    expected.push_str(f);
                }
                return Err(format!(
                    "{}unknown field `{k}`, expected one of `{expected}`",
                    prefix(at)
                ));
            }
        }
        Ok(Obj {
            map,
            at: at.to_string(),
            err: core::cell::Cell::new(None),
        })
    }

    /// Keeps `e` unless an error is already kept.
    pub fn fail(&self, e: String) {
        let first = self.err.take().unwrap_or(e);
        self.err.set(Some(first));
    }

    /// The value, or (keeping the error) a placeholder that [`Obj::finish`] will not return.
    fn keep<T: Default>(&self, r: Res<T>) -> T {
        r.unwrap_or_else(|e| {
            self.fail(e);
            T::default()
        })
    }

    /// `v`, unless a getter failed: then the first error.
    pub fn finish<T>(&self, v: T) -> Res<T> {
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(v),
        }
    }

    /// The place of field `name`, for messages and nested readers.
    pub fn at(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    /// The field under its name or an alias (`names[0]` is the name); `None` when absent. `null` is
    /// returned as is (only optional fields take it for absent).
    pub fn get(&self, names: &[&str]) -> Res<Option<&'a Value>> {
        let mut found = names.iter().filter_map(|n| self.map.get(*n));
        let first = found.next();
        if first.is_some() && found.next().is_some() {
            let name = names.first().copied().unwrap_or_default();
            return Err(format!("{}duplicate field `{name}`", prefix(&self.at)));
        }
        Ok(first)
    }

    /// Like [`Obj::get`], with `null` read as absent (an optional field).
    pub fn opt(&self, names: &[&str]) -> Res<Option<&'a Value>> {
        Ok(self.get(names)?.filter(|v| !v.is_null()))
    }

    /// A required field.
    pub fn req(&self, names: &[&str]) -> Res<&'a Value> {
        self.get(names)?.ok_or_else(|| {
            let name = names.first().copied().unwrap_or_default();
            format!("{}missing field `{name}`", prefix(&self.at))
        })
    }

    fn name_at(&self, names: &[&str]) -> String {
        self.at(names.first().copied().unwrap_or_default())
    }

    pub fn string(&self, names: &[&str]) -> String {
        let r = self
            .req(names)
            .and_then(|v| string(v, &self.name_at(names)));
        self.keep(r)
    }

    pub fn opt_string(&self, names: &[&str]) -> Option<String> {
        let r = self
            .opt(names)
            .and_then(|v| v.map(|v| string(v, &self.name_at(names))).transpose());
        self.keep(r)
    }

    pub fn string_or(&self, names: &[&str], default: &str) -> String {
        let r = match self.get(names) {
            Ok(None) => Ok(default.to_string()),
            Ok(Some(v)) => string(v, &self.name_at(names)),
            Err(e) => Err(e),
        };
        self.keep(r)
    }

    fn try_opt_bool(&self, names: &[&str]) -> Res<Option<bool>> {
        match self.opt(names)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid(&self.name_at(names), v, "a boolean")),
        }
    }

    pub fn opt_bool(&self, names: &[&str]) -> Option<bool> {
        let r = self.try_opt_bool(names);
        self.keep(r)
    }

    pub fn bool_or(&self, names: &[&str], default: bool) -> bool {
        let r = match self.get(names) {
            Ok(Some(Value::Null)) => Err(invalid(&self.name_at(names), &Value::Null, "a boolean")),
            _ => self.try_opt_bool(names).map(|b| b.unwrap_or(default)),
        };
        r.unwrap_or_else(|e| {
            self.fail(e);
            default
        })
    }

    /// A non-negative integer no larger than `max`.
    fn int(&self, v: &Value, names: &[&str], max: u64) -> Res<u64> {
        match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ if v.is_number() => Err(format!(
                "{}invalid value: {}, expected an integer from 0 to {max}",
                prefix(&self.name_at(names)),
                crate::translate::json_string(v)
            )),
            _ => Err(invalid(&self.name_at(names), v, "an integer")),
        }
    }

    pub fn opt_uint(&self, names: &[&str], max: u64) -> Option<u64> {
        let r = self
            .opt(names)
            .and_then(|v| v.map(|v| self.int(v, names, max)).transpose());
        self.keep(r)
    }

    pub fn uint_or(&self, names: &[&str], max: u64, default: u64) -> u64 {
        let r = match self.get(names) {
            Ok(None) => Ok(default),
            Ok(Some(v)) => self.int(v, names, max),
            Err(e) => Err(e),
        };
        self.keep(r)
    }

    pub fn opt_f64(&self, names: &[&str]) -> Option<f64> {
        let r = self.opt(names).and_then(|v| match v {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(&self.name_at(names), v, "a number")),
        });
        self.keep(r)
    }

    /// A list of strings; absent: empty.
    pub fn strings(&self, names: &[&str]) -> Vec<String> {
        self.list(names, string)
    }

    pub fn opt_strings(&self, names: &[&str]) -> Option<Vec<String>> {
        self.opt_with(names, |v, at| list(v, at, string))
    }

    /// A list read item by item with `read`; absent: empty.
    pub fn list<T>(&self, names: &[&str], read: fn(&Value, &str) -> Res<T>) -> Vec<T> {
        let r = match self.get(names) {
            Ok(None) => Ok(Vec::new()),
            Ok(Some(v)) => list(v, &self.name_at(names), read),
            Err(e) => Err(e),
        };
        self.keep(r)
    }

    /// A nested value read with `read`; absent (or `null`): `None`.
    pub fn opt_with<T>(&self, names: &[&str], read: fn(&Value, &str) -> Res<T>) -> Option<T> {
        let r = self
            .opt(names)
            .and_then(|v| v.map(|v| read(v, &self.name_at(names))).transpose());
        r.unwrap_or_else(|e| {
            self.fail(e);
            None
        })
    }

    /// A required nested value read with `read` (`fallback` stands in for it after an error).
    pub fn with<T>(&self, names: &[&str], read: fn(&Value, &str) -> Res<T>, fallback: T) -> T {
        match self.req(names).and_then(|v| read(v, &self.name_at(names))) {
            Ok(v) => v,
            Err(e) => {
                self.fail(e);
                fallback
            }
        }
    }

    /// A nested value read with `read`; absent: `T::default()` (`null` is refused, as serde does for
    /// a non-optional field with a default).
    pub fn with_or_default<T: Default>(
        &self,
        names: &[&str],
        read: fn(&Value, &str) -> Res<T>,
    ) -> T {
        let r = match self.get(names) {
            Ok(None) => Ok(T::default()),
            Ok(Some(v)) => read(v, &self.name_at(names)),
            Err(e) => Err(e),
        };
        self.keep(r)
    }

    /// An object of named entries, each read with `read`; absent: empty.
    pub fn entries<T>(
        &self,
        names: &[&str],
        read: fn(&Value, &str) -> Res<T>,
    ) -> alloc::collections::BTreeMap<String, T> {
        let at = self.name_at(names);
        let r = match self.get(names) {
            Ok(None) => Ok(Default::default()),
            Ok(Some(Value::Object(m))) => {
                // Inserted one by one: collecting into a `BTreeMap` sorts (kilobytes of wasm).
                let mut out = alloc::collections::BTreeMap::new();
                for (k, x) in m {
                    match read(x, &format!("{at}.{k}")) {
                        Ok(v) => {
                            out.insert(k.clone(), v);
                        }
                        Err(e) => self.fail(e),
                    }
                }
                Ok(out)
            }
            Ok(Some(v)) => Err(invalid(&at, v, "an object")),
            Err(e) => Err(e),
        };
        self.keep(r)
    }
}

/// Test helper: `read` and the derived deserializer of `T` agree on `json` (both accept it and give
/// the same value, compared serialized, or both refuse it).
#[cfg(test)]
pub fn assert_agrees<T>(json: &Value, read: fn(&Value, &str) -> Res<T>)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let derived = serde_json::from_value::<T>(json.clone()).map_err(|e| e.to_string());
    let hand = read(json, "");
    match (derived, hand) {
        (Ok(d), Ok(h)) => assert_eq!(
            serde_json::to_value(h).unwrap(),
            serde_json::to_value(d).unwrap(),
            "{json}"
        ),
        (Err(_), Err(_)) => {}
        (d, h) => panic!("derive: {:?}, reader: {:?}, on {json}", d.err(), h.err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_aliases_nulls_and_places() {
        let v = json!({"a": "x", "alias": 1, "n": null, "list": [1, "y"]});
        // Each getter on a fresh reader: the first error is the one `finish` returns.
        let o = || Obj::new(&v, "top", None).unwrap();
        let first_error = |o: Obj| o.finish(()).unwrap_err();
        let r = o();
        assert_eq!(r.string(&["a"]), "x");
        assert_eq!(r.opt_uint(&["b", "alias"], 10), Some(1));
        assert_eq!(r.opt_string(&["n"]), None);
        assert_eq!(r.string_or(&["absent"], "d"), "d");
        assert!(r.finish(()).is_ok());
        let r = o();
        r.string_or(&["n"], "d");
        r.string(&["zz"]);
        assert_eq!(
            first_error(r),
            "top.n: invalid type: null, expected a string"
        );
        let r = o();
        r.string(&["zz"]);
        assert_eq!(first_error(r), "top: missing field `zz`");
        let r = o();
        assert!(r.strings(&["list"]).is_empty());
        assert_eq!(
            first_error(r),
            "top.list[0]: invalid type: number, expected a string"
        );
        assert_eq!(
            o().get(&["a", "alias"]).unwrap_err(),
            "top: duplicate field `a`"
        );
        let r = o();
        r.opt_uint(&["alias"], 0);
        assert!(first_error(r).contains("from 0 to 0"));
        assert!(Obj::new(&v, "", Some(&["a", "alias", "n"]))
            .err()
            .unwrap()
            .starts_with("unknown field `list`, expected one of `a`, `alias`, `n`"));
        assert_eq!(
            Obj::new(&json!([]), "", None).err().unwrap(),
            "invalid type: array, expected an object"
        );
    }
}
