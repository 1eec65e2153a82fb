//! OpenAI: `POST {base}/chat/completions`, `Authorization: Bearer`.

#[allow(unused_imports)]
use crate::prelude::*;

use super::Target;
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = Some("https://api.openai.com/v1");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    super::openai_style(p, model)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_openai() {
        let p = provider(ProviderKind::OpenAi, DEFAULT_BASE.unwrap(), Some("sk-1"));
        let t = chat(&p, &model("gpt-4o", "gpt-4o-2024-05-13")).unwrap();
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.auth, Some(("authorization", "Bearer sk-1".to_string())));
        assert_eq!(t.body_model.as_deref(), Some("gpt-4o-2024-05-13"));
        let no_key = provider(ProviderKind::OpenAi, DEFAULT_BASE.unwrap(), None);
        assert_eq!(chat(&no_key, &model("a", "a")).unwrap_err().status(), 500);
    }
}
