//! Metric names: one naming scheme that keeps its labels under our bootstrap, under Istio's and (with
//! the shipped Prometheus relabelling) under Envoy's default bootstrap. See docs/operations.md,
//! "Metrics".
//!
//! proxy-wasm metrics are flat names (Envoy puts them under the `wasmcustom.` namespace, which its
//! Prometheus output strips). Labels are encoded in the name with Istio's tag encoding,
//! `<label>=.=<value>;.;` before the base name:
//!
//! ```text
//! gen_ai_provider_name=.=openai;.;gen_ai_request_model=.=gpt-4o;.;response_code=.=200;.;llmgw_requests_total
//! ```
//!
//! A stats tag rule `(<label>=\.=(.*?);\.;)` per label — exactly what Istio generates for each
//! `extraStatTags` entry and what our bootstraps list — moves each pair into a Prometheus label and
//! leaves the base name. `response_code` is one of Istio's built-in tags, so the status label needs
//! no Istio configuration at all. Label names are the OpenTelemetry GenAI attributes
//! (`gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.token.type`) in Prometheus form.
//! Token counts are in tokens; durations are in milliseconds because Envoy histograms hold integers
//! (seconds would lose all resolution); the names say so.

#[allow(unused_imports)]
use crate::prelude::*;

/// Prefix of every base name.
pub const PREFIX: &str = "llmgw";

/// Label names (Prometheus form of the OTel GenAI attributes; `response_code` as Istio names it).
pub const LABEL_PROVIDER: &str = "gen_ai_provider_name";
pub const LABEL_MODEL: &str = "gen_ai_request_model";
pub const LABEL_TOKEN_TYPE: &str = "gen_ai_token_type";
pub const LABEL_STATUS: &str = "response_code";
/// Every label the filter encodes, for bootstraps (`stats_tags`) and Istio (`extraStatTags`).
pub const LABELS: [&str; 4] = [LABEL_PROVIDER, LABEL_MODEL, LABEL_TOKEN_TYPE, LABEL_STATUS];

/// Base names (what Prometheus shows once the labels are extracted).
pub const REQUESTS: &str = "llmgw_requests_total";
pub const TOKENS: &str = "llmgw_gen_ai_client_token_usage_tokens_total";
pub const COST: &str = "llmgw_gen_ai_client_cost_nano_usd_total";
pub const DURATION: &str = "llmgw_gen_ai_client_operation_duration_milliseconds";
pub const TTFT: &str = "llmgw_gen_ai_server_time_to_first_token_milliseconds";
pub const FALLBACKS: &str = "llmgw_fallbacks_total";

/// A label value: at most 64 characters of `[A-Za-z0-9._:/@-]`, anything else becomes `_`, so a
/// value can never contain the encoding's separators (`=.=`, `;.;`).
pub fn label(v: &str) -> String {
    let s: String = v
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "unknown".to_string()
    } else {
        s
    }
}

/// The stat name of `base` with `labels` encoded (in the order given).
pub fn encode(base: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(base.len() + labels.len() * 40);
    for (name, value) in labels {
        out.push_str(name);
        out.push_str("=.=");
        out.push_str(&label(value));
        out.push_str(";.;");
    }
    out.push_str(base);
    out
}

/// The Envoy `stats_tags` regex that extracts `label` (same as Istio's `extraStatTags` rule).
pub fn tag_regex(label: &str) -> String {
    format!("({label}=\\.=(.*?);\\.;)")
}

pub fn status_class(status: u32) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

pub fn requests(provider: &str, model: &str, status: u32) -> String {
    let code = status.to_string();
    encode(
        REQUESTS,
        &[
            (LABEL_PROVIDER, provider),
            (LABEL_MODEL, model),
            (LABEL_STATUS, &code),
        ],
    )
}

/// `kind` is `input` or `output` (OTel `gen_ai.token.type`).
pub fn tokens(provider: &str, model: &str, kind: &str) -> String {
    encode(
        TOKENS,
        &[
            (LABEL_PROVIDER, provider),
            (LABEL_MODEL, model),
            (LABEL_TOKEN_TYPE, kind),
        ],
    )
}

