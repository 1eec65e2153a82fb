//! Metric names. proxy-wasm metrics are flat names; labels are encoded as `.<label>.<value>` segments
//! that the shipped Envoy config's `stats_tags` turn back into Prometheus labels. Names follow the
//! OpenTelemetry GenAI conventions where they fit (`gen_ai.client.token.usage`,
//! `gen_ai.client.operation.duration`, `gen_ai.server.time_to_first_token`).

pub const PREFIX: &str = "llmgw";

/// Label values: anything outside `[A-Za-z0-9_-]` becomes `_` so values never split a name.
pub fn label(v: &str) -> String {
    let s: String = v
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
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

pub fn status_class(status: u32) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

fn pm(provider: &str, model: &str) -> String {
    format!("provider.{}.model.{}", label(provider), label(model))
}

pub fn requests(provider: &str, model: &str, status: u32) -> String {
    format!(
        "{PREFIX}.requests.{}.status.{}",
        pm(provider, model),
        status_class(status)
    )
}

/// `kind` is `input` or `output` (OTel `gen_ai.token.type`).
pub fn tokens(provider: &str, model: &str, kind: &str) -> String {
    format!(
        "{PREFIX}.gen_ai.client.token.usage.{}.token_type.{kind}",
        pm(provider, model)
    )
}

/// Cost in nano-USD (integers keep the counter exact), from the price of the model that served.
pub fn cost(provider: &str, model: &str) -> String {
    format!(
        "{PREFIX}.gen_ai.client.cost_nano_usd.{}",
        pm(provider, model)
    )
}

pub fn duration(provider: &str, model: &str) -> String {
    format!(
        "{PREFIX}.gen_ai.client.operation.duration_ms.{}",
        pm(provider, model)
    )
}

pub fn ttft(provider: &str, model: &str) -> String {
    format!(
        "{PREFIX}.gen_ai.server.time_to_first_token_ms.{}",
        pm(provider, model)
    )
}

pub fn fallbacks(provider: &str) -> String {
    format!("{PREFIX}.fallbacks.provider.{}", label(provider))
}

pub const USAGE_DROPPED: &str = "llmgw.usage.records_dropped";
pub const USAGE_SENT: &str = "llmgw.usage.records_sent";
/// Gauge: usage records waiting in the VMs for the sidecar (the preStop hook waits for zero).
pub const USAGE_BUFFERED: &str = "llmgw.usage.records_buffered";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            requests("openai-main", "gpt-3.5-turbo", 201),
            "llmgw.requests.provider.openai-main.model.gpt-3_5-turbo.status.2xx"
        );
        assert_eq!(
            tokens("p", "llama3.1:8b", "input"),
            "llmgw.gen_ai.client.token.usage.provider.p.model.llama3_1_8b.token_type.input"
        );
        assert_eq!(label(""), "unknown");
        assert_eq!(status_class(503), "5xx");
    }
}
