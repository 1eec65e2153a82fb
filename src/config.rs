//! Gateway configuration: the YAML/JSON a user writes (`RawConfig`), validated and compiled once at
//! configure time into an immutable [`Plan`] that each request only reads.
//!
//! The same provider/config model is used by the sidecar (issue 3): it stores registrations and configs
//! and hands the filter an already flattened [`Identity`] per gateway key.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::read::{list, Obj, Res};
use crate::url::BaseUrl;
use alloc::rc::Rc;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default request body limit (bytes): generous enough for multi-image chat requests.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Envoy cluster used for plain-http providers (dynamic forward proxy).
pub const DEFAULT_HTTP_CLUSTER: &str = "llm_gateway_dfp_http";
/// Envoy cluster used for https providers (dynamic forward proxy with TLS, SNI, cert validation).
pub const DEFAULT_HTTPS_CLUSTER: &str = "llm_gateway_dfp_https";
/// Id of the built-in default configuration.
pub const DEFAULT_CONFIG_ID: &str = "default";
/// Custom configurations may be stacked at most this many levels above the default config.
pub const MAX_INHERITANCE_DEPTH: usize = 3;

// ----------------------------------------------------------------------------------------------
// What the user writes.
// ----------------------------------------------------------------------------------------------

/// Top-level gateway configuration (the filter's `configuration` in Envoy, as JSON or YAML-as-Struct).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawConfig {
    /// Largest accepted request body in bytes (413 above it).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// A gateway key (plain text) used for requests that carry no key at all (`apiKeyFallback` in the
    /// reference's words): a static key of `keys`, or, with a `sidecar`, a control-plane key resolved
    /// like any other.
    #[serde(default, alias = "apiKeyFallback")]
    pub fallback_key: Option<String>,
    /// The same, read from this environment variable of the Envoy process (a mounted secret).
    #[serde(default, alias = "apiKeyFallbackEnv")]
    pub fallback_key_env: Option<String>,
    /// Organization id reported for static keys.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Organization-level settings (lowest priority).
    #[serde(default)]
    pub settings: Settings,
    /// Envoy cluster names for providers not pinned to a cluster.
    #[serde(default)]
    pub upstream_clusters: Option<UpstreamClusters>,
    /// Provider registrations (a provider type may be registered many times under different names).
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    /// Custom configurations; `default` exists implicitly (all providers, all models).
    #[serde(default)]
    pub configs: Vec<ConfigSpec>,
    /// Gateway API keys, stored as SHA-256 digests.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// The control-plane sidecar that resolves keys not listed in `keys`.
    #[serde(default)]
    pub sidecar: Option<SidecarSpec>,
    /// Model prices (USD per 1M tokens) for the cost metric, by model name (upstream or public).
    #[serde(default)]
    pub prices: alloc::collections::BTreeMap<String, Price>,
    /// Set only in the filter instances of the fallback attempt listeners: this instance shapes
    /// attempt number `attemptSlot` (0-based) of a fallback chain.
    #[serde(default)]
    pub attempt_slot: Option<usize>,
    /// Forward other `/openai/v1/*` paths (images, audio, moderations, files, batches, ...) to the
    /// selected provider with its auth; off by default (404).
    #[serde(default)]
    pub openai_passthrough: bool,
    /// Set the `llm_gateway.*` filter-state entries for Envoy's access log after each request
    /// (default on); off saves their nine `set_property` calls where no access log reads them.
    #[serde(default = "default_true")]
    pub filter_state: bool,
}

fn default_true() -> bool {
    true
}

/// A model's price in USD per 1M tokens; `cached` (input tokens served from cache) defaults to `input`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<f64>,
}

impl Price {
    /// Cost in nano-USD ($1 per 1M tokens is 1,000 nano-USD per token).
    pub fn cost_nano_usd(&self, prompt: u64, completion: u64, cached: u64) -> u64 {
        let cached = cached.min(prompt);
        let usd_per_m = (prompt - cached) as f64 * self.input
            + cached as f64 * self.cached.unwrap_or(self.input)
            + completion as f64 * self.output;
        let nano = usd_per_m * 1000.0;
        if nano.is_finite() && nano > 0.0 {
            // Rounded half away from zero (`f64::round` is not in `core`).
            let whole = nano as u64;
            whole + u64::from(nano - whole as f64 >= 0.5)
        } else {
            0
        }
    }
}

/// Where and how the filter reaches the control-plane sidecar.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    /// Envoy cluster of the sidecar.
    #[serde(default = "default_sidecar_cluster")]
    pub cluster: String,
    /// `:authority` of callouts.
    #[serde(default = "default_sidecar_authority")]
    pub authority: String,
    /// Shared token for the internal endpoints (or `tokenEnv`, an environment variable holding it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Callout timeout; a request never waits longer on the sidecar.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long past its TTL a cached identity may still serve while the sidecar is unreachable.
    #[serde(default = "default_stale_seconds")]
    pub stale_seconds: u64,
    /// How long an unknown key is remembered as unknown (shields the sidecar from key spraying).
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl_seconds: u64,
    /// Sidecar lookups of keys found in no cache, per worker and second (token bucket rate)…
    #[serde(default = "default_lookup_rate")]
    pub unknown_key_lookups_per_second: u32,
    /// …and how many may go out at once (bucket size). Past it: 429 `key_lookup_rate_limited`.
    #[serde(default = "default_lookup_burst")]
    pub unknown_key_lookup_burst: u32,
    /// Consecutive sidecar failures (timeouts, resets, 5xx) that open the circuit breaker…
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// …and for how long it stays open (unknown keys fail fast with 503 meanwhile).
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_seconds: u64,
    /// Usage records buffered per worker while the sidecar cannot take them, in bytes of JSON.
    #[serde(default = "default_usage_buffer_bytes")]
    pub usage_buffer_bytes: usize,
    /// Operator allow-list of provider destinations (SSRF policy, `crate::destination`): providers
    /// resolved by the sidecar whose URL the policy refuses are refused by the filter too.
    #[serde(default)]
    pub allowed_destinations: String,
    /// Budgets when the sidecar has not renewed an allowance within its lease: `open` (admit) or
    /// `closed` (503 `limits_unavailable`). See docs/operations.md, "Budgets and rate limits".
    #[serde(default = "default_limits_failure_mode")]
    pub limits_failure_mode: String,
}

fn default_limits_failure_mode() -> String {
    "open".to_string()
}

fn default_sidecar_cluster() -> String {
    "llm_gateway_sidecar".to_string()
}
fn default_sidecar_authority() -> String {
    "llm-gateway-sidecar".to_string()
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_stale_seconds() -> u64 {
    300
}
fn default_negative_ttl() -> u64 {
    5
}
fn default_lookup_rate() -> u32 {
    20
}
fn default_lookup_burst() -> u32 {
    50
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown() -> u64 {
    10
}
fn default_usage_buffer_bytes() -> usize {
    crate::report::DEFAULT_MAX_BUFFERED_BYTES
}

/// The sidecar settings with the token resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarPlan {
    pub cluster: String,
    pub authority: String,
    pub token: String,
    pub timeout_ms: u64,
    pub stale_ms: u64,
    pub negative_ttl_ms: u64,
    pub lookups_per_second: u32,
    pub lookup_burst: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    pub usage_buffer_bytes: usize,
    pub destinations: crate::destination::Policy,
    /// Past an allowance's lease: admit (true) or refuse (false).
    pub limits_fail_open: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamClusters {
    pub http: String,
    pub https: String,
}

/// Routing preferences; used at org level and per API key.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Provider (registration name) to route to when the request names none.
    #[serde(
        default,
        alias = "providerName",
        skip_serializing_if = "Option::is_none"
    )]
    pub provider: Option<String>,
    /// Model to use when the request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Store request messages and answers with the usage records. The control plane acts on it (absent =
    /// inherit: key -> cluster context -> organization -> false); routing ignores it. One definition of
    /// settings for the filter and the sidecar: a new setting is added here once.
    #[serde(
        default,
        alias = "store_prompts",
        skip_serializing_if = "Option::is_none"
    )]
    pub store_prompts: Option<bool>,
}

