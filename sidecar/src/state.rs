//! Application state shared by every router: the database pool, the key vault, the catalogs, the
//! destination policy. The bottom of the module graph: it imports no router.

use crate::vault::Vault;
use serde_json::Value;
use sqlx::AnyPool;
use std::sync::Arc;

pub struct Inner {
    pub pool: AnyPool,
    pub vault: Vault,
    pub internal_token: String,
    pub ttl_seconds: u32,
    /// Serializes writes inside one process (SQLite has a single writer; PostgreSQL also locks the org row).
    pub write_lock: tokio::sync::Mutex<()>,
    pub model_specs: Value,
    pub pricing: crate::prices::Pricing,
    /// Where provider URLs may point (`LLM_GATEWAY_ALLOWED_DESTINATIONS`, see docs/security.md).
    pub destinations: llm_gateway::destination::Policy,
}

pub type AppState = Arc<Inner>;
