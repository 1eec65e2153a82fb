//! What a request reads about providers: their kinds, models and the provider a key's configuration
//! resolves to. Plain types with accessors, imported by both `config` (which compiles them) and
//! `providers` (which shapes requests with them), so neither imports the other.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::read::{list, Obj, Res};
use crate::url::BaseUrl;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Provider API flavours the gateway can shape requests for.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderKind {
    #[serde(rename = "OPENAI")]
    OpenAi,
    #[serde(rename = "AZURE")]
    Azure,
    #[serde(rename = "GEMINI")]
    Gemini,
    #[serde(rename = "VERTEXAIGEMINI")]
    VertexAiGemini,
    #[serde(rename = "MISTRAL")]
    Mistral,
    #[serde(rename = "GROQ")]
    Groq,
    #[serde(rename = "ANTHROPIC")]
    Anthropic,
    /// Any OpenAI-compatible server (vLLM, Ollama, llama.cpp, ...) at a user-given URL.
    #[serde(rename = "OPENAI_COMPATIBLE")]
    OpenAiCompatible,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Option<ProviderKind> {
        let up = s.trim().to_ascii_uppercase().replace(['-', ' '], "_");
        Some(match up.as_str() {
            "OPENAI" => ProviderKind::OpenAi,
            "AZURE" | "AZURE_OPENAI" | "AZUREOPENAI" => ProviderKind::Azure,
            "GEMINI" | "GOOGLE" => ProviderKind::Gemini,
            "VERTEXAIGEMINI" | "VERTEX_AI_GEMINI" | "VERTEXAI" | "VERTEX" => {
                ProviderKind::VertexAiGemini
            }
            "MISTRAL" => ProviderKind::Mistral,
            "GROQ" => ProviderKind::Groq,
            "ANTHROPIC" => ProviderKind::Anthropic,
            "OPENAI_COMPATIBLE" | "CUSTOM" | "VLLM" | "OLLAMA" | "LLAMACPP" | "LLAMA_CPP"
            | "HOSTED" => ProviderKind::OpenAiCompatible,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "OPENAI",
            ProviderKind::Azure => "AZURE",
            ProviderKind::Gemini => "GEMINI",
            ProviderKind::VertexAiGemini => "VERTEXAIGEMINI",
            ProviderKind::Mistral => "MISTRAL",
            ProviderKind::Groq => "GROQ",
            ProviderKind::Anthropic => "ANTHROPIC",
            ProviderKind::OpenAiCompatible => "OPENAI_COMPATIBLE",
        }
    }
}

/// A model as the client names it, and as the provider expects it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub upstream: String,
}

/// A provider as one key's configuration sees it: overrides applied, models narrowed.
/// `Debug` is written by hand so that the key can never reach a log line.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedProvider {
    pub name: String,
    pub kind: ProviderKind,
    pub base: BaseUrl,
    #[serde(default)]
    pub api_version: Option<String>,
    pub models: Vec<Model>,
    #[serde(default)]
    pub is_hosted: bool,
    /// The provider key. Serialized only on the sidecar→filter internal channel; never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Envoy cluster the request goes to.
    pub envoy_cluster: String,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Speaks the provider's native API (requests and responses translated by the gateway).
    #[serde(default)]
    pub native: bool,
    #[serde(default)]
    pub fallback_on429: bool,
    /// Per-provider timeouts, sent to Envoy as per-request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

/// Upstream timeouts of one provider, in milliseconds (each optional; unset keeps the route's value
/// from the Envoy configuration). Envoy enforces them: the filter only sets
/// `x-envoy-upstream-rq-timeout-ms` (`totalMs`) and `x-envoy-upstream-rq-per-try-timeout-ms`
/// (`perTryMs`) on the request it routes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole exchange, from the end of the request to the end of the response (streams
    /// included: a stream longer than this is cut). `0` disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Each attempt (the first and every retry), bounded by `totalMs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_ms: Option<u64>,
}