/// A model entry: either a plain name, or a public name mapped to the name the provider expects.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Name(String),
    Mapped {
        name: String,
        #[serde(alias = "upstream_name", rename = "upstreamName")]
        upstream_name: String,
    },
}

impl ModelSpec {
    pub fn name(&self) -> &str {
        match self {
            ModelSpec::Name(n) => n,
            ModelSpec::Mapped { name, .. } => name,
        }
    }
    pub fn to_model(&self) -> Model {
        match self {
            ModelSpec::Name(n) => Model {
                name: n.clone(),
                upstream: n.clone(),
            },
            ModelSpec::Mapped {
                name,
                upstream_name,
            } => Model {
                name: name.clone(),
                upstream: upstream_name.clone(),
            },
        }
    }
}

/// A provider registration, with the field names of `POST /v1/llm/providers`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderSpec {
    pub name: String,
    #[serde(alias = "type")]
    pub supported_provider: String,
    /// Base URL (`api_base`); defaults to the provider's public endpoint.
    #[serde(
        default,
        alias = "api_base",
        alias = "apiBase",
        skip_serializing_if = "Option::is_none"
    )]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub is_hosted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Name of an environment variable of the Envoy process holding the key (exposed to the VM
    /// through `vm_config.environment_variables.host_env_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Pin the provider to a named Envoy cluster instead of the dynamic forward proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// For hosted providers: the Kubernetes cluster they run in (token scopes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Providers to fall back to, in order, when this (hosted) provider fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    /// Which API to speak for ANTHROPIC, GEMINI and VERTEXAIGEMINI: `native` (translated by the
    /// gateway) or `openai` (the provider's OpenAI-compatible endpoint). Defaults: Anthropic native,
    /// Gemini and Vertex `openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Also fall back when this provider answers 429 (rate limited); 5xx and connection failures
    /// always fall back.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub fallback_on429: bool,
    /// Upstream timeouts for this provider (`totalMs`, `perTryMs`); unset: the Envoy route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<crate::plan::Timeouts>,
}

/// A custom configuration: which providers and models a key may use, with optional overrides.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigSpec {
    #[serde(alias = "config_id", alias = "configId")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parent config id (`default` or another config).
    #[serde(
        default,
        alias = "parent",
        alias = "inherits_from",
        skip_serializing_if = "Option::is_none"
    )]
    pub inherits: Option<String>,
    /// Additions and overrides, merged by provider name into the parent's list: an entry naming an
    /// inherited provider overrides only the fields it sets (models, apiKey, apiBase); an entry naming
    /// another registered provider adds it. Empty: the parent's list unchanged.
    #[serde(default)]
    pub providers: Vec<ConfigProviderSpec>,
    /// Narrowing: when set, only these providers (in this order) of the merged list are kept.
    #[serde(
        default,
        alias = "restrictTo",
        alias = "restrict_to",
        skip_serializing_if = "Option::is_none"
    )]
    pub only: Option<Vec<String>>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigProviderSpec {
    /// Provider registration name.
    pub name: String,
    /// Allowed models; absent: the parent's list (or all the provider's models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, alias = "api_key", skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, alias = "api_base", skip_serializing_if = "Option::is_none")]
    pub api_base: Option<String>,
}

/// A gateway API key (only its SHA-256 digest is stored).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    #[serde(alias = "config_id", alias = "configId")]
    pub config: String,
    #[serde(default)]
    pub settings: Settings,
    /// Cluster id for cluster-scoped keys; absent: organization scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

// ----------------------------------------------------------------------------------------------
// What requests read.
// ----------------------------------------------------------------------------------------------

// Provider kinds, models and resolved providers live in `plan` (a leaf module both this one and
// `providers` import: no module circle).
pub use crate::plan::{last4, Model, ProviderKind, ResolvedProvider};

/// Everything a request needs to know about its caller: produced from static config or by the sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub key_id: String,
    pub org_id: String,
    pub config_id: String,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub key_settings: Settings,
    #[serde(default)]
    pub org_settings: Settings,
    /// The providers of the key's config, in config order.
    pub providers: Vec<ResolvedProvider>,
    /// Providers reachable only as fallbacks of the providers above (e.g. the org's SaaS fallback of a
    /// hosted model, for a cluster-scoped key). Never selected or listed directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_providers: Vec<ResolvedProvider>,
    /// Models of the key's config that its cluster scope hides (served only by organization-level
    /// providers): asking for one is refused with a message naming the scope as the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub out_of_scope_models: Vec<String>,
    /// Whether prompts and completions are stored with usage records (the sidecar's `storePrompts`,
    /// off by default; static keys never store them).
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub store_prompts: bool,
    /// Prices by `provider/model` (the sidecar's catalog and overrides), for the cost metric.
    #[serde(
        default,
        skip_serializing_if = "alloc::collections::BTreeMap::is_empty"
    )]
    pub prices: alloc::collections::BTreeMap<String, Price>,
    /// Set by the filter when a provider of this identity points where the destination policy
    /// forbids: `(provider, reason)`; requests with the key are refused (403 destination_forbidden).
    #[serde(skip)]
    pub refused: Option<(String, String)>,
}

impl Identity {
    pub fn provider(&self, name: &str) -> Option<&ResolvedProvider> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The cluster a usage record is attributed to: the key's cluster scope, else the cluster of the
    /// hosted provider that served (an organization-scoped key served in a cluster).
    pub fn usage_cluster(&self, served_by: &str) -> Option<String> {
        self.cluster_id.clone().or_else(|| {
            self.providers
                .iter()
                .chain(self.fallback_providers.iter())
                .find(|p| p.name == served_by && p.is_hosted)
                .and_then(|p| p.cluster_id.clone())
        })
    }
}

/// The compiled, immutable gateway configuration.
#[derive(Debug, Default)]
pub struct Plan {
    pub max_body_bytes: usize,
    /// Digest of the fallback key, if one is configured.
    pub fallback_key_hash: Option<String>,
    /// Identities by hex SHA-256 of the gateway key.
    pub keys: HashMap<String, Rc<Identity>>,
    /// Set when unknown keys are resolved through the control-plane sidecar.
    pub sidecar: Option<SidecarPlan>,
    /// Attempt role: which attempt of a fallback chain this filter instance shapes.
    pub attempt_slot: Option<usize>,
    /// Static model prices (USD per 1M tokens) by model name.
    pub prices: HashMap<String, Price>,
    /// Other `/openai/v1/*` paths are forwarded to the provider (`openaiPassthrough`).
    pub openai_passthrough: bool,
    /// The access-log filter state is set after each request (`filterState`).
    pub filter_state: bool,
}

impl Plan {
    /// The price of `model` (upstream name first, then public name) at `provider`.
    pub fn price(
        &self,
        id: &Identity,
        provider: &str,
        upstream: &str,
        public: &str,
    ) -> Option<Price> {
        [upstream, public]
            .iter()
            .find_map(|m| id.prices.get(&format!("{provider}/{m}")))
            .or_else(|| self.prices.get(upstream))
            .or_else(|| self.prices.get(public))
            .copied()
    }
}

impl Plan {
    pub fn identity_for_hash(&self, hash: &str) -> Option<Rc<Identity>> {
        self.keys.get(hash).cloned()
    }
}

/// Hex SHA-256 of a gateway key.
pub fn hash_key(key: &str) -> String {
    let digest = sha256(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(hex_digit(b >> 4));
        out.push(hex_digit(b & 0x0f));
    }
    out
}

