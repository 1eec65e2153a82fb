//! Resolving gateway keys through the control-plane sidecar: the callout body, the answer, and the
//! per-VM cache that makes the steady state do no callout at all.
//!
//! Bounds: an identity is served from cache for the TTL the sidecar gives (revocations and config
//! changes take effect within it); past the TTL it is refreshed, and while the sidecar cannot be
//! reached it is served stale for at most `staleSeconds` more. Unknown keys are remembered for
//! `negativeTtlSeconds`.

use crate::config::Identity;
use crate::error::GatewayError;
use hashbrown::HashMap;
use serde::Deserialize;
use std::rc::Rc;

/// Internal endpoint of the sidecar.
pub const RESOLVE_PATH: &str = "/internal/v1/resolve";
/// Header carrying the shared internal token.
pub const TOKEN_HEADER: &str = "x-gateway-token";
/// Entries kept per VM before expired ones are swept (and, if needed, the cache is reset).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    Fresh(Rc<Identity>),
    /// Past its TTL but within the stale bound: refresh, and use it if the sidecar is unreachable.
    Stale(Rc<Identity>),
    /// Recently answered "no such key".
    Unknown,
    Miss,
}

#[derive(Debug, Clone)]
enum Entry {
    Known {
        identity: Rc<Identity>,
        fresh_until: u64,
        stale_until: u64,
    },
    Unknown {
        until: u64,
    },
}

/// Per-VM cache of resolved identities, keyed by key digest.
#[derive(Debug, Default)]
pub struct IdentityCache {
    map: HashMap<String, Entry>,
}

impl IdentityCache {
    pub fn lookup(&self, hash: &str, now_ms: u64) -> Lookup {
        match self.map.get(hash) {
            Some(Entry::Known {
                identity,
                fresh_until,
                stale_until,
            }) => {
                if now_ms < *fresh_until {
                    Lookup::Fresh(identity.clone())
                } else if now_ms < *stale_until {
                    Lookup::Stale(identity.clone())
                } else {
                    Lookup::Miss
                }
            }
            Some(Entry::Unknown { until }) if now_ms < *until => Lookup::Unknown,
            _ => Lookup::Miss,
        }
    }

    pub fn store_known(
        &mut self,
        hash: &str,
        identity: Rc<Identity>,
        now_ms: u64,
        fresh_until: u64,
        stale_until: u64,
    ) {
        self.make_room(now_ms);
        self.map.insert(
            hash.to_string(),
            Entry::Known {
                identity,
                fresh_until,
                stale_until,
            },
        );
    }

    pub fn store_unknown(&mut self, hash: &str, now_ms: u64, until: u64) {
        self.make_room(now_ms);
        self.map.insert(hash.to_string(), Entry::Unknown { until });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn make_room(&mut self, now_ms: u64) {
        if self.map.len() < MAX_ENTRIES {
            return;
        }
        self.map.retain(|_, e| match e {
            Entry::Known { stale_until, .. } => *stale_until > now_ms,
            Entry::Unknown { until } => *until > now_ms,
        });
        if self.map.len() >= MAX_ENTRIES {
            self.map.clear();
        }
    }
}

/// Body of the resolve callout.
pub fn request_body(hash: &str) -> Vec<u8> {
    format!("{{\"keySha256\":\"{hash}\"}}").into_bytes()
}

/// What the sidecar said about a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Known {
        identity: Box<Identity>,
        ttl_ms: u64,
    },
    Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResolveAnswer {
    identity: Identity,
    #[serde(default = "default_ttl")]
    ttl_seconds: u64,
    #[serde(default)]
    store_prompts: bool,
    #[serde(default)]
    prices: std::collections::BTreeMap<String, crate::config::Price>,
}

impl ResolveAnswer {
    fn into_identity(self) -> Identity {
        let mut identity = self.identity;
        identity.store_prompts = self.store_prompts;
        identity.prices = self.prices;
        identity
    }
}

fn default_ttl() -> u64 {
    30
}

/// Interprets the sidecar's answer. `status` is `None` when the callout failed (timeout, reset, no
/// healthy sidecar).
pub fn parse_answer(status: Option<u32>, body: &[u8]) -> Result<Resolved, GatewayError> {
    match status {
        Some(200) => {
            let a: ResolveAnswer =
                serde_json::from_slice(body).map_err(|_| GatewayError::ControlPlaneUnavailable)?;
            let ttl_ms = a.ttl_seconds.saturating_mul(1000);
            Ok(Resolved::Known {
                identity: Box::new(a.into_identity()),
                ttl_ms,
            })
        }
        Some(404) => Ok(Resolved::Unknown),
        _ => Err(GatewayError::ControlPlaneUnavailable),
    }
}

