//! Mistral: `POST {base}/chat/completions`, bearer key.

#[allow(unused_imports)]
use crate::prelude::*;

use super::Target;
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = Some("https://api.mistral.ai/v1");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    super::openai_style(p, model)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_mistral() {
        let p = provider(ProviderKind::Mistral, DEFAULT_BASE.unwrap(), Some("m-key"));
        let t = chat(&p, &model("mistral-small", "mistral-small-latest")).unwrap();
        assert_eq!(t.path, "/v1/chat/completions");
        assert_eq!(t.body_model.as_deref(), Some("mistral-small-latest"));
    }
}
