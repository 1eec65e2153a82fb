//! Hosted → SaaS fallback, done with Envoy's retry machinery.
//!
//! The first filter (main listener) turns a request whose provider has a fallback chain into an
//! attempt plan, carried to Envoy in one internal request header, and routes it to the aggregate
//! cluster `llm_gateway_chain`. That cluster's priorities are the attempt slots: internal listeners
//! `llm_gateway_attempt_<k>`, each running this filter in attempt role for slot `k`. The chain route
//! retries on 5xx, resets and connection failures with `previous_priorities`, so attempt `k` goes to
//! slot `k`, which shapes the replayed request for the `k`-th provider of the plan (host, path, auth,
//! body) and sends it on through the dynamic forward proxy. A provider that keeps failing is ejected
//! for a while and tried last.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::config::{Identity, Model, ResolvedProvider};
use crate::error::GatewayError;
use serde::{Deserialize, Serialize};

/// Internal request header carrying the attempt plan from the main filter to the attempt filters.
/// Removed by the attempt filter; client-sent values are removed by the main filter.
pub const ATTEMPTS_HEADER: &str = "x-llm-gateway-attempts";
/// The aggregate cluster of attempt slots.
pub const CHAIN_CLUSTER: &str = "llm_gateway_chain";
/// Attempt slots configured in Envoy (primary + fallbacks).
pub const MAX_ATTEMPTS: usize = 4;
/// Response headers set by the attempt filter: which attempt served, and whether it was a fallback.
pub const ATTEMPT_RESPONSE_HEADER: &str = "x-llm-gateway-attempt";
pub const FALLBACK_RESPONSE_HEADER: &str = "x-llm-gateway-fallback";
/// Internal response header: the attempt asked the provider for a usage chunk the client did not.
pub const USAGE_INJECTED_HEADER: &str = "x-llm-gateway-usage-injected";
/// Consecutive failures that eject a provider, and for how long.
pub const EJECT_AFTER_FAILURES: u32 = 3;
pub const EJECT_FOR_MS: u64 = 30_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub provider: ResolvedProvider,
    pub model: Model,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptPlan {
    pub attempts: Vec<Attempt>,
    /// Organization of the caller (provider health is kept per organization and provider name).
    #[serde(default)]
    pub org: String,
    /// The provider the request selected. Ejection reorders the chain (a fallback may then be
    /// attempt 0), so "served by a fallback" means "served by another provider than this one".
    #[serde(default)]
    pub primary: String,
}

impl AttemptPlan {
    /// Whether attempt `index` is a fallback: its provider is not the one the request selected.
    /// (Plans without `primary`, from an older filter, fall back to the attempt position.)
    pub fn is_fallback(&self, index: usize) -> bool {
        match self.attempts.get(index) {
            Some(a) if !self.primary.is_empty() => a.provider.name != self.primary,
            _ => index > 0,
        }
    }
}

/// The attempts for a request that selected `first`/`model`: the provider, then its fallback chain
/// (depth first, each provider once, at most [`MAX_ATTEMPTS`]). A fallback provider serves the same
/// model name if it has it, else its first model. An ejected provider is moved to the end.
pub fn chain(
    id: &Identity,
    first: &ResolvedProvider,
    model: &Model,
    ejected: impl Fn(&str) -> bool,
) -> Vec<Attempt> {
    let lookup = |name: &str| {
        id.providers
            .iter()
            .chain(id.fallback_providers.iter())
            .find(|p| p.name == name)
    };
    let mut out: Vec<Attempt> = vec![Attempt {
        provider: first.clone(),
        model: model.clone(),
    }];
    let mut stack: Vec<String> = first.fallback.iter().rev().cloned().collect();
    while let Some(name) = stack.pop() {
        if out.len() >= MAX_ATTEMPTS || out.iter().any(|a| a.provider.name == name) {
            continue;
        }
        let Some(p) = lookup(&name) else { continue };
        let Some(m) = p.model(&model.name).or_else(|| p.models.first()) else {
            continue;
        };
        stack.extend(p.fallback.iter().rev().cloned());
        out.push(Attempt {
            provider: p.clone(),
            model: m.clone(),
        });
    }
    // Healthy providers first, in chain order; ejected ones keep their relative order at the end.
    let (healthy, sick): (Vec<Attempt>, Vec<Attempt>) =
        out.into_iter().partition(|a| !ejected(&a.provider.name));
    healthy.into_iter().chain(sick).collect()
}