/// Shared-data record (one per key, visible to every worker VM): the validity bounds, then the
/// sidecar's answer as it came.
pub fn encode_shared(fresh_until: u64, stale_until: u64, answer: &[u8]) -> Vec<u8> {
    let mut v = format!("{fresh_until},{stale_until}\n").into_bytes();
    v.extend_from_slice(answer);
    v
}

/// Decodes a shared-data record: `(fresh_until, stale_until, identity)`.
pub fn decode_shared(bytes: &[u8]) -> Option<(u64, u64, Identity)> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (f, s) = head.split_once(',')?;
    let answer: ResolveAnswer = serde_json::from_slice(bytes.get(nl + 1..)?).ok()?;
    Some((f.parse().ok()?, s.parse().ok()?, answer.into_identity()))
}

/// Shared-data key for a key digest.
pub fn shared_key(hash: &str) -> String {
    format!("llm-gateway/identity/{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"identity":{"keyId":"k1","orgId":"o1","configId":"c1","clusterId":null,
      "keySettings":{},"orgSettings":{"provider":"p"},
      "providers":[{"name":"p","kind":"OPENAI","base":{"tls":true,"authority":"api.openai.com","path":"/v1"},
        "models":[{"name":"m","upstream":"m"}],"isHosted":false,"apiKey":"sk-secret-9999",
        "envoyCluster":"llm_gateway_dfp_https","fallback":[]}]},"ttlSeconds":7,"storePrompts":true}"#;

    #[test]
    fn parses_answers() {
        match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, ttl_ms } => {
                assert_eq!(ttl_ms, 7000);
                assert_eq!(identity.org_id, "o1");
                assert_eq!(
                    identity.providers[0].api_key.as_deref(),
                    Some("sk-secret-9999")
                );
                assert_eq!(identity.org_settings.provider.as_deref(), Some("p"));
                assert!(identity.store_prompts);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_answer(Some(404), b"{}").unwrap(), Resolved::Unknown);
        for (status, body) in [
            (Some(401), &b"{}"[..]),
            (Some(500), b""),
            (None, b""),
            (Some(200), b"{"),
        ] {
            assert_eq!(
                parse_answer(status, body).unwrap_err(),
                GatewayError::ControlPlaneUnavailable
            );
        }
    }

    #[test]
    fn cache_fresh_stale_and_unknown() {
        let identity: Rc<Identity> = match parse_answer(Some(200), ANSWER.as_bytes()).unwrap() {
            Resolved::Known { identity, .. } => Rc::from(identity),
            _ => unreachable!(),
        };
        let mut c = IdentityCache::default();
        assert_eq!(c.lookup("h", 0), Lookup::Miss);
        c.store_known("h", identity.clone(), 0, 1000, 5000);
        assert_eq!(c.lookup("h", 999), Lookup::Fresh(identity.clone()));
        assert_eq!(c.lookup("h", 1000), Lookup::Stale(identity.clone()));
        assert_eq!(c.lookup("h", 5000), Lookup::Miss);
        c.store_unknown("x", 0, 100);
        assert_eq!(c.lookup("x", 99), Lookup::Unknown);
        assert_eq!(c.lookup("x", 100), Lookup::Miss);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = IdentityCache::default();
        for i in 0..(MAX_ENTRIES + 10) {
            c.store_unknown(&format!("k{i}"), 0, 10);
        }
        assert!(c.len() <= MAX_ENTRIES);
        // Once entries have expired, a sweep frees their room without dropping live ones.
        c.store_unknown("live", 20, 100);
        assert_eq!(c.lookup("live", 21), Lookup::Unknown);
    }

    #[test]
    fn shared_records_round_trip() {
        let rec = encode_shared(11, 22, ANSWER.as_bytes());
        let (f, s, id) = decode_shared(&rec).unwrap();
        assert_eq!((f, s, id.key_id.as_str()), (11, 22, "k1"));
        assert!(decode_shared(b"garbage").is_none());
        assert!(decode_shared(b"1,2\n{}").is_none());
        assert_eq!(request_body("ab"), br#"{"keySha256":"ab"}"#.to_vec());
    }
}
