//! Groq: `POST {base}/chat/completions` under `/openai/v1`, bearer key.

#[allow(unused_imports)]
use crate::prelude::*;

use super::Target;
use crate::error::GatewayError;
use crate::plan::{Model, ResolvedProvider};

pub const DEFAULT_BASE: Option<&str> = Some("https://api.groq.com/openai/v1");

pub fn chat(p: &ResolvedProvider, model: &Model) -> Result<Target, GatewayError> {
    super::openai_style(p, model)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{model, provider};
    use super::*;
    use crate::plan::ProviderKind;

    #[test]
    fn shapes_groq() {
        let p = provider(ProviderKind::Groq, DEFAULT_BASE.unwrap(), Some("gsk"));
        let t = chat(&p, &model("llama-3.1-8b-instant", "llama-3.1-8b-instant")).unwrap();
        assert_eq!(t.path, "/openai/v1/chat/completions");
        assert_eq!(t.auth, Some(("authorization", "Bearer gsk".to_string())));
    }
}
