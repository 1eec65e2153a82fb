//! Selection: which provider and model serve a request.
//!
//! 1. `X-Provider-Name` (strict: must be one of the key's providers) fixes the provider; the model is the
//!    requested one, else the first settings default model (key, then org) it serves, else its first model.
//! 2. Otherwise the model is decided first: the requested one; else the first settings default model
//!    (key, then org) the config serves; else the first model of the first settings provider (key, then
//!    org) in the config; else the first model of the config's first provider.
//! 3. Then the provider among those serving that model, hosted first: a hosted settings provider (key,
//!    then org), any hosted provider (config order), a SaaS settings provider (key, then org), any SaaS
//!    provider (config order).
//!
//! So a hosted provider serving the model always wins over a SaaS one, whether the model was named,
//! defaulted, or implied by a settings provider; settings choose among providers of the same kind.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::config::{Identity, Model, ResolvedProvider};
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection<'a> {
    pub provider: &'a ResolvedProvider,
    pub model: &'a Model,
}

pub fn select<'a>(
    id: &'a Identity,
    header_provider: Option<&str>,
    requested_model: Option<&str>,
) -> Result<Selection<'a>, GatewayError> {
    // An explicit header is a hard constraint.
    if let Some(name) = header_provider.map(str::trim).filter(|n| !n.is_empty()) {
        let provider = id
            .provider(name)
            .ok_or_else(|| GatewayError::UnknownProvider {
                name: name.to_string(),
            })?;
        let model_name =
            requested_model.or_else(|| default_model(id, |m| provider.model(m).is_some()));
        let model = match model_name {
            Some(m) => provider
                .model(m)
                .ok_or_else(|| GatewayError::ModelNotAllowed {
                    model: m.to_string(),
                    provider: Some(provider.name.clone()),
                })?,
            None => provider
                .models
                .first()
                .ok_or(GatewayError::NoProviderConfigured)?,
        };
        return Ok(Selection { provider, model });
    }

    // Settings are preferences: the providers they name, in priority order.
    let preferred: Vec<&ResolvedProvider> = [&id.key_settings.provider, &id.org_settings.provider]
        .into_iter()
        .flatten()
        .filter_map(|n| id.provider(n))
        .collect();

    let model_name = match requested_model.or_else(|| default_model(id, |m| serves_anywhere(id, m)))
    {
        Some(m) => m,
        None => preferred
            .iter()
            .copied()
            .chain(id.providers.iter())
            .find_map(|p| p.models.first())
            .map(|m| m.name.as_str())
            .ok_or(GatewayError::NoProviderConfigured)?,
    };
    provider_for(id, &preferred, model_name).ok_or_else(|| not_found(id, model_name))
}

/// The provider that serves `model` for this identity when the request does not name one (hosted first,
/// then settings, then config order): what `/models` reports as `owned_by`.
pub fn owner<'a>(id: &'a Identity, model: &str) -> Option<&'a ResolvedProvider> {
    let preferred: Vec<&ResolvedProvider> = [&id.key_settings.provider, &id.org_settings.provider]
        .into_iter()
        .flatten()
        .filter_map(|n| id.provider(n))
        .collect();
    provider_for(id, &preferred, model).map(|s| s.provider)
}

fn provider_for<'a>(
    id: &'a Identity,
    preferred: &[&'a ResolvedProvider],
    model: &str,
) -> Option<Selection<'a>> {
    [true, false].into_iter().find_map(|hosted| {
        preferred
            .iter()
            .copied()
            .chain(id.providers.iter())
            .filter(|p| p.is_hosted == hosted)
            .find_map(|p| pair(p, model))
    })
}

fn not_found(id: &Identity, model: &str) -> GatewayError {
    match &id.cluster_id {
        Some(cluster) if id.out_of_scope_models.iter().any(|m| m == model) => {
            GatewayError::ModelOutOfScope {
                model: model.to_string(),
                cluster: cluster.clone(),
            }
        }
        _ => GatewayError::ModelNotAllowed {
            model: model.to_string(),
            provider: None,
        },
    }
}

fn pair<'a>(p: &'a ResolvedProvider, model: &str) -> Option<Selection<'a>> {
    p.model(model).map(|m| Selection {
        provider: p,
        model: m,
    })
}

fn serves_anywhere(id: &Identity, model: &str) -> bool {
    id.providers.iter().any(|p| p.model(model).is_some())
}