/// Cost in nano-USD (integers keep the counter exact), from the price of the model that served.
pub fn cost(provider: &str, model: &str) -> String {
    encode(COST, &[(LABEL_PROVIDER, provider), (LABEL_MODEL, model)])
}

pub fn duration(provider: &str, model: &str) -> String {
    encode(
        DURATION,
        &[(LABEL_PROVIDER, provider), (LABEL_MODEL, model)],
    )
}

pub fn ttft(provider: &str, model: &str) -> String {
    encode(TTFT, &[(LABEL_PROVIDER, provider), (LABEL_MODEL, model)])
}

pub fn fallbacks(provider: &str) -> String {
    encode(FALLBACKS, &[(LABEL_PROVIDER, provider)])
}

pub const USAGE_DROPPED: &str = "llmgw.usage.records_dropped";
pub const USAGE_SENT: &str = "llmgw.usage.records_sent";
/// Gauge: usage records waiting in the VMs for the sidecar (the preStop hook waits for zero).
pub const USAGE_BUFFERED: &str = "llmgw.usage.records_buffered";
/// Requests refused because a budget (or this instance's allowance of it) is used up.
pub const BUDGET_REFUSED: &str = "llmgw.budget.refused";
/// Requests admitted while a soft budget is past its cap (the alert).
pub const BUDGET_SOFT_EXCEEDED: &str = "llmgw.budget.soft_exceeded";
/// Requests refused by a per-minute rate limit (or for lack of a renewed allowance, policy closed).
pub const RATE_LIMITED: &str = "llmgw.ratelimit.refused";

#[cfg(test)]
mod tests {
    use super::*;

    /// What Envoy's tag extraction does with one rule: remove the first group, keep the second.
    fn extract(name: &str, label: &str) -> (String, Option<String>) {
        let start = format!("{label}=.=");
        let Some(i) = name.find(&start) else {
            return (name.to_string(), None);
        };
        let rest = &name[i + start.len()..];
        let j = rest.find(";.;").unwrap();
        let value = rest[..j].to_string();
        let removed = format!("{}{}", &name[..i], &rest[j + 3..]);
        (removed, Some(value))
    }

    #[test]
    fn names_extract_to_base_and_labels() {
        let n = requests("openai-main", "gpt-3.5-turbo", 201);
        assert_eq!(
            n,
            "gen_ai_provider_name=.=openai-main;.;gen_ai_request_model=.=gpt-3.5-turbo;.;\
             response_code=.=201;.;llmgw_requests_total"
        );
        let mut name = format!("wasmcustom.{n}");
        let mut labels = Vec::new();
        for l in LABELS {
            let (rest, v) = extract(&name, l);
            name = rest;
            if let Some(v) = v {
                labels.push((l, v));
            }
        }
        assert_eq!(name, "wasmcustom.llmgw_requests_total");
        assert_eq!(
            labels,
            vec![
                (LABEL_PROVIDER, "openai-main".to_string()),
                (LABEL_MODEL, "gpt-3.5-turbo".to_string()),
                (LABEL_STATUS, "201".to_string()),
            ]
        );
        assert_eq!(
            tokens("p", "llama3.1:8b", "input"),
            "gen_ai_provider_name=.=p;.;gen_ai_request_model=.=llama3.1:8b;.;\
             gen_ai_token_type=.=input;.;llmgw_gen_ai_client_token_usage_tokens_total"
        );
        assert_eq!(tag_regex("x"), r"(x=\.=(.*?);\.;)");
    }

    #[test]
    fn values_cannot_break_the_encoding() {
        assert_eq!(label(""), "unknown");
        assert_eq!(label("a;.;b=.=c"), "a_._b_._c");
        assert_eq!(label(&"x".repeat(100)).len(), 64);
        assert_eq!(label("modèle"), "mod_le");
        assert_eq!(status_class(503), "5xx");
        let n = fallbacks("p;.;response_code=.=500");
        assert_eq!(n.matches(";.;").count(), 1);
    }
}
