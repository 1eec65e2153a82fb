//! Any OpenAI-compatible server at a user-given `api_base` (vLLM, Ollama, llama.cpp, ...):
//! `{base}/chat/completions`; a bearer key only if one is configured.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{bearer, Target};
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = None;

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    at(p, model, "/chat/completions")
}

/// Any OpenAI-style API at `{base}{suffix}`; the key is optional (local servers often have none).
pub fn at(p: &ResolvedProvider, model: &Model, suffix: &str) -> Result<Target, GatewayError> {
    Ok(Target {
        path: p.base.join(suffix),
        auth: p
            .api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .and_then(bearer),
        body_model: Some(model.upstream.clone()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_custom() {
        let p = provider(
            ProviderKind::OpenAiCompatible,
            "http://127.0.0.1:11434/v1",
            None,
        );
        let t = chat(&p, &model("llama", "llama3.1:8b")).unwrap();
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.auth, None);
        assert_eq!(t.body_model.as_deref(), Some("llama3.1:8b"));
    }
}
