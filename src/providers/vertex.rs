//! Vertex AI Gemini through its OpenAI-compatible endpoint:
//! `{url}/endpoints/openapi/chat/completions` where `url` is the regional
//! `.../v1/projects/{project}/locations/{location}`; bearer access token; models are `google/<name>`.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{bearer, required_key, Target, Translation};
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = None;

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    let body_model = if model.upstream.contains('/') {
        model.upstream.clone()
    } else {
        format!("google/{}", model.upstream)
    };
    Ok(Target {
        path: p.base.join("/endpoints/openapi/chat/completions"),
        auth: bearer(required_key(p)?),
        body_model: Some(body_model),
        ..Default::default()
    })
}

/// The native Vertex API: `{url}/publishers/google/models/{model}:generateContent` (or
/// `:streamGenerateContent?alt=sse`), bearer access token; body translated as for Gemini.
pub fn native(
    p: &ResolvedProvider,
    model: &Model,
    doc: &crate::body::Doc,
    stream: bool,
) -> Result<Target, GatewayError> {
    let req = crate::translate::gemini::request_doc(doc, &model.upstream, stream)?;
    let suffix = format!(
        "{}{}",
        crate::translate::gemini::vertex_prefix(),
        req.path_suffix
    );
    Ok(Target {
        path: p.base.join(&suffix),
        auth: bearer(required_key(p)?),
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
    fn shapes_vertex() {
        let url =
            "https://us-central1-aiplatform.googleapis.com/v1/projects/p1/locations/us-central1";
        let p = provider(ProviderKind::VertexAiGemini, url, Some("ya29.token"));
        let t = chat(&p, &model("gemini-1.5-pro", "gemini-1.5-pro")).unwrap();
        assert_eq!(
            t.path,
            "/v1/projects/p1/locations/us-central1/endpoints/openapi/chat/completions"
        );
        assert_eq!(t.body_model.as_deref(), Some("google/gemini-1.5-pro"));
        assert_eq!(
            t.auth,
            Some(("authorization", "Bearer ya29.token".to_string()))
        );
        let t = chat(&p, &model("x", "meta/llama")).unwrap();
        assert_eq!(t.body_model.as_deref(), Some("meta/llama"));
    }
}
