//! The hosted model catalog served at `/ai-optimizer/v1beta/hosted-model-specs`.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// GGUF quantization types the catalog may name.
const GGUF: &[&str] = &[
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS",
    "IQ2_XS",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalog {
    pub items: Vec<HostedModelSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostedModelSpec {
    pub model: String,
    pub description: String,
    pub cpu: u32,
    pub memory_mib: u64,
    pub provider: String,
    pub tokens_per_second: u32,
    pub create_time: String,
    pub quantization: String,
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Region {
    pub name: String,
    pub price_per_hour: String,
    pub cloud: String,
    pub instance_type: String,
    pub gpu_count: u32,
    pub gpu_name: String,
}

const EMBEDDED: &str = include_str!("../../config/hosted-model-specs.json");

pub fn parse(text: &str) -> Result<Catalog, String> {
    let c: Catalog = serde_json::from_str(text).map_err(|e| format!("hosted model specs: {e}"))?;
    for m in &c.items {
        if !GGUF.contains(&m.quantization.as_str()) {
            return Err(format!(
                "hosted model specs: '{}' has a non-GGUF quantization '{}'",
                m.model, m.quantization
            ));
        }
        for r in &m.regions {
            if r.price_per_hour.parse::<f64>().is_err() {
                return Err(format!(
                    "hosted model specs: '{}' region '{}' has a bad pricePerHour",
                    m.model, r.name
                ));
            }
        }
    }
    Ok(c)
}

/// `LLM_GATEWAY_MODEL_SPECS`, else `config/hosted-model-specs.json` under the working directory, else the
/// copy built into the binary.
pub fn load() -> Result<Catalog, String> {
    if let Some(p) = std::env::var("LLM_GATEWAY_MODEL_SPECS")
        .ok()
        .filter(|p| !p.is_empty())
    {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {p}: {e}"))?;
        return parse(&text);
    }
    let local = Path::new("config/hosted-model-specs.json");
    if let Ok(text) = std::fs::read_to_string(local) {
        return parse(&text);
    }
    parse(EMBEDDED)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn embedded_catalog_is_valid() {
        let c = super::parse(super::EMBEDDED).unwrap();
        assert!(c.items.len() >= 4);
        assert!(super::parse(&super::EMBEDDED.replacen("Q4_K_M", "int4", 1)).is_err());
    }
}
