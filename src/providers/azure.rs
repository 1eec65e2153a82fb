//! Azure OpenAI: `POST {url}/openai/deployments/{deployment}/chat/completions?api-version=...`,
//! `api-key` header. The deployment is the model's upstream name.

use super::{encode_segment, required_key, Target};
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
        p.api_version = None;
        assert!(chat(&p, &model("a", "a"))
            .unwrap()
            .path
            .ends_with(DEFAULT_API_VERSION));
    }
}
