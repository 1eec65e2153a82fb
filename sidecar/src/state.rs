//! Application state shared by every router: the database pool, the key vault, the catalogs, the
//! destination policy. The bottom of the module graph: it imports no router.

use crate::vault::Vault;
use serde_json::Value;
use sqlx::AnyPool;
use std::sync::Arc;
use std::sync::RwLock;

pub struct Inner {
    pub pool: AnyPool,
    pub vault: Vault,
    pub internal_token: String,
    pub ttl_seconds: u32,
    /// Serializes writes inside one process (SQLite has a single writer; PostgreSQL also locks the org row).
    pub write_lock: tokio::sync::Mutex<()>,
    /// Hosted model specs and list prices; replaced as a whole on reload (SIGHUP).
    pub catalogs: RwLock<Arc<Catalogs>>,
    /// Where provider URLs may point (`LLM_GATEWAY_ALLOWED_DESTINATIONS`, see docs/security.md).
    pub destinations: llm_gateway::destination::Policy,
    /// The generated OpenAPI document served at `/openapi.json`.
    pub openapi: String,
    pub metrics: crate::metrics::Metrics,
}

pub type AppState = Arc<Inner>;

/// The sidecar's catalogs, read from files (or built in) at start and on reload.
pub struct Catalogs {
    pub model_specs: Value,
    pub pricing: crate::prices::Pricing,
}

impl Catalogs {
    pub fn load() -> Result<Catalogs, String> {
        let hosted = crate::specs::load()?;
        let pricing = crate::prices::Pricing::new(crate::prices::load()?, &hosted);
        let model_specs = serde_json::to_value(hosted).map_err(|e| e.to_string())?;
        Ok(Catalogs {
            model_specs,
            pricing,
        })
    }
}

impl Inner {
    /// The current catalogs (a cheap clone of an `Arc`).
    pub fn catalogs(&self) -> Arc<Catalogs> {
        match self.catalogs.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the catalogs; on error the previous ones keep serving.
    pub fn reload_catalogs(&self) -> Result<(), String> {
        let new = Arc::new(Catalogs::load()?);
        match self.catalogs.write() {
            Ok(mut c) => *c = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        Ok(())
    }
}
