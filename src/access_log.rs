//! What the filter tells Envoy's access log about a request: filter-state entries set with
//! `set_property` once the response has ended (tokens known). Envoy stores a wasm property `k` as
//! filter state `wasm.k`, so a log format reads `%FILTER_STATE(wasm.llm_gateway.provider:PLAIN)%`
//! (see docs/operations.md, "Access log"). Never keys, prompts or completions.

#[allow(unused_imports)]
use crate::prelude::*;

/// Filter-state keys (without Envoy's `wasm.` prefix).
pub const PROVIDER: &str = "llm_gateway.provider";
pub const MODEL: &str = "llm_gateway.model";
pub const MODEL_REQUESTED: &str = "llm_gateway.model_requested";
pub const PROMPT_TOKENS: &str = "llm_gateway.prompt_tokens";
pub const COMPLETION_TOKENS: &str = "llm_gateway.completion_tokens";
pub const TOTAL_TOKENS: &str = "llm_gateway.total_tokens";
pub const COST_USD: &str = "llm_gateway.cost_usd";
pub const FALLBACK: &str = "llm_gateway.fallback";
pub const KEY_ID: &str = "llm_gateway.key_id";
pub const CONFIG_ID: &str = "llm_gateway.config_id";

/// The facts of one served request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary<'a> {
    pub provider: &'a str,
    /// The model that served (as the provider reported it, else the upstream model name).
    pub model: &'a str,
    pub model_requested: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `None` when no price is known for the model.
    pub cost_nano_usd: Option<u64>,
    pub fallback: bool,
    pub key_id: &'a str,
    pub config_id: &'a str,
}

/// The filter-state entries for a summary, in a fixed order. Values are clipped to 128 bytes.
pub fn filter_state(s: &Summary) -> Vec<(&'static str, String)> {
    let mut v = vec![
        (PROVIDER, clip(s.provider)),
        (MODEL, clip(s.model)),
        (MODEL_REQUESTED, clip(s.model_requested)),
        (PROMPT_TOKENS, s.prompt_tokens.to_string()),
        (COMPLETION_TOKENS, s.completion_tokens.to_string()),
        (
            TOTAL_TOKENS,
            s.prompt_tokens
                .saturating_add(s.completion_tokens)
                .to_string(),
        ),
        (FALLBACK, s.fallback.to_string()),
        (KEY_ID, clip(s.key_id)),
        (CONFIG_ID, clip(s.config_id)),
    ];
    if let Some(nano) = s.cost_nano_usd {
        v.push((COST_USD, usd(nano)));
    }
    v
}

/// Nano-USD as a decimal USD string: `11000` → `0.000011`.
pub fn usd(nano: u64) -> String {
    let whole = nano / 1_000_000_000;
    let frac = nano % 1_000_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let f = format!("{frac:09}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

fn clip(v: &str) -> String {
    if v.len() <= 128 {
        return v.to_string();
    }
    let mut end = 128;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v.get(..end).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        let s = Summary {
            provider: "openai",
            model: "gpt-4o-2024",
            model_requested: "gpt-4o",
            prompt_tokens: 5,
            completion_tokens: 3,
            cost_nano_usd: Some(11_000),
            fallback: true,
            key_id: "key_1",
            config_id: "cfg_1",
        };
        let e = filter_state(&s);
        let get = |k: &str| e.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get(PROVIDER), Some("openai"));
        assert_eq!(get(TOTAL_TOKENS), Some("8"));
        assert_eq!(get(COST_USD), Some("0.000011"));
        assert_eq!(get(FALLBACK), Some("true"));
        assert_eq!(e.len(), 10);
        let none = filter_state(&Summary::default());
        assert!(none.iter().all(|(k, _)| *k != COST_USD));
        assert_eq!(usd(0), "0");
        assert_eq!(usd(2_500_000_000), "2.5");
        assert_eq!(clip(&"é".repeat(100)).len(), 128);
    }
}
