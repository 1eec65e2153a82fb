//! The price catalog (`config/model-prices.json`) and the cost of a usage record.
//!
//! Costs are integers in nano-USD (1e-9 USD): sums over millions of records stay exact on both
//! databases. A record's cost comes, in order, from the provider registration's `prices` override, the
//! hosted model catalog (hourly price / token throughput) for hosted providers, the list-price catalog,
//! else it is zero and flagged `unpriced`.

use crate::db::{PriceOverride, StoredProvider};
use crate::specs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const EMBEDDED: &str = include_str!("../../config/model-prices.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: String,
    pub date: String,
    pub currency: String,
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub models: BTreeMap<String, CatalogEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub input: f64,
    pub output: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<f64>,
}

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cached: f64,
}

impl From<&PriceOverride> for Price {
    fn from(p: &PriceOverride) -> Self {
        Price {
            input: p.input,
            output: p.output,
            cached: p.cached.unwrap_or(p.input),
        }
    }
}

fn valid_price(v: f64) -> bool {
    v.is_finite() && (0.0..=1_000_000.0).contains(&v)
}

pub fn valid_override(p: &PriceOverride) -> bool {
    valid_price(p.input) && valid_price(p.output) && p.cached.is_none_or(valid_price)
}

pub fn parse(text: &str) -> Result<Catalog, String> {
    let c: Catalog = serde_json::from_str(text).map_err(|e| format!("model prices: {e}"))?;
    if c.version.trim().is_empty() {
        return Err("model prices: version is empty".to_string());
    }
    for (name, e) in &c.models {
        if !(valid_price(e.input) && valid_price(e.output) && e.cached.is_none_or(valid_price)) {
            return Err(format!("model prices: '{name}' has an invalid price"));
        }
    }
    Ok(c)
}

/// `LLM_GATEWAY_MODEL_PRICES`, else `config/model-prices.json` under the working directory, else the
/// copy built into the binary.
pub fn load() -> Result<Catalog, String> {
    if let Some(p) = std::env::var("LLM_GATEWAY_MODEL_PRICES")
        .ok()
        .filter(|p| !p.is_empty())
    {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {p}: {e}"))?;
        return parse(&text);
    }
    if let Ok(text) = std::fs::read_to_string(Path::new("config/model-prices.json")) {
        return parse(&text);
    }
    parse(EMBEDDED)
}

/// Where a record's price came from (stored with the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Override,
    Hosted,
    Catalog,
    Unpriced,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Override => "override",
            Source::Hosted => "hosted",
            Source::Catalog => "catalog",
            Source::Unpriced => "unpriced",
        }
    }
}

pub struct Pricing {
    pub catalog: Catalog,
    /// Hosted models: USD per 1M tokens at the cheapest region's hourly price and the model's throughput.
    hosted: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costed {
    pub cost_nusd: i64,
    pub list_cost_nusd: i64,
    pub source: Source,
}

/// Finds `model` in a name-keyed table: exact (case-insensitive, a leading `models/` ignored), else the
/// longest name that `model` extends with `-`, `:` or `@` (dated snapshots such as `gpt-4o-2024-08-06`).
fn lookup<'a, T>(table: &'a BTreeMap<String, T>, model: &str) -> Option<&'a T> {
    let m = model.trim().to_ascii_lowercase();
    let m = m.strip_prefix("models/").unwrap_or(&m);
    if let Some(v) = table.get(m) {
        return Some(v);
    }
    let mut best: Option<(&str, &T)> = None;
    for (k, v) in table {
        let k_low = k.to_ascii_lowercase();
        if k_low == m {
            return Some(v);
        }
        if m.len() > k_low.len()
            && m.starts_with(&k_low)
            && matches!(m.as_bytes().get(k_low.len()), Some(b'-' | b':' | b'@'))
            && best.is_none_or(|(b, _)| k.len() > b.len())
        {
            best = Some((k.as_str(), v));
        }
    }
    best.map(|(_, v)| v)
}

/// Nano-USD for `tokens` at `price`. Cached tokens are part of the prompt tokens (OpenAI semantics).
pub fn cost_nusd(price: Price, t: Tokens) -> i64 {
    let cached = t.cached.min(t.prompt);
    let uncached = t.prompt - cached;
    // USD per 1M tokens = 1000 nano-USD per token.
    let n = (uncached as f64 * price.input
        + cached as f64 * price.cached
        + t.completion as f64 * price.output)
        * 1000.0;
    if n.is_finite() && n >= 0.0 {
        n.round().min(i64::MAX as f64) as i64
    } else {
        0
    }
}

fn is_self_hosted_type(provider_type: Option<&str>) -> bool {
    provider_type.is_some_and(|t| {
        matches!(
            t.to_ascii_uppercase().as_str(),
            "OPENAI_COMPATIBLE" | "VLLM" | "OLLAMA" | "HOSTED"
        )
    })
}