const SHA256_K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// SHA-256 (FIPS 180-4), written out: the `sha2` crate's unrolled compression is ~4 KB of wasm for
/// one short key per request. Unit tests check it against `sha2` (a dev-dependency).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    // The message, 0x80, zeros, and the bit length: a whole number of 64-byte blocks.
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            if let (Some(slot), Ok(b)) = (w.get_mut(i), <[u8; 4]>::try_from(word)) {
                *slot = u32::from_be_bytes(b);
            }
        }
        for i in 16..64 {
            let at = |k: usize| w.get(k).copied().unwrap_or_default();
            let (a, b) = (at(i - 15), at(i - 2));
            let s0 = a.rotate_right(7) ^ a.rotate_right(18) ^ (a >> 3);
            let s1 = b.rotate_right(17) ^ b.rotate_right(19) ^ (b >> 10);
            let v = at(i - 16)
                .wrapping_add(s0)
                .wrapping_add(at(i - 7))
                .wrapping_add(s1);
            if let Some(slot) = w.get_mut(i) {
                *slot = v;
            }
        }
        let mut s = h;
        for (k, wi) in SHA256_K.iter().zip(w.iter()) {
            let [a, b, c, d, e, f, g, hh] = s;
            let t1 = hh
                .wrapping_add(e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25))
                .wrapping_add((e & f) ^ (!e & g))
                .wrapping_add(*k)
                .wrapping_add(*wi);
            let t2 = (a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22))
                .wrapping_add((a & b) ^ (a & c) ^ (b & c));
            s = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
        }
        for (x, y) in h.iter_mut().zip(s) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn hex_digit(n: u8) -> char {
    match n {
        0..=9 => (b'0' + n) as char,
        _ => (b'a' + n - 10) as char,
    }
}

// ----------------------------------------------------------------------------------------------
// Compilation.
// ----------------------------------------------------------------------------------------------

/// Looks up provider keys given by reference (`apiKeyEnv`). The filter reads the VM environment.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
}

/// Reads secrets from the process environment (in Envoy: the variables exposed to the VM).
pub struct ProcessEnv;

impl SecretSource for ProcessEnv {
    fn env(&self, name: &str) -> Option<String> {
        crate::sys::env_var(name)
    }
}

/// Parses the filter configuration bytes: JSON text (a `google.protobuf.StringValue` in Envoy, or
/// Istio's `pluginConfig`), or a binary `google.protobuf.Struct` (native YAML in the Envoy config).
pub fn parse(bytes: &[u8]) -> Result<RawConfig, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let invalid = |e: String| format!("gateway configuration is not valid: {e}");
    let value = match first {
        None => return Ok(RawConfig::default()),
        Some(b'{') => crate::json::parse(bytes).map_err(|e| invalid(e.to_string()))?,
        Some(_) => crate::pbstruct::struct_to_json(bytes).map_err(invalid)?,
    };
    RawConfig::read(&value, "").map_err(invalid)
}

// ----------------------------------------------------------------------------------------------
// Reading (by hand: see `crate::read`; the unit tests hold every reader to the derived deserializer).
// ----------------------------------------------------------------------------------------------

impl RawConfig {
    pub fn read(v: &Value, at: &str) -> Res<RawConfig> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "maxBodyBytes",
                "fallbackKey",
                "apiKeyFallback",
                "fallbackKeyEnv",
                "apiKeyFallbackEnv",
                "orgId",
                "settings",
                "upstreamClusters",
                "providers",
                "configs",
                "keys",
                "sidecar",
                "prices",
                "attemptSlot",
                "openaiPassthrough",
                "filterState",
            ]),
        )?;
        o.finish(RawConfig {
            max_body_bytes: o.opt_uint(&["maxBodyBytes"], USIZE_MAX).map(as_usize),
            fallback_key: o.opt_string(&["fallbackKey", "apiKeyFallback"]),
            fallback_key_env: o.opt_string(&["fallbackKeyEnv", "apiKeyFallbackEnv"]),
            org_id: o.opt_string(&["orgId"]),
            settings: o.with_or_default(&["settings"], Settings::read),
            upstream_clusters: o.opt_with(&["upstreamClusters"], UpstreamClusters::read),
            providers: o.list(&["providers"], ProviderSpec::read),
            configs: o.list(&["configs"], ConfigSpec::read),
            keys: o.list(&["keys"], KeySpec::read),
            sidecar: o.opt_with(&["sidecar"], SidecarSpec::read),
            prices: o.entries(&["prices"], Price::read),
            attempt_slot: o.opt_uint(&["attemptSlot"], USIZE_MAX).map(as_usize),
            openai_passthrough: o.bool_or(&["openaiPassthrough"], false),
            filter_state: o.bool_or(&["filterState"], true),
        })
    }
}

/// The largest `usize` (32 bits in the filter), for integer fields of that type.
const USIZE_MAX: u64 = if usize::BITS < 64 {
    u32::MAX as u64
} else {
    u64::MAX
};

/// An integer already checked against [`USIZE_MAX`].
fn as_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Price {
    pub fn read(v: &Value, at: &str) -> Res<Price> {
        let o = Obj::new(v, at, Some(&["input", "output", "cached"]))?;
        let num = |name: &str| {
            o.opt_f64(&[name]).unwrap_or_else(|| {
                o.fail(format!("{at}: missing field `{name}`"));
                0.0
            })
        };
        o.finish(Price {
            input: num("input"),
            output: num("output"),
            cached: o.opt_f64(&["cached"]),
        })
    }
}

impl SidecarSpec {
    pub fn read(v: &Value, at: &str) -> Res<SidecarSpec> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "cluster",
                "authority",
                "token",
                "tokenEnv",
                "timeoutMs",
                "staleSeconds",
                "negativeTtlSeconds",
                "unknownKeyLookupsPerSecond",
                "unknownKeyLookupBurst",
                "breakerFailures",
                "breakerCooldownSeconds",
                "usageBufferBytes",
                "allowedDestinations",
                "limitsFailureMode",
            ]),
        )?;
        let u32_or = |name: &str, d: u32| -> u32 {
            let n = o.uint_or(&[name], u32::MAX.into(), d.into());
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        o.finish(SidecarSpec {
            cluster: o.string_or(&["cluster"], &default_sidecar_cluster()),
            authority: o.string_or(&["authority"], &default_sidecar_authority()),
            token: o.opt_string(&["token"]),
            token_env: o.opt_string(&["tokenEnv"]),
            timeout_ms: o.uint_or(&["timeoutMs"], u64::MAX, default_timeout_ms()),
            stale_seconds: o.uint_or(&["staleSeconds"], u64::MAX, default_stale_seconds()),
            negative_ttl_seconds: o.uint_or(
                &["negativeTtlSeconds"],
                u64::MAX,
                default_negative_ttl(),
            ),
            unknown_key_lookups_per_second: u32_or(
                "unknownKeyLookupsPerSecond",
                default_lookup_rate(),
            ),
            unknown_key_lookup_burst: u32_or("unknownKeyLookupBurst", default_lookup_burst()),
            breaker_failures: u32_or("breakerFailures", default_breaker_failures()),
            breaker_cooldown_seconds: o.uint_or(
                &["breakerCooldownSeconds"],
                u64::MAX,
                default_breaker_cooldown(),
            ),
            usage_buffer_bytes: as_usize(o.uint_or(
                &["usageBufferBytes"],
                USIZE_MAX,
                default_usage_buffer_bytes() as u64,
            )),
            allowed_destinations: o.string_or(&["allowedDestinations"], ""),
            limits_failure_mode: o
                .string_or(&["limitsFailureMode"], &default_limits_failure_mode()),
        })
    }
}

impl UpstreamClusters {
    pub fn read(v: &Value, at: &str) -> Res<UpstreamClusters> {
        let o = Obj::new(v, at, Some(&["http", "https"]))?;
        o.finish(UpstreamClusters {
            http: o.string(&["http"]),
            https: o.string(&["https"]),
        })
    }
}

