//! An organization's registrations as the filter sees them: validation through the filter's own
//! compiler, conversions from stored rows to the filter's specs, config secrets, scope visibility, settings
//! and destination checks. Shared by the routers; imports no router.

use crate::db::{StoredConfig, StoredProvider, StoredSettings};
use crate::error::{ApiError, ApiResult};
use crate::vault::Vault;
use llm_gateway::config::{
    compile, hash_key, ConfigProviderSpec, ConfigSpec, KeySpec, ProviderSpec, RawConfig,
    SecretSource, DEFAULT_CONFIG_ID,
};
use llm_gateway::destination::Policy;
use std::collections::BTreeMap;

pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn env(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Validates an organization's providers and configs exactly as the filter would: every config is
/// compiled through a synthetic key bound to it.
pub fn validate_org(providers: &[ProviderSpec], configs: &[ConfigSpec]) -> Result<(), String> {
    if configs.iter().any(|c| c.id == DEFAULT_CONFIG_ID) {
        return Err("'default' is the built-in config and cannot be stored".to_string());
    }
    let keys = configs
        .iter()
        .map(|c| c.id.as_str())
        .chain(std::iter::once(DEFAULT_CONFIG_ID))
        .map(|id| KeySpec {
            id: format!("validate:{id}"),
            sha256: hash_key(&format!("validate\u{0}{id}")),
            config: id.to_string(),
            ..Default::default()
        })
        .collect();
    let raw = RawConfig {
        providers: providers.to_vec(),
        configs: configs.to_vec(),
        keys,
        ..Default::default()
    };
    compile(&raw, &NoSecrets).map(|_| ())
}

pub fn config_error(msg: String) -> ApiError {
    let code = if msg.contains("loop") {
        "inheritance_loop"
    } else if msg.contains("levels deep") {
        "inheritance_too_deep"
    } else if msg.contains("unknown parent") {
        "unknown_parent"
    } else if msg.contains("unknown provider") {
        "unknown_provider"
    } else {
        "invalid_config"
    };
    ApiError::bad_request(code, msg)
}

pub fn specs_of(providers: &[StoredProvider]) -> Vec<ProviderSpec> {
    providers.iter().map(|p| p.spec.clone()).collect()
}

pub fn config_spec(c: &StoredConfig, secrets: Option<&BTreeMap<String, String>>) -> ConfigSpec {
    ConfigSpec {
        id: c.id.clone(),
        name: c.name.clone(),
        inherits: c.inherits.clone(),
        only: c.only.clone(),
        providers: c
            .entries
            .iter()
            .map(|e| ConfigProviderSpec {
                name: e.name.clone(),
                models: e.models.clone(),
                api_key: secrets.and_then(|s| s.get(&e.name).cloned()),
                api_base: e.api_base.clone(),
            })
            .collect(),
    }
}

pub fn config_specs(configs: &[StoredConfig]) -> Vec<ConfigSpec> {
    configs.iter().map(|c| config_spec(c, None)).collect()
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+:@".contains(c))
}

pub fn visible_to(spec: &ProviderSpec, cluster: Option<&str>) -> bool {
    match cluster {
        None => true,
        Some(c) => spec.is_hosted && spec.cluster_id.as_deref() == Some(c),
    }
}

/// A key's settings may only name a provider of the key's config (after inheritance): 400 otherwise.
pub fn check_settings_in_config(
    s: &StoredSettings,
    providers: &[StoredProvider],
    configs: &[StoredConfig],
    config_id: &str,
) -> ApiResult<()> {
    let Some(name) = &s.provider else {
        return Ok(());
    };
    let flat = llm_gateway::config::flatten_configs(&specs_of(providers), &config_specs(configs))
        .map_err(config_error)?;
    let in_config = flat
        .get(config_id)
        .is_some_and(|entries| entries.iter().any(|e| &e.name == name));
    if in_config {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "provider_not_in_config",
        format!("provider '{name}' is not one of the providers of config '{config_id}', to which this key is bound"),
    )
    .with_param("provider"))
}

/// Settings may only name providers (and models) the scope can reach.
pub fn check_settings(
    s: &StoredSettings,
    providers: &[StoredProvider],
    cluster: Option<&str>,
) -> ApiResult<()> {
    let visible: Vec<&ProviderSpec> = providers
        .iter()
        .map(|p| &p.spec)
        .filter(|p| visible_to(p, cluster))
        .collect();
    let scope = match cluster {
        Some(c) => format!(" to cluster '{c}'"),
        None => String::new(),
    };
    let serves = |p: &ProviderSpec, m: &str| p.models.iter().any(|x| x.name() == m);
    if let Some(name) = &s.provider {
        let p = visible.iter().find(|p| &p.name == name).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_provider",
                format!("provider '{name}' is not available{scope}"),
            )
            .with_param("provider")
        })?;
        if let Some(m) = &s.model {
            if !serves(p, m) {
                return Err(ApiError::bad_request(
                    "unknown_model",
                    format!("provider '{name}' does not serve model '{m}'"),
                )
                .with_param("model"));
            }
        }
    } else if let Some(m) = &s.model {
        if !visible.iter().any(|p| serves(p, m)) {
            return Err(ApiError::bad_request(
                "unknown_model",
                format!("no provider available{scope} serves model '{m}'"),
            )
            .with_param("model"));
        }
    }
    Ok(())
}

pub fn config_secrets(
    vault: &Vault,
    org: &str,
    c: &StoredConfig,
) -> ApiResult<BTreeMap<String, String>> {
    match &c.secrets_enc {
        None => Ok(BTreeMap::new()),
        Some(s) => {
            let text = vault
                .open(s, &format!("config:{org}:{}", c.id))
                .map_err(ApiError::internal)?;
            serde_json::from_str(&text).map_err(ApiError::internal)
        }
    }
}

/// The destination policy applied to a provider URL (or a config's `api_base`): 400 when refused.
pub fn check_destination(policy: &Policy, url: &str, hosted: bool) -> ApiResult<()> {
    policy
        .check_url(url.trim(), hosted)
        .map(|_| ())
        .map_err(|m| ApiError::bad_request("forbidden_destination", m))
}
