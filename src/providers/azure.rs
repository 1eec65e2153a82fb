//! Azure OpenAI: `POST {url}/openai/deployments/{deployment}/chat/completions?api-version=...`,
//! `api-key` header. The deployment is the model's upstream name.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{encode_segment, required_key, Target};
use crate::api::Api;
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = None;
/// Used when the registration names no `apiVersion`.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    let version = p.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
    let path = p.base.join(&format!(
        "/openai/deployments/{}/chat/completions?api-version={}",
        encode_segment(&model.upstream),
        encode_segment(version)
    ));
    Ok(Target {
        path,
        auth: Some(("api-key", required_key(p)?.to_string())),
        // The deployment in the path decides the model; the body is left as the client sent it.
        body_model: None,
        ..Default::default()
    })
}

/// Other OpenAI APIs: embeddings and legacy completions on the deployment
/// (`/openai/deployments/{deployment}/embeddings?api-version=...`); the Responses API on Azure's
/// `/openai/v1/responses` (no api-version; the deployment name goes in the body's `model`).
pub fn api(p: &ResolvedProvider, model: &Model, api: Api) -> Result<Target, GatewayError> {
    if api == Api::Responses {
        return Ok(Target {
            path: p.base.join("/openai/v1/responses"),
            auth: Some(("api-key", required_key(p)?.to_string())),
            body_model: Some(model.upstream.clone()),
            ..Default::default()
        });
    }
    let version = p.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
    let path = p.base.join(&format!(
        "/openai/deployments/{}{}?api-version={}",
        encode_segment(&model.upstream),
        api.path(),
        encode_segment(version)
    ));
    Ok(Target {
        path,
        auth: Some(("api-key", required_key(p)?.to_string())),
        body_model: None,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_azure() {
        let mut p = provider(
            ProviderKind::Azure,
            "https://x.openai.azure.com",
            Some("az-key"),
        );
        p.api_version = Some("2024-02-01".into());
        let t = chat(&p, &model("gpt-4o", "my-deploy")).unwrap();
        assert_eq!(
            t.path,
            "/openai/deployments/my-deploy/chat/completions?api-version=2024-02-01"
        );
        assert_eq!(t.auth, Some(("api-key", "az-key".to_string())));
        assert_eq!(t.body_model, None);
        let t = api(&p, &model("e", "emb-dep"), Api::Embeddings).unwrap();
        assert_eq!(
            t.path,
            "/openai/deployments/emb-dep/embeddings?api-version=2024-02-01"
        );
        let t = api(&p, &model("r", "resp-dep"), Api::Responses).unwrap();
        assert_eq!(t.path, "/openai/v1/responses");
        assert_eq!(t.body_model.as_deref(), Some("resp-dep"));
        p.api_version = None;
        assert!(chat(&p, &model("a", "a"))
            .unwrap()
            .path
            .ends_with(DEFAULT_API_VERSION));
    }
}