pub fn encode(plan: &AttemptPlan) -> String {
    let json = serde_json::to_vec(plan).unwrap_or_default();
    base64_encode(&json)
}

pub fn decode(header: &str) -> Result<AttemptPlan, GatewayError> {
    let bad = |what: &str| GatewayError::Internal {
        reason: format!("bad attempt plan ({what})"),
    };
    let json = base64_decode(header.trim().as_bytes()).ok_or_else(|| bad("encoding"))?;
    let v = crate::json::parse(&json).map_err(|_| bad("json"))?;
    AttemptPlan::read(&v).map_err(|_| bad("json"))
}

impl AttemptPlan {
    /// Reads a plan by hand (see `crate::read`), as the derive would.
    pub fn read(v: &serde_json::Value) -> crate::read::Res<AttemptPlan> {
        let o = crate::read::Obj::new(v, "", None)?;
        let attempt = |v: &serde_json::Value, at: &str| -> crate::read::Res<Attempt> {
            let o = crate::read::Obj::new(v, at, None)?;
            Ok(Attempt {
                provider: ResolvedProvider::read(o.req(&["provider"])?, &o.at("provider"))?,
                model: Model::read(o.req(&["model"])?, &o.at("model"))?,
            })
        };
        o.finish(AttemptPlan {
            attempts: crate::read::list(o.req(&["attempts"])?, "attempts", attempt)?,
            org: o.string_or(&["org"], ""),
            primary: o.string_or(&["primary"], ""),
        })
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 without padding (a hand-written codec: the `base64` crate's engine is ~5 KB of
/// wasm for this one header).
fn base64_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(c) << (16 - 8 * i));
        for k in 0..=chunk.len() {
            let six = (n >> (18 - 6 * k)) & 63;
            out.push(char::from(
                BASE64.get(six as usize).copied().unwrap_or(b'A'),
            ));
        }
    }
    out
}

/// Decodes [`base64_encode`]'s output; `None` for anything else (other characters, padding, a
/// length no encoding has, nonzero trailing bits).
fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = BASE64.iter().position(|&a| a == c)? as u32;
            n |= v << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        // Bits past the last whole byte must be zero (canonical encoding).
        if n & (0x00ff_ffff >> (8 * bytes)) != 0 {
            return None;
        }
        for k in 0..bytes {
            out.push((n >> (16 - 8 * k)) as u8);
        }
    }
    Some(out)
}

/// Whether an attempt's status makes Envoy try the next provider.
pub fn fails_over(status: u32, fallback_on429: bool) -> bool {
    status >= 500 || (status == 429 && fallback_on429)
}

/// Consecutive failures of one provider, shared by all workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub failures: u32,
    pub ejected_until: u64,
}

impl Health {
    pub fn decode(b: &[u8]) -> Health {
        let text = core::str::from_utf8(b).unwrap_or_default();
        let mut parts = text.split(',');
        Health {
            failures: parts.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            ejected_until: parts.next().and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        format!("{},{}", self.failures, self.ejected_until).into_bytes()
    }

    pub fn after(self, ok: bool, now_ms: u64) -> Health {
        if ok {
            return Health::default();
        }
        let failures = self.failures.saturating_add(1);
        let ejected_until = if failures >= EJECT_AFTER_FAILURES {
            now_ms.saturating_add(EJECT_FOR_MS)
        } else {
            self.ejected_until
        };
        Health {
            failures,
            ejected_until,
        }
    }

    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until
    }
}