impl Settings {
    pub fn read(v: &Value, at: &str) -> Res<Settings> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "provider",
                "providerName",
                "model",
                "storePrompts",
                "store_prompts",
            ]),
        )?;
        o.finish(Settings {
            provider: o.opt_string(&["provider", "providerName"]),
            model: o.opt_string(&["model"]),
            store_prompts: o.opt_bool(&["storePrompts", "store_prompts"]),
        })
    }
}

impl ModelSpec {
    /// A name, or `{"name", "upstreamName"}` (other fields ignored, as the untagged derive does).
    pub fn read(v: &Value, at: &str) -> Res<ModelSpec> {
        let mapped = || -> Res<ModelSpec> {
            let o = Obj::new(v, at, None)?;
            o.finish(ModelSpec::Mapped {
                name: o.string(&["name"]),
                upstream_name: o.string(&["upstreamName", "upstream_name"]),
            })
        };
        match v {
            Value::String(s) => Ok(ModelSpec::Name(s.clone())),
            _ => mapped().map_err(|e| {
                format!("{e} (a model is a name or {{\"name\": .., \"upstreamName\": ..}})")
            }),
        }
    }
}

impl ProviderSpec {
    pub fn read(v: &Value, at: &str) -> Res<ProviderSpec> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "name",
                "supportedProvider",
                "type",
                "url",
                "api_base",
                "apiBase",
                "apiVersion",
                "models",
                "isHosted",
                "apiKey",
                "apiKeyEnv",
                "cluster",
                "clusterId",
                "fallback",
                "api",
                "fallbackOn429",
                "timeouts",
            ]),
        )?;
        o.finish(ProviderSpec {
            name: o.string(&["name"]),
            supported_provider: o.string(&["supportedProvider", "type"]),
            url: o.opt_string(&["url", "api_base", "apiBase"]),
            api_version: o.opt_string(&["apiVersion"]),
            models: o.list(&["models"], ModelSpec::read),
            is_hosted: o.bool_or(&["isHosted"], false),
            api_key: o.opt_string(&["apiKey"]),
            api_key_env: o.opt_string(&["apiKeyEnv"]),
            cluster: o.opt_string(&["cluster"]),
            cluster_id: o.opt_string(&["clusterId"]),
            fallback: o.strings(&["fallback"]),
            api: o.opt_string(&["api"]),
            fallback_on429: o.bool_or(&["fallbackOn429"], false),
            timeouts: o.opt_with(&["timeouts"], crate::plan::Timeouts::read),
        })
    }
}

impl ConfigSpec {
    pub fn read(v: &Value, at: &str) -> Res<ConfigSpec> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "id",
                "config_id",
                "configId",
                "name",
                "inherits",
                "parent",
                "inherits_from",
                "providers",
                "only",
                "restrictTo",
                "restrict_to",
            ]),
        )?;
        o.finish(ConfigSpec {
            id: o.string(&["id", "config_id", "configId"]),
            name: o.opt_string(&["name"]),
            inherits: o.opt_string(&["inherits", "parent", "inherits_from"]),
            providers: o.list(&["providers"], ConfigProviderSpec::read),
            only: o.opt_strings(&["only", "restrictTo", "restrict_to"]),
        })
    }
}

impl ConfigProviderSpec {
    pub fn read(v: &Value, at: &str) -> Res<ConfigProviderSpec> {
        let o = Obj::new(
            v,
            at,
            Some(&["name", "models", "apiKey", "api_key", "apiBase", "api_base"]),
        )?;
        o.finish(ConfigProviderSpec {
            name: o.string(&["name"]),
            models: o.opt_strings(&["models"]),
            api_key: o.opt_string(&["apiKey", "api_key"]),
            api_base: o.opt_string(&["apiBase", "api_base"]),
        })
    }
}

impl KeySpec {
    pub fn read(v: &Value, at: &str) -> Res<KeySpec> {
        let o = Obj::new(
            v,
            at,
            Some(&[
                "id",
                "sha256",
                "config",
                "config_id",
                "configId",
                "settings",
                "clusterId",
            ]),
        )?;
        o.finish(KeySpec {
            id: o.string(&["id"]),
            sha256: o.string(&["sha256"]),
            config: o.string(&["config", "config_id", "configId"]),
            settings: o.with_or_default(&["settings"], Settings::read),
            cluster_id: o.opt_string(&["clusterId"]),
        })
    }
}

impl Identity {
    /// The sidecar's identity (unknown fields are ignored: a newer sidecar may add some).
    pub fn read(v: &Value, at: &str) -> Res<Identity> {
        let o = Obj::new(v, at, None)?;
        o.finish(Identity {
            key_id: o.string(&["keyId"]),
            org_id: o.string(&["orgId"]),
            config_id: o.string(&["configId"]),
            cluster_id: o.opt_string(&["clusterId"]),
            key_settings: o.with_or_default(&["keySettings"], Settings::read),
            org_settings: o.with_or_default(&["orgSettings"], Settings::read),
            providers: o.with(
                &["providers"],
                |v, at| list(v, at, ResolvedProvider::read),
                Vec::new(),
            ),
            fallback_providers: o.list(&["fallbackProviders"], ResolvedProvider::read),
            out_of_scope_models: o.strings(&["outOfScopeModels"]),
            store_prompts: o.bool_or(&["storePrompts"], false),
            prices: o.entries(&["prices"], Price::read),
            refused: None,
        })
    }
}

/// Validates a raw configuration and compiles it into a [`Plan`].
pub fn compile(raw: &RawConfig, secrets: &dyn SecretSource) -> Result<Plan, String> {
    let clusters = raw.upstream_clusters.clone().unwrap_or(UpstreamClusters {
        http: DEFAULT_HTTP_CLUSTER.to_string(),
        https: DEFAULT_HTTPS_CLUSTER.to_string(),
    });
    let registry = compile_providers(&raw.providers, &clusters, secrets)?;
    let configs = flatten_configs(&raw.providers, &raw.configs)?;

    let org_id = raw.org_id.clone().unwrap_or_else(|| "default".to_string());
    let mut keys = HashMap::new();
    let mut ids = hashbrown::HashSet::new();
    for k in &raw.keys {
        if !ids.insert(k.id.as_str()) {
            return Err(format!("key id '{}' is defined twice", k.id));
        }
        let hash = k.sha256.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("key '{}': sha256 must be 64 hex characters", k.id));
        }
        let flat = configs
            .get(&k.config)
            .ok_or_else(|| format!("key '{}': unknown config '{}'", k.id, k.config))?;
        let mut providers = Vec::with_capacity(flat.len());
        for entry in flat {
            providers.push(resolve_entry(entry, &registry, &clusters)?);
        }
        let (providers, fallback_providers, out_of_scope_models) =
            scope_filter(providers, k.cluster_id.as_deref(), &registry, &clusters)?;
        let identity = Identity {
            key_id: k.id.clone(),
            org_id: org_id.clone(),
            config_id: k.config.clone(),
            cluster_id: k.cluster_id.clone(),
            key_settings: k.settings.clone(),
            org_settings: raw.settings.clone(),
            providers,
            fallback_providers,
            out_of_scope_models,
            store_prompts: false,
            prices: Default::default(),
            refused: None,
        };
        if keys.insert(hash, Rc::new(identity)).is_some() {
            return Err(format!("key '{}' has the same sha256 as another key", k.id));
        }
    }
    let fallback_key = match (&raw.fallback_key, &raw.fallback_key_env) {
        (Some(_), Some(_)) => {
            return Err("set fallbackKey or fallbackKeyEnv, not both".to_string());
        }
        (Some(k), None) => Some(k.trim().to_string()),
        // An unset or empty variable means no fallback key (deployments ship the reference to an
        // optional secret).
        (None, Some(var)) => secrets.env(var).map(|k| k.trim().to_string()),
        (None, None) => None,
    };
    let fallback_key_hash = match fallback_key.filter(|k| !k.is_empty()) {
        Some(k) => {
            let h = hash_key(&k);
            // A key the static list does not hold is resolved through the sidecar like any key.
            if !keys.contains_key(&h) && raw.sidecar.is_none() {
                return Err(
                    "fallbackKey is not one of the configured keys (and no sidecar resolves it)"
                        .to_string(),
                );
            }
            Some(h)
        }
        None => None,
    };
    let sidecar = match &raw.sidecar {
        None => None,
        Some(sc) => {
            let token = match (&sc.token, &sc.token_env) {
                (Some(t), None) => t.clone(),
                (None, Some(var)) => secrets.env(var).ok_or_else(|| {
                    format!("sidecar: environment variable {var} (tokenEnv) is not set")
                })?,
                _ => return Err("sidecar: set exactly one of token and tokenEnv".to_string()),
            };
            Some(SidecarPlan {
                cluster: sc.cluster.clone(),
                authority: sc.authority.clone(),
                token,
                timeout_ms: sc.timeout_ms.max(1),
                stale_ms: sc.stale_seconds.saturating_mul(1000),
                negative_ttl_ms: sc.negative_ttl_seconds.saturating_mul(1000),
                lookups_per_second: sc.unknown_key_lookups_per_second,
                lookup_burst: sc.unknown_key_lookup_burst,
                breaker_failures: sc.breaker_failures,
                breaker_cooldown_ms: sc.breaker_cooldown_seconds.saturating_mul(1000),
                usage_buffer_bytes: sc.usage_buffer_bytes,
                destinations: crate::destination::Policy::parse(&sc.allowed_destinations)
                    .map_err(|e| format!("sidecar.allowedDestinations: {e}"))?,
                limits_fail_open: match sc.limits_failure_mode.as_str() {
                    "open" => true,
                    "closed" => false,
                    other => {
                        return Err(format!(
                            "sidecar.limitsFailureMode: '{other}' is not open or closed"
                        ))
                    }
                },
            })
        }
    };
    Ok(Plan {
        max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        fallback_key_hash,
        keys,
        sidecar,
        attempt_slot: raw.attempt_slot,
        prices: raw.prices.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        openai_passthrough: raw.openai_passthrough,
        filter_state: raw.filter_state,
    })
}

