//! Google Gemini API through its OpenAI-compatible endpoint: `{base}/chat/completions`, bearer key.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{required_key, Target, Translation};
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> =
    Some("https://generativelanguage.googleapis.com/v1beta/openai");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    super::openai_style(p, model)
}

/// Base of the native API (`generateContent`).
pub const NATIVE_BASE: Option<&str> = Some(crate::translate::gemini::GEMINI_BASE);

/// The native API: `{base}/models/{model}:generateContent` (or `:streamGenerateContent?alt=sse`),
/// `x-goog-api-key`; body translated.
pub fn native(
    p: &ResolvedProvider,
    model: &Model,
    doc: &crate::body::Doc,
    stream: bool,
) -> Result<Target, GatewayError> {
    let req = crate::translate::gemini::request_doc(doc, &model.upstream, stream)?;
    Ok(Target {
        path: p.base.join(&req.path_suffix),
        auth: Some(("x-goog-api-key", required_key(p)?.to_string())),
        body_model: None,
        extra_headers: req.headers,
        native_body: Some(req.body),
        translation: Some(Translation::Gemini),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_gemini() {
        let p = provider(ProviderKind::Gemini, DEFAULT_BASE.unwrap(), Some("g-key"));
        let t = chat(&p, &model("gemini-1.5-flash", "gemini-1.5-flash")).unwrap();
        assert_eq!(t.path, "/v1beta/openai/chat/completions");
        assert_eq!(t.auth, Some(("authorization", "Bearer g-key".to_string())));
    }
}