/// The first settings default model (key, then org) that `usable` accepts.
fn default_model(id: &Identity, usable: impl Fn(&str) -> bool) -> Option<&str> {
    [&id.key_settings.model, &id.org_settings.model]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .find(|m| usable(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Model, ProviderKind, Settings};
    use crate::url::BaseUrl;

    fn prov(name: &str, hosted: bool, models: &[&str]) -> ResolvedProvider {
        ResolvedProvider {
            name: name.into(),
            kind: ProviderKind::OpenAi,
            base: BaseUrl::parse("https://example.com/v1").unwrap(),
            api_version: None,
            models: models
                .iter()
                .map(|m| Model {
                    name: m.to_string(),
                    upstream: m.to_string(),
                })
                .collect(),
            is_hosted: hosted,
            api_key: Some("k".into()),
            envoy_cluster: "c".into(),
            cluster_id: None,
            fallback: vec![],
            native: false,
            fallback_on429: false,
            timeouts: None,
        }
    }

    fn identity() -> Identity {
        Identity {
            key_id: "k".into(),
            org_id: "o".into(),
            config_id: "c".into(),
            cluster_id: None,
            key_settings: Settings::default(),
            org_settings: Settings::default(),
            providers: vec![
                prov("openai-a", false, &["gpt-4o", "gpt-4o-mini"]),
                prov("openai-b", false, &["gpt-4o", "o3"]),
                prov("hosted", true, &["gpt-4o", "llama"]),
            ],
            fallback_providers: vec![],
            out_of_scope_models: vec![],
            store_prompts: false,
            prices: Default::default(),
            refused: None,
        }
    }

    fn names(s: Result<Selection, GatewayError>) -> (String, String) {
        let s = s.unwrap();
        (s.provider.name.clone(), s.model.name.clone())
    }

    fn pair_of(p: &str, m: &str) -> (String, String) {
        (p.to_string(), m.to_string())
    }

    #[test]
    fn no_model_takes_first_provider_first_model_hosted_first() {
        // The first model is gpt-4o; the hosted provider serving it wins over openai-a.
        assert_eq!(
            names(select(&identity(), None, None)),
            pair_of("hosted", "gpt-4o")
        );
        let mut id = identity();
        id.providers.pop();
        assert_eq!(
            names(select(&id, None, None)),
            pair_of("openai-a", "gpt-4o")
        );
    }

    #[test]
    fn owner_is_the_provider_that_would_serve() {
        let id = identity();
        assert_eq!(owner(&id, "gpt-4o").unwrap().name, "hosted");
        assert_eq!(owner(&id, "o3").unwrap().name, "openai-b");
        assert!(owner(&id, "nope").is_none());
    }

    #[test]
    fn cluster_scope_names_the_reason() {
        let mut id = identity();
        id.cluster_id = Some("c1".into());
        id.out_of_scope_models = vec!["gpt-5".into()];
        assert_eq!(
            select(&id, None, Some("gpt-5")).unwrap_err(),
            GatewayError::ModelOutOfScope {
                model: "gpt-5".into(),
                cluster: "c1".into()
            }
        );
        assert!(matches!(
            select(&id, None, Some("gpt-9")).unwrap_err(),
            GatewayError::ModelNotAllowed { .. }
        ));
    }

    #[test]
    fn hosted_wins_for_named_model() {
        assert_eq!(
            names(select(&identity(), None, Some("gpt-4o"))),
            pair_of("hosted", "gpt-4o")
        );
        assert_eq!(
            names(select(&identity(), None, Some("o3"))),
            pair_of("openai-b", "o3")
        );
        assert_eq!(
            names(select(&identity(), None, Some("gpt-4o-mini"))),
            pair_of("openai-a", "gpt-4o-mini")
        );
    }

    #[test]
    fn unknown_model_is_refused() {
        let e = select(&identity(), None, Some("gpt-9")).unwrap_err();
        assert_eq!(
            e,
            GatewayError::ModelNotAllowed {
                model: "gpt-9".into(),
                provider: None
            }
        );
    }

    #[test]
    fn header_beats_key_settings_beats_org_settings() {
        let mut id = identity();
        id.org_settings.provider = Some("openai-b".into());
        // A SaaS settings provider implies its first model, but a hosted provider serving it wins.
        assert_eq!(names(select(&id, None, None)), pair_of("hosted", "gpt-4o"));
        assert_eq!(
            names(select(&id, None, Some("gpt-4o"))),
            pair_of("hosted", "gpt-4o")
        );
        // Among SaaS providers the settings provider wins over config order.
        let mut saas_only = id.clone();
        saas_only.providers.pop();
        assert_eq!(
            names(select(&saas_only, None, None)),
            pair_of("openai-b", "gpt-4o")
        );
        id.key_settings.provider = Some("hosted".into());
        assert_eq!(names(select(&id, None, None)), pair_of("hosted", "gpt-4o"));
        assert_eq!(
            names(select(&id, Some("openai-a"), None)),
            pair_of("openai-a", "gpt-4o")
        );
        assert_eq!(
            names(select(&id, Some("openai-a"), Some("gpt-4o"))),
            pair_of("openai-a", "gpt-4o")
        );
        // A settings provider that does not serve the model does not block the lookup.
        assert_eq!(
            names(select(&id, None, Some("o3"))),
            pair_of("openai-b", "o3")
        );
    }

    #[test]
    fn header_is_strict() {
        let id = identity();
        assert_eq!(
            select(&id, Some("nope"), None).unwrap_err(),
            GatewayError::UnknownProvider {
                name: "nope".into()
            }
        );
        assert_eq!(
            select(&id, Some("openai-a"), Some("o3")).unwrap_err(),
            GatewayError::ModelNotAllowed {
                model: "o3".into(),
                provider: Some("openai-a".into())
            }
        );
    }

    #[test]
    fn settings_default_model() {
        let mut id = identity();
        id.org_settings.model = Some("llama".into());
        assert_eq!(names(select(&id, None, None)), pair_of("hosted", "llama"));
        id.key_settings.model = Some("o3".into());
        assert_eq!(names(select(&id, None, None)), pair_of("openai-b", "o3"));
        // With a header, a default model the provider does not serve is skipped.
        assert_eq!(
            names(select(&id, Some("openai-a"), None)),
            pair_of("openai-a", "gpt-4o")
        );
        id.key_settings.model = Some("not-in-config".into());
        assert_eq!(names(select(&id, None, None)), pair_of("hosted", "llama"));
    }

    #[test]
    fn empty_config() {
        let mut id = identity();
        id.providers.clear();
        assert_eq!(
            select(&id, None, None).unwrap_err(),
            GatewayError::NoProviderConfigured
        );
    }
}
