//! Google Gemini API through its OpenAI-compatible endpoint: `{base}/chat/completions`, bearer key.

use super::{bearer, required_key, Target};
use crate::config::{Model, ResolvedProvider};
use crate::error::GatewayError;

pub const DEFAULT_BASE: Option<&str> =
    Some("https://generativelanguage.googleapis.com/v1beta/openai");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    Ok(Target {
        path: p.base.join("/chat/completions"),
        auth: bearer(required_key(p)?),
        body_model: Some(model.upstream.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::config::ProviderKind;

    #[test]
    fn shapes_gemini() {
        let p = provider(ProviderKind::Gemini, DEFAULT_BASE.unwrap(), Some("g-key"));
        let t = chat(&p, &model("gemini-1.5-flash", "gemini-1.5-flash")).unwrap();
        assert_eq!(t.path, "/v1beta/openai/chat/completions");
        assert_eq!(t.auth, Some(("authorization", "Bearer g-key".to_string())));
    }
}