/// Splits a key's providers into the ones it may select and the ones reachable only as fallbacks.
///
/// Organization-scoped keys select any provider of their config. Cluster-scoped keys only select the
/// hosted providers of their cluster. For both, the fallback chains of the selectable providers are
/// resolved: a fallback provider that is not selectable itself (e.g. the org's SaaS fallback of a
/// hosted model, for a cluster token) is returned in the second list, with all its registered models.
/// The third list names the models the scope hides (served by none of the selectable providers).
type Scoped = (Vec<ResolvedProvider>, Vec<ResolvedProvider>, Vec<String>);
fn scope_filter(
    providers: Vec<ResolvedProvider>,
    cluster: Option<&str>,
    registry: &HashMap<String, Registered>,
    clusters: &UpstreamClusters,
) -> Result<Scoped, String> {
    let (visible, hidden): (Vec<ResolvedProvider>, Vec<ResolvedProvider>) = match cluster {
        None => (providers, Vec::new()),
        Some(c) => providers
            .into_iter()
            .partition(|p| p.is_hosted && p.cluster_id.as_deref() == Some(c)),
    };
    let mut fallbacks: Vec<ResolvedProvider> = Vec::new();
    let mut queue: Vec<String> = visible.iter().flat_map(|p| p.fallback.clone()).collect();
    while let Some(name) = queue.pop() {
        if visible.iter().any(|p| p.name == name) || fallbacks.iter().any(|p| p.name == name) {
            continue;
        }
        let resolved = match hidden.iter().find(|p| p.name == name) {
            Some(p) => p.clone(),
            None => resolve_entry(
                &ConfigProviderSpec {
                    name: name.clone(),
                    ..Default::default()
                },
                registry,
                clusters,
            )?,
        };
        queue.extend(resolved.fallback.iter().cloned());
        fallbacks.push(resolved);
    }
    let mut hidden_models: Vec<String> = Vec::new();
    for m in hidden.iter().flat_map(|p| p.models.iter()) {
        if !visible.iter().any(|p| p.model(&m.name).is_some()) && !hidden_models.contains(&m.name) {
            hidden_models.push(m.name.clone());
        }
    }
    Ok((visible, fallbacks, hidden_models))
}

/// A validated provider registration.
struct Registered {
    spec: ProviderSpec,
    kind: ProviderKind,
    api_key: Option<String>,
    native: bool,
}

fn compile_providers(
    specs: &[ProviderSpec],
    clusters: &UpstreamClusters,
    secrets: &dyn SecretSource,
) -> Result<HashMap<String, Registered>, String> {
    let mut out = HashMap::new();
    for p in specs {
        if p.name.trim().is_empty() {
            return Err("a provider has an empty name".to_string());
        }
        let kind = ProviderKind::parse(&p.supported_provider).ok_or_else(|| {
            format!(
                "provider '{}': unknown supportedProvider '{}'",
                p.name, p.supported_provider
            )
        })?;
        if p.models.is_empty() {
            return Err(format!("provider '{}': models must not be empty", p.name));
        }
        let native = match (p.api.as_deref(), kind) {
            (None, k) => crate::providers::native_by_default(k),
            (Some("openai"), _) => false,
            (Some("native"), k) if crate::providers::has_native_api(k) => true,
            (Some(other), _) => {
                return Err(format!(
                    "provider '{}': api '{other}' is not available for {} (use native or openai)",
                    p.name,
                    kind.as_str()
                ))
            }
        };
        let mut seen = hashbrown::HashSet::new();
        for m in &p.models {
            if m.name().is_empty() || !seen.insert(m.name()) {
                return Err(format!(
                    "provider '{}': empty or duplicate model '{}'",
                    p.name,
                    m.name()
                ));
            }
        }
        let api_key = match (&p.api_key, &p.api_key_env) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "provider '{}': set apiKey or apiKeyEnv, not both",
                    p.name
                ))
            }
            (Some(k), None) => Some(k.clone()),
            (None, Some(var)) => Some(secrets.env(var).ok_or_else(|| {
                format!(
                    "provider '{}': environment variable {var} (apiKeyEnv) is not set",
                    p.name
                )
            })?),
            (None, None) => None,
        };
        for f in &p.fallback {
            if f == &p.name || !specs.iter().any(|s| &s.name == f) {
                return Err(format!(
                    "provider '{}': fallback '{f}' is not another provider",
                    p.name
                ));
            }
        }
        let reg = Registered {
            spec: p.clone(),
            kind,
            api_key,
            native,
        };
        // Validate the URL now so that requests never meet a bad one.
        base_url(&reg, None, clusters)?;
        if out.insert(p.name.clone(), reg).is_some() {
            return Err(format!("provider name '{}' is registered twice", p.name));
        }
    }
    Ok(out)
}

fn base_url(
    reg: &Registered,
    override_base: Option<&str>,
    clusters: &UpstreamClusters,
) -> Result<(BaseUrl, String), String> {
    let raw = override_base
        .map(str::to_string)
        .or_else(|| reg.spec.url.clone())
        .or_else(|| crate::providers::default_base(reg.kind, reg.native).map(str::to_string))
        .ok_or_else(|| {
            format!(
                "provider '{}': url is required for {}",
                reg.spec.name,
                reg.kind.as_str()
            )
        })?;
    let base = BaseUrl::parse(&raw).map_err(|e| format!("provider '{}': {e}", reg.spec.name))?;
    let cluster = match &reg.spec.cluster {
        Some(c) => c.clone(),
        None if base.tls => clusters.https.clone(),
        None => clusters.http.clone(),
    };
    Ok((base, cluster))
}