/// Envoy's per-request timeout headers (the router reads them when it routes the request).
pub const TOTAL_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";

impl Timeouts {
    /// The headers that carry these timeouts.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(t) = self.total_ms {
            v.push((TOTAL_TIMEOUT_HEADER, t.to_string()));
        }
        if let Some(t) = self.per_try_ms {
            v.push((PER_TRY_TIMEOUT_HEADER, t.to_string()));
        }
        v
    }
}

// Readers for the filter (see `crate::read`); unknown fields are ignored except in `Timeouts`, as
// in the derives.

impl ProviderKind {
    const ALL: [ProviderKind; 8] = [
        ProviderKind::OpenAi,
        ProviderKind::Azure,
        ProviderKind::Gemini,
        ProviderKind::VertexAiGemini,
        ProviderKind::Mistral,
        ProviderKind::Groq,
        ProviderKind::Anthropic,
        ProviderKind::OpenAiCompatible,
    ];

    /// Exactly the serialized name ([`ProviderKind::as_str`]).
    pub fn read(v: &Value, at: &str) -> Res<ProviderKind> {
        let name = crate::read::string(v, at)?;
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| format!("{at}: unknown provider kind `{name}`"))
    }
}

impl Model {
    pub fn read(v: &Value, at: &str) -> Res<Model> {
        let o = Obj::new(v, at, None)?;
        o.finish(Model {
            name: o.string(&["name"]),
            upstream: o.string(&["upstream"]),
        })
    }
}

impl ResolvedProvider {
    pub fn read(v: &Value, at: &str) -> Res<ResolvedProvider> {
        let o = Obj::new(v, at, None)?;
        o.finish(ResolvedProvider {
            name: o.string(&["name"]),
            kind: o.with(&["kind"], ProviderKind::read, ProviderKind::OpenAi),
            base: o.with(&["base"], BaseUrl::read, BaseUrl::default()),
            api_version: o.opt_string(&["apiVersion"]),
            models: o.with(&["models"], |v, at| list(v, at, Model::read), Vec::new()),
            is_hosted: o.bool_or(&["isHosted"], false),
            api_key: o.opt_string(&["apiKey"]),
            envoy_cluster: o.string(&["envoyCluster"]),
            cluster_id: o.opt_string(&["clusterId"]),
            fallback: o.strings(&["fallback"]),
            native: o.bool_or(&["native"], false),
            fallback_on429: o.bool_or(&["fallbackOn429"], false),
            timeouts: o.opt_with(&["timeouts"], Timeouts::read),
        })
    }
}

impl Timeouts {
    pub fn read(v: &Value, at: &str) -> Res<Timeouts> {
        let o = Obj::new(v, at, Some(&["totalMs", "perTryMs"]))?;
        o.finish(Timeouts {
            total_ms: o.opt_uint(&["totalMs"], u64::MAX),
            per_try_ms: o.opt_uint(&["perTryMs"], u64::MAX),
        })
    }
}

impl core::fmt::Debug for ResolvedProvider {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ResolvedProvider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base", &self.base)
            .field("models", &self.models)
            .field("is_hosted", &self.is_hosted)
            .field("api_key", &self.key_last4().map(|l| format!("...{l}")))
            .field("envoy_cluster", &self.envoy_cluster)
            .finish()
    }
}

impl ResolvedProvider {
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Last four characters of the provider key, for reports.
    pub fn key_last4(&self) -> Option<String> {
        self.api_key.as_deref().map(last4)
    }
}

/// Last four characters of a secret (or fewer if it is that short).
pub fn last4(secret: &str) -> String {
    let n = secret.chars().count();
    // A secret of 8 characters or fewer would give away half of itself or more: fully masked.
    if n <= 8 {
        return "****".to_string();
    }
    secret.chars().skip(n - 4).collect()
}