/// Shared-data key of a provider's health (provider names are per organization).
pub fn health_key(org: &str, provider: &str) -> String {
    format!("llm-gateway/health/{org}/{provider}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, hash_key, parse, ProcessEnv};

    fn identity(json: &str) -> alloc::rc::Rc<Identity> {
        let json = json.replace("\"H\"", &format!("\"{}\"", hash_key("k")));
        let plan = compile(&parse(json.as_bytes()).unwrap(), &ProcessEnv).unwrap();
        plan.identity_for_hash(&hash_key("k")).unwrap()
    }

    const CFG: &str = r#"{"providers":[
        {"name":"hosted","supportedProvider":"OPENAI_COMPATIBLE","url":"http://h:1/v1","isHosted":true,
         "clusterId":"c1","models":["gpt-4o","llama"],"fallback":["a"]},
        {"name":"a","supportedProvider":"OPENAI","apiKey":"ka","models":["gpt-4o"],"fallback":["b"]},
        {"name":"b","supportedProvider":"MISTRAL","apiKey":"kb","models":["mistral-large"]}],
      "keys":[{"id":"k","sha256":"H","config":"default","clusterId":"c1"}]}"#;

    fn names(c: &[Attempt]) -> Vec<(String, String)> {
        c.iter()
            .map(|a| (a.provider.name.clone(), a.model.name.clone()))
            .collect()
    }

    #[test]
    fn chains_depth_first_with_models() {
        let id = identity(CFG);
        // A cluster-scoped key sees only the hosted provider but keeps its fallbacks.
        assert_eq!(id.providers.len(), 1);
        let first = &id.providers[0];
        let c = chain(&id, first, first.model("gpt-4o").unwrap(), |_| false);
        assert_eq!(
            names(&c),
            vec![
                ("hosted".into(), "gpt-4o".into()),
                ("a".into(), "gpt-4o".into()),
                ("b".into(), "mistral-large".into())
            ]
        );
        let c = chain(&id, first, first.model("llama").unwrap(), |n| n == "hosted");
        assert_eq!(c[0].provider.name, "a");
        assert_eq!(c[2].provider.name, "hosted");
        assert_eq!(c[0].model.name, "gpt-4o"); // a does not serve llama: its first model
                                               // The ejected primary moved last: attempt 0 is still a fallback, the primary is not.
        let plan = AttemptPlan {
            attempts: c,
            org: "o".into(),
            primary: "hosted".into(),
        };
        assert!(plan.is_fallback(0) && plan.is_fallback(1) && !plan.is_fallback(2));
        let legacy = AttemptPlan {
            primary: String::new(),
            ..plan
        };
        assert!(!legacy.is_fallback(0) && legacy.is_fallback(1));
    }

    #[test]
    fn base64_is_the_standard_unpadded_one() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
        let mut seed = 7u64;
        for len in 0..200usize {
            let bytes = crate::test_bytes(&mut seed, len);
            let text = base64_encode(&bytes);
            assert_eq!(text, engine.encode(&bytes));
            assert_eq!(base64_decode(text.as_bytes()), Some(bytes));
        }
        for bad in ["A", "AB=", "AB==", "AB!C", "AAB", "ABC=", "QQ", "QR", "QUJ"] {
            assert_eq!(
                base64_decode(bad.as_bytes()),
                engine.decode(bad).ok(),
                "{bad}"
            );
        }
    }

    #[test]
    fn plan_round_trip_keeps_keys() {
        let id = identity(CFG);
        let first = &id.providers[0];
        let plan = AttemptPlan {
            attempts: chain(&id, first, &first.models[0], |_| false),
            org: "o".into(),
            primary: first.name.clone(),
        };
        let back = decode(&encode(&plan)).unwrap();
        assert_eq!(back, plan);
        let mut v = serde_json::to_value(&plan).unwrap();
        crate::read::assert_agrees(&v, |v, _| AttemptPlan::read(v));
        v["attempts"][0]["provider"]["models"] = serde_json::Value::Null;
        crate::read::assert_agrees(&v, |v, _| AttemptPlan::read(v));
        assert_eq!(back.attempts[1].provider.api_key.as_deref(), Some("ka"));
        assert!(decode("!!!").is_err());
        assert!(decode("e30").is_err()); // "{}"
    }

    #[test]
    fn health_ejects_after_repeated_failures() {
        let mut h = Health::default();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            h = h.after(false, 100);
        }
        assert!(!h.ejected(100));
        h = h.after(false, 100);
        assert!(h.ejected(100 + EJECT_FOR_MS - 1) && !h.ejected(100 + EJECT_FOR_MS));
        assert_eq!(Health::decode(&h.encode()), h);
        assert_eq!(h.after(true, 200), Health::default());
        assert_eq!(Health::decode(b"junk"), Health::default());
    }

    #[test]
    fn which_statuses_fail_over() {
        assert!(fails_over(503, false) && fails_over(500, false));
        assert!(!fails_over(400, true) && !fails_over(429, false) && fails_over(429, true));
    }
}