fn resolve_entry(
    entry: &ConfigProviderSpec,
    registry: &HashMap<String, Registered>,
    clusters: &UpstreamClusters,
) -> Result<ResolvedProvider, String> {
    let reg = registry
        .get(&entry.name)
        .ok_or_else(|| format!("config refers to unknown provider '{}'", entry.name))?;
    let (base, envoy_cluster) = base_url(reg, entry.api_base.as_deref(), clusters)?;
    let all: Vec<Model> = reg.spec.models.iter().map(ModelSpec::to_model).collect();
    let models = match &entry.models {
        None => all,
        Some(names) => {
            let mut v = Vec::with_capacity(names.len());
            for n in names {
                let m = all.iter().find(|m| &m.name == n).ok_or_else(|| {
                    format!(
                        "config allows model '{n}' which provider '{}' does not serve",
                        entry.name
                    )
                })?;
                v.push(m.clone());
            }
            v
        }
    };
    Ok(ResolvedProvider {
        name: reg.spec.name.clone(),
        kind: reg.kind,
        base,
        api_version: reg.spec.api_version.clone(),
        models,
        is_hosted: reg.spec.is_hosted,
        api_key: entry.api_key.clone().or_else(|| reg.api_key.clone()),
        envoy_cluster,
        cluster_id: reg.spec.cluster_id.clone(),
        fallback: reg.spec.fallback.clone(),
        native: reg.native,
        fallback_on429: reg.spec.fallback_on429,
        timeouts: reg.spec.timeouts,
    })
}

/// Flattens every config (and the implicit `default`) into its ordered provider entries,
/// applying inheritance. Refuses unknown parents, loops and chains deeper than
/// [`MAX_INHERITANCE_DEPTH`].
pub fn flatten_configs(
    providers: &[ProviderSpec],
    configs: &[ConfigSpec],
) -> Result<HashMap<String, Vec<ConfigProviderSpec>>, String> {
    let by_id: HashMap<&str, &ConfigSpec> = configs.iter().map(|c| (c.id.as_str(), c)).collect();
    if by_id.len() != configs.len() {
        return Err("two configs share one id".to_string());
    }
    let mut out = HashMap::new();
    if !by_id.contains_key(DEFAULT_CONFIG_ID) {
        let all = providers
            .iter()
            .map(|p| ConfigProviderSpec {
                name: p.name.clone(),
                ..Default::default()
            })
            .collect();
        out.insert(DEFAULT_CONFIG_ID.to_string(), all);
    }
    for c in configs {
        let chain = inheritance_chain(&c.id, &by_id)?;
        // Start from the root of the chain and apply each child's entries on top.
        let mut flat: Vec<ConfigProviderSpec> =
            match chain.last().and_then(|c| c.inherits.as_deref()) {
                Some(DEFAULT_CONFIG_ID) => out.get(DEFAULT_CONFIG_ID).cloned().unwrap_or_default(),
                _ => Vec::new(),
            };
        for link in chain.iter().rev() {
            flat = apply_layer(&flat, &link.providers, link.only.as_deref())
                .map_err(|e| format!("config '{}': {e}", link.id))?;
        }
        for e in &flat {
            if !providers.iter().any(|p| p.name == e.name) {
                return Err(format!(
                    "config '{}' refers to unknown provider '{}'",
                    c.id, e.name
                ));
            }
        }
        out.insert(c.id.clone(), flat);
    }
    Ok(out)
}

/// The chain `[config, parent, grandparent, ...]` up to (not including) the implicit default.
fn inheritance_chain<'a>(
    id: &str,
    by_id: &HashMap<&str, &'a ConfigSpec>,
) -> Result<Vec<&'a ConfigSpec>, String> {
    let mut chain: Vec<&'a ConfigSpec> = Vec::new();
    let mut cur = id;
    loop {
        let c = *by_id
            .get(cur)
            .ok_or_else(|| format!("unknown parent config '{cur}'"))?;
        if chain.iter().any(|x| x.id == c.id) {
            return Err(format!(
                "config '{id}' has an inheritance loop through '{}'",
                c.id
            ));
        }
        chain.push(c);
        if chain.len() > MAX_INHERITANCE_DEPTH {
            return Err(format!(
                "config '{id}' inherits more than {MAX_INHERITANCE_DEPTH} levels deep"
            ));
        }
        match c.inherits.as_deref() {
            None => return Ok(chain),
            Some(DEFAULT_CONFIG_ID) if !by_id.contains_key(DEFAULT_CONFIG_ID) => return Ok(chain),
            Some(p) => cur = p,
        }
    }
}

