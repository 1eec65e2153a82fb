//! Anthropic through its OpenAI SDK compatibility endpoint: `{base}/chat/completions`, bearer key.
//! (The native Messages API translation is a separate, later provider mode.)

#[allow(unused_imports)]
use crate::prelude::*;

use super::{required_key, Target, Translation};
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = Some("https://api.anthropic.com/v1");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    super::openai_style(p, model)
}

/// The native Messages API: `{base}/messages`, `x-api-key`, `anthropic-version`; body translated.
pub fn native(
    p: &ResolvedProvider,
    model: &Model,
    doc: &crate::body::Doc,
) -> Result<Target, GatewayError> {
    let req = crate::translate::anthropic::request_doc(doc, &model.upstream)?;
    Ok(Target {
        path: p.base.join(&req.path_suffix),
        auth: Some(("x-api-key", required_key(p)?.to_string())),
        body_model: None,
        extra_headers: req.headers,
        native_body: Some(req.body),
        translation: Some(Translation::Anthropic),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_anthropic_compat() {
        let p = provider(
            ProviderKind::Anthropic,
            DEFAULT_BASE.unwrap(),
            Some("sk-ant"),
        );
        let t = chat(&p, &model("claude", "claude-sonnet-4-5")).unwrap();
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.body_model.as_deref(), Some("claude-sonnet-4-5"));
    }
}