impl Pricing {
    pub fn new(catalog: Catalog, hosted_specs: &specs::Catalog) -> Pricing {
        let mut hosted = BTreeMap::new();
        for m in &hosted_specs.items {
            let cheapest = m
                .regions
                .iter()
                .filter_map(|r| r.price_per_hour.parse::<f64>().ok())
                .filter(|p| p.is_finite() && *p >= 0.0)
                .fold(None, |acc: Option<f64>, p| {
                    Some(acc.map_or(p, |a| a.min(p)))
                });
            if let Some(per_hour) = cheapest {
                if m.tokens_per_second > 0 {
                    let per_million = per_hour / (f64::from(m.tokens_per_second) * 3600.0) * 1e6;
                    hosted.insert(m.model.to_ascii_lowercase(), per_million);
                }
            }
        }
        Pricing { catalog, hosted }
    }

    pub fn list_price(&self, model: &str) -> Option<Price> {
        lookup(&self.catalog.models, model).map(|e| Price {
            input: e.input,
            output: e.output,
            cached: e.cached.unwrap_or(e.input),
        })
    }

    pub fn hosted_price(&self, model: &str) -> Option<Price> {
        lookup(&self.hosted, model).map(|&p| Price {
            input: p,
            output: p,
            cached: p,
        })
    }

    /// The price of one record: see the module documentation for the order.
    pub fn price(
        &self,
        provider: Option<&StoredProvider>,
        provider_type: Option<&str>,
        model_used: &str,
    ) -> (Option<Price>, Source) {
        if let Some(p) = provider {
            // An override may name the upstream model or the public name that maps to it.
            let public = p
                .spec
                .models
                .iter()
                .filter(|m| match m {
                    llm_gateway::config::ModelSpec::Name(n) => n == model_used,
                    llm_gateway::config::ModelSpec::Mapped { upstream_name, .. } => {
                        upstream_name == model_used
                    }
                })
                .map(|m| m.name().to_string());
            let o = p.prices.get(model_used).or_else(|| {
                public
                    .clone()
                    .find_map(|n| p.prices.get(&n))
                    .or_else(|| lookup(&p.prices, model_used))
            });
            if let Some(o) = o {
                return (Some(o.into()), Source::Override);
            }
        }
        let hosted = provider.map_or(is_self_hosted_type(provider_type), |p| {
            p.spec.is_hosted || is_self_hosted_type(Some(&p.spec.supported_provider))
        });
        if hosted {
            if let Some(pr) = self.hosted_price(model_used) {
                return (Some(pr), Source::Hosted);
            }
        }
        if let Some(pr) = self.list_price(model_used) {
            return (Some(pr), Source::Catalog);
        }
        (None, Source::Unpriced)
    }

    /// Cost as routed and at the list price of the model the client asked for (unknown requested model:
    /// the actual cost; unpriced records: zero for both, so they never show savings).
    pub fn cost(
        &self,
        provider: Option<&StoredProvider>,
        provider_type: Option<&str>,
        model_used: &str,
        model_requested: &str,
        tokens: Tokens,
    ) -> Costed {
        let (price, source) = self.price(provider, provider_type, model_used);
        let Some(price) = price else {
            return Costed {
                cost_nusd: 0,
                list_cost_nusd: 0,
                source,
            };
        };
        let cost = cost_nusd(price, tokens);
        let list = self
            .list_price(model_requested)
            .map_or(cost, |p| cost_nusd(p, tokens));
        Costed {
            cost_nusd: cost,
            list_cost_nusd: list,
            source,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_is_valid_and_lookup_handles_snapshots() {
        let c = parse(EMBEDDED).unwrap();
        let specs = specs::parse(include_str!("../../config/hosted-model-specs.json")).unwrap();
        let p = Pricing::new(c, &specs);
        assert_eq!(p.list_price("gpt-4o").unwrap().input, 2.5);
        assert_eq!(p.list_price("gpt-4o-2024-08-06").unwrap().input, 2.5);
        assert_eq!(p.list_price("gpt-4o-2024-05-13").unwrap().input, 5.0);
        assert_eq!(p.list_price("gpt-4o-mini-2024-07-18").unwrap().input, 0.15);
        assert_eq!(p.list_price("models/gemini-1.5-flash").unwrap().output, 0.3);
        assert_eq!(
            p.list_price("claude-3-5-sonnet-20241022").unwrap().output,
            15.0
        );
        assert!(p.list_price("gpt-4oz").is_none());
        assert!(p.list_price("nope").is_none());
        // llama3.1:8b: 0.24082 USD/h at 50 tokens/s.
        let h = p.hosted_price("llama3.1:8b").unwrap();
        assert!((h.input - 0.24082 / (50.0 * 3600.0) * 1e6).abs() < 1e-9);
    }

    #[test]
    fn cost_math() {
        let price = Price {
            input: 2.5,
            output: 10.0,
            cached: 1.25,
        };
        let t = Tokens {
            prompt: 1000,
            completion: 500,
            cached: 200,
        };
        // 800*2.5 + 200*1.25 + 500*10 = 2000 + 250 + 5000 = 7250 USD per 1M -> 7_250_000 nano-USD / 1000.
        assert_eq!(cost_nusd(price, t), 7_250_000);
        assert_eq!(cost_nusd(price, Tokens::default()), 0);
    }
}