/// One inheritance layer: `providers` are additions and overrides merged by name into the parent's
/// list (an inherited provider keeps its place and the fields the child does not set; a new provider is
/// appended), then `only`, when set, narrows the result to the providers it names, in its order.
/// Every name in `only` must be in the merged list.
pub fn apply_layer(
    parent: &[ConfigProviderSpec],
    child: &[ConfigProviderSpec],
    only: Option<&[String]>,
) -> Result<Vec<ConfigProviderSpec>, String> {
    let mut merged: Vec<ConfigProviderSpec> = parent.to_vec();
    for c in child {
        match merged.iter_mut().find(|p| p.name == c.name) {
            Some(p) => {
                if c.models.is_some() {
                    p.models = c.models.clone();
                }
                if c.api_key.is_some() {
                    p.api_key = c.api_key.clone();
                }
                if c.api_base.is_some() {
                    p.api_base = c.api_base.clone();
                }
            }
            None => merged.push(c.clone()),
        }
    }
    let Some(only) = only else {
        return Ok(merged);
    };
    let mut out = Vec::with_capacity(only.len());
    for name in only {
        if out.iter().any(|p: &ConfigProviderSpec| &p.name == name) {
            continue;
        }
        let entry = merged.iter().find(|p| &p.name == name).ok_or_else(|| {
            format!("'only' names provider '{name}', which neither the parent nor 'providers' has")
        })?;
        out.push(entry.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEnv;
    impl SecretSource for NoEnv {
        fn env(&self, name: &str) -> Option<String> {
            (name == "OPENAI_KEY").then(|| "sk-from-env-1234".to_string())
        }
    }

    fn cfg(json: &str) -> Result<Plan, String> {
        let raw = parse(json.as_bytes())?;
        compile(&raw, &NoEnv)
    }

    const BASE: &str = r#"{
      "providers": [
        {"name":"oa","supportedProvider":"OPENAI","apiKeyEnv":"OPENAI_KEY","models":["gpt-4o","gpt-4o-mini"]},
        {"name":"local","supportedProvider":"OPENAI_COMPATIBLE","url":"http://127.0.0.1:9000/v1","isHosted":true,
         "models":[{"name":"gpt-4o","upstreamName":"llama3"}]}
      ],
      "configs": [
        {"id":"a","inherits":"default","providers":[{"name":"oa","models":["gpt-4o-mini"]}]},
        {"id":"b","inherits":"a","providers":[{"name":"oa","apiKey":"sk-override"}]}
      ],
      "keys": [
        {"id":"k1","sha256":"HASH1","config":"default"},
        {"id":"k2","sha256":"HASH2","config":"b","settings":{"provider":"oa"}}
      ]
    }"#;

    fn base() -> String {
        BASE.replace("HASH1", &hash_key("one"))
            .replace("HASH2", &hash_key("two"))
    }

    #[test]
    fn compiles_and_resolves_keys() {
        let plan = cfg(&base()).unwrap();
        let k1 = plan.identity_for_hash(&hash_key("one")).unwrap();
        assert_eq!(k1.providers.len(), 2);
        assert_eq!(k1.providers[0].api_key.as_deref(), Some("sk-from-env-1234"));
        assert_eq!(k1.providers[0].envoy_cluster, DEFAULT_HTTPS_CLUSTER);
        assert_eq!(k1.providers[1].envoy_cluster, DEFAULT_HTTP_CLUSTER);
        assert_eq!(k1.providers[1].models[0].upstream, "llama3");
        let k2 = plan.identity_for_hash(&hash_key("two")).unwrap();
        // `providers` merge: a and b keep the default's other provider.
        assert_eq!(k2.providers.len(), 2);
        assert_eq!(k2.providers[1].name, "local");
        // b inherits a's narrowed model list and overrides the key.
        assert_eq!(k2.providers[0].models.len(), 1);
        assert_eq!(k2.providers[0].models[0].name, "gpt-4o-mini");
        assert_eq!(k2.providers[0].api_key.as_deref(), Some("sk-override"));
        assert_eq!(k2.key_settings.provider.as_deref(), Some("oa"));
        assert!(plan.identity_for_hash(&hash_key("three")).is_none());
    }

    #[test]
    fn refuses_loops_depth_and_unknowns() {
        let looped = base().replace(
            r#""id":"a","inherits":"default""#,
            r#""id":"a","inherits":"b""#,
        );
        assert!(cfg(&looped).unwrap_err().contains("loop"));
        let deep = r#"{"providers":[{"name":"oa","supportedProvider":"OPENAI","models":["m"]}],
          "configs":[{"id":"c1","inherits":"default"},{"id":"c2","inherits":"c1"},
                     {"id":"c3","inherits":"c2"},{"id":"c4","inherits":"c3"}]}"#;
        assert!(cfg(deep).unwrap_err().contains("levels"));
        let three = deep.replace(r#",{"id":"c4","inherits":"c3"}"#, "");
        assert!(cfg(&three).is_ok());
        assert!(
            cfg(r#"{"providers":[{"name":"x","supportedProvider":"NOPE","models":["m"]}]}"#)
                .unwrap_err()
                .contains("unknown supportedProvider")
        );
        assert!(cfg(r#"{"providers":[],"bogus":1}"#)
            .unwrap_err()
            .contains("bogus"));
        let bad_key = base().replace(r#""config":"b""#, r#""config":"zzz""#);
        assert!(cfg(&bad_key).unwrap_err().contains("unknown config"));
        let no_url = r#"{"providers":[{"name":"v","supportedProvider":"AZURE","models":["m"]}]}"#;
        assert!(cfg(no_url).unwrap_err().contains("url is required"));
        let missing_env = base().replace("OPENAI_KEY", "NOT_SET");
        assert!(cfg(&missing_env).unwrap_err().contains("NOT_SET"));
    }

    #[test]
    fn fallback_key_must_exist() {
        let with = base().replacen('{', r#"{"fallbackKey":"one","#, 1);
        assert_eq!(cfg(&with).unwrap().fallback_key_hash, Some(hash_key("one")));
        let without = base().replacen('{', r#"{"fallbackKey":"nope","#, 1);
        assert!(cfg(&without).is_err());
        // With a sidecar, an unknown fallback key is resolved through it (a control-plane key).
        let sidecar = base().replacen(
            '{',
            r#"{"apiKeyFallback":"cp-key","sidecar":{"token":"t"},"#,
            1,
        );
        assert_eq!(
            cfg(&sidecar).unwrap().fallback_key_hash,
            Some(hash_key("cp-key"))
        );
        let unset = base().replacen('{', r#"{"fallbackKeyEnv":"NOT_SET","#, 1);
        assert_eq!(cfg(&unset).unwrap().fallback_key_hash, None);
        let env = base().replacen(
            '{',
            r#"{"fallbackKeyEnv":"OPENAI_KEY","sidecar":{"token":"t"},"#,
            1,
        );
        assert_eq!(
            cfg(&env).unwrap().fallback_key_hash,
            Some(hash_key("sk-from-env-1234"))
        );
    }

    fn entry(name: &str, models: Option<&[&str]>, key: Option<&str>) -> ConfigProviderSpec {
        ConfigProviderSpec {
            name: name.into(),
            models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
            api_key: key.map(String::from),
            api_base: None,
        }
    }

    #[test]
    fn layers_merge_by_name_and_only_narrows() {
        let parent = vec![
            entry("openai", None, None),
            entry("anthropic", Some(&["claude"]), None),
        ];
        // "this API key for OpenAI": the key is overridden, everything else is kept.
        let out = apply_layer(&parent, &[entry("openai", None, Some("sk-x"))], None).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].api_key.as_deref(), Some("sk-x"));
        assert_eq!(out[1], parent[1]);
        // A new provider is appended.
        let out = apply_layer(&parent, &[entry("gemini", None, None)], None).unwrap();
        let names: Vec<_> = out.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["openai", "anthropic", "gemini"]);
        // "only OpenAI and Gemini": narrowing after the merge, in the order of `only`.
        let only = vec!["gemini".to_string(), "openai".to_string()];
        let out = apply_layer(&parent, &[entry("gemini", None, None)], Some(&only)).unwrap();
        let names: Vec<_> = out.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gemini", "openai"]);
        let bad = vec!["mistral".to_string()];
        assert!(apply_layer(&parent, &[], Some(&bad))
            .unwrap_err()
            .contains("mistral"));
    }

    #[test]
    fn cluster_scope_keeps_only_hosted_of_cluster() {
        let json = r#"{"providers":[
            {"name":"saas","supportedProvider":"OPENAI","models":["m"]},
            {"name":"h1","supportedProvider":"OPENAI_COMPATIBLE","url":"http://a:1","isHosted":true,"clusterId":"c1","models":["m"],"fallback":["saas"]},
            {"name":"h2","supportedProvider":"OPENAI_COMPATIBLE","url":"http://b:1","isHosted":true,"clusterId":"c2","models":["m"]}],
          "keys":[{"id":"k","sha256":"H","config":"default","clusterId":"c1"}]}"#
            .replace("\"H\"", &format!("\"{}\"", hash_key("k")));
        let plan = cfg(&json).unwrap();
        let id = plan.identity_for_hash(&hash_key("k")).unwrap();
        let names: Vec<_> = id.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["h1"]);
        // The SaaS fallback of the hosted provider stays reachable, but only as a fallback.
        let fb: Vec<_> = id
            .fallback_providers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(fb, vec!["saas"]);
        assert!(id.out_of_scope_models.is_empty(), "m is served in scope");
        assert_eq!(id.usage_cluster("saas").as_deref(), Some("c1"));
        // An organization-scoped key served by a cluster's hosted provider: usage names that cluster.
        let org_key = json.replace(r#","clusterId":"c1"}]}"#, "}]}");
        let plan = cfg(&org_key).unwrap();
        let id = plan.identity_for_hash(&hash_key("k")).unwrap();
        assert_eq!(id.cluster_id, None);
        assert_eq!(id.usage_cluster("h2").as_deref(), Some("c2"));
        assert_eq!(id.usage_cluster("saas"), None);
    }

    #[test]
    fn debug_never_shows_provider_keys() {
        let plan = cfg(&base()).unwrap();
        let k2 = plan.identity_for_hash(&hash_key("two")).unwrap();
        let dbg = format!("{k2:?}");
        assert!(!dbg.contains("sk-override"), "{dbg}");
        assert!(dbg.contains("...ride"));
    }

    #[test]
    fn prices_and_cost() {
        let json = base().replacen(
            '{',
            r#"{"prices":{"gpt-4o-mini":{"input":0.15,"output":0.6,"cached":0.075}},"#,
            1,
        );
        let plan = cfg(&json).unwrap();
        let id = plan.identity_for_hash(&hash_key("two")).unwrap();
        let p = plan.price(&id, "oa", "gpt-4o-mini", "gpt-4o-mini").unwrap();
        // 1000 prompt (200 cached) + 500 completion: 800*0.15 + 200*0.075 + 500*0.6 = 435 USD/1M = 435,000 nano.
        assert_eq!(p.cost_nano_usd(1000, 500, 200), 435_000);
        assert!(plan.price(&id, "oa", "nope", "nope").is_none());
        assert!(cfg(r#"{"prices":{"m":{"input":1}}}"#).is_err());
    }

    /// Every field, under names and aliases, set: the readers and the derives agree.
    #[test]
    fn readers_agree_with_the_derives() {
        use crate::read::assert_agrees;
        use serde_json::json;
        let full = json!({
            "maxBodyBytes": 1000, "fallbackKey": "fk", "fallbackKeyEnv": "FK", "orgId": "o",
            "settings": {"provider": "p", "model": "m", "storePrompts": true},
            "upstreamClusters": {"http": "h", "https": "hs"},
            "providers": [
                {"name": "a", "supportedProvider": "OPENAI", "url": "https://x/v1", "apiVersion": "v",
                 "models": ["m", {"name": "n", "upstreamName": "u", "extra": 1}], "isHosted": true,
                 "apiKey": "k", "apiKeyEnv": "E", "cluster": "c", "clusterId": "ci",
                 "fallback": ["b"], "api": "native", "fallbackOn429": true,
                 "timeouts": {"totalMs": 5, "perTryMs": 6}},
                {"name": "b", "type": "GROQ", "api_base": "http://y", "models": [{"name": "n", "upstream_name": "u"}]},
                {"name": "c", "type": "GROQ", "apiBase": "http://y", "timeouts": null}
            ],
            "configs": [
                {"id": "x", "name": "X", "inherits": "default", "only": ["a"],
                 "providers": [{"name": "a", "models": ["m"], "apiKey": "k2", "apiBase": "http://z"}]},
                {"config_id": "y", "parent": "x", "restrictTo": ["a"],
                 "providers": [{"name": "a", "api_key": "k3", "api_base": "http://w"}]},
                {"configId": "z", "inherits_from": "y", "restrict_to": null}
            ],
            "keys": [
                {"id": "k", "sha256": "s", "config": "x", "settings": {"providerName": "a", "store_prompts": false}, "clusterId": "c"},
                {"id": "k2", "sha256": "s", "config_id": "y"},
                {"id": "k3", "sha256": "s", "configId": "z", "settings": {}}
            ],
            "sidecar": {"cluster": "c", "authority": "a", "token": "t", "tokenEnv": "T", "timeoutMs": 1,
                        "staleSeconds": 2, "negativeTtlSeconds": 3, "unknownKeyLookupsPerSecond": 4,
                        "unknownKeyLookupBurst": 5, "breakerFailures": 6, "breakerCooldownSeconds": 7,
                        "usageBufferBytes": 8, "allowedDestinations": "*", "limitsFailureMode": "closed"},
            "prices": {"m": {"input": 1, "output": 2.5, "cached": 0.5}, "n": {"input": 1, "output": 2}},
            "attemptSlot": 2, "openaiPassthrough": true
        });
        assert_agrees(&full, RawConfig::read);
        let ok_or_refused = [
            json!({}),
            json!({"apiKeyFallback": "a", "apiKeyFallbackEnv": "B", "sidecar": {}}),
            json!({"fallbackKey": "a", "apiKeyFallback": "b"}),
            json!({"fallbackKey": null, "orgId": null, "sidecar": null, "upstreamClusters": null}),
            json!({"settings": null}),
            json!({"providers": null}),
            json!({"openaiPassthrough": null}),
            json!({"maxBodyBytes": -1}),
            json!({"maxBodyBytes": 1.5}),
            json!({"maxBodyBytes": "1"}),
            json!({"attemptSlot": 4294967296u64}),
            json!({"sidecar": {"breakerFailures": 4294967296u64}}),
            json!({"sidecar": {"timeoutMs": null}}),
            json!({"sidecar": {"bogus": 1}}),
            json!({"bogus": 1}),
            json!({"settings": {"provider": 1}}),
            json!({"settings": {"bogus": 1}}),
            json!({"upstreamClusters": {"http": "h"}}),
            json!({"providers": [{"name": "a"}]}),
            json!({"providers": [{"supportedProvider": "X"}]}),
            json!({"providers": [{"name": "a", "type": "X", "models": [1]}]}),
            json!({"providers": [{"name": "a", "type": "X", "models": [{"name": "n"}]}]}),
            json!({"providers": [{"name": "a", "type": "X", "timeouts": {"total": 1}}]}),
            json!({"providers": [{"name": "a", "type": "X", "isHosted": "yes"}]}),
            json!({"configs": [{"name": "a"}]}),
            json!({"configs": [{"id": "a", "only": "b"}]}),
            json!({"keys": [{"id": "a", "sha256": "s"}]}),
            json!({"prices": {"m": {"input": 1}}}),
            json!({"prices": {"m": {"input": 1, "output": "2"}}}),
            json!({"prices": []}),
        ];
        for v in &ok_or_refused {
            assert_agrees(v, RawConfig::read);
        }
        // The one difference: serde also takes a struct as an array of its fields in order; the
        // readers take objects only.
        assert!(RawConfig::read(&json!({"settings": []}), "").is_err());
        let plan = cfg(&base()).unwrap();
        let id = plan.identity_for_hash(&hash_key("two")).unwrap();
        let mut id = (*id).clone();
        id.fallback_providers = id.providers.clone();
        id.out_of_scope_models = vec!["m".into()];
        id.store_prompts = true;
        id.cluster_id = Some("c".into());
        id.providers[0].timeouts = Some(crate::plan::Timeouts {
            total_ms: Some(1),
            per_try_ms: None,
        });
        id.prices.insert(
            "oa/m".into(),
            Price {
                input: 1.0,
                output: 2.0,
                cached: None,
            },
        );
        let v = serde_json::to_value(&id).unwrap();
        assert_eq!(Identity::read(&v, "").unwrap(), id);
        assert_agrees(&v, Identity::read);
        let mut bad = v.clone();
        bad["providers"][0]["kind"] = json!("openai");
        assert_agrees(&bad, Identity::read);
        bad["providers"][0]["kind"] = json!("OPENAI");
        bad["providers"][0]["base"]["tls"] = json!(null);
        assert_agrees(&bad, Identity::read);
    }

    #[test]
    fn configuration_errors_name_the_place() {
        let err = |json: &str| cfg(json).unwrap_err();
        assert_eq!(
            err(r#"{"providers":[{"name":"a","type":"OPENAI","models":["m"],"bogus":1}]}"#),
            "gateway configuration is not valid: providers[0]: unknown field `bogus`, expected one \
             of `name`, `supportedProvider`, `type`, `url`, `api_base`, `apiBase`, `apiVersion`, \
             `models`, `isHosted`, `apiKey`, `apiKeyEnv`, `cluster`, `clusterId`, `fallback`, \
             `api`, `fallbackOn429`, `timeouts`"
        );
        assert_eq!(
            err(r#"{"keys":[{"id":"k","sha256":"s","config":"default","settings":{"model":5}}]}"#),
            "gateway configuration is not valid: keys[0].settings.model: invalid type: number, \
             expected a string"
        );
        assert_eq!(
            err(r#"{"configs":[{"name":"x"}]}"#),
            "gateway configuration is not valid: configs[0]: missing field `id`"
        );
        assert!(err(r#"{"maxBodyBytes":-5}"#).contains("maxBodyBytes: invalid value: -5"));
        assert!(err("{").starts_with("gateway configuration is not valid: EOF"));
    }

    #[test]
    fn sha256_matches_the_sha2_crate() {
        use sha2::Digest;
        let mut seed = 1u64;
        for len in (0..300).chain([1000, 4096]) {
            let data = crate::test_bytes(&mut seed, len);
            assert_eq!(sha256(&data)[..], sha2::Sha256::digest(&data)[..], "{len}");
        }
    }

    #[test]
    fn hash_and_last4() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(last4("sk-12345678"), "5678");
        assert_eq!(last4("sk-123456789"), "6789");
        assert_eq!(last4("abcd"), "****");
        assert_eq!(last4("ab"), "****");
    }
}
