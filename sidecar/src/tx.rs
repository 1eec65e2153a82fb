//! The one write pattern of the control plane: take the process write lock, open a transaction, lock the
//! organization's row, read its providers and configs, let the handler validate the changed set through
//! the filter's compiler and write, then commit. Every mutating handler of providers, configs and API keys
//! goes through [`OrgWrite`]; dropping it without [`OrgWrite::commit`] rolls back.

use crate::db::{self, StoredConfig, StoredProvider};
use crate::error::{ApiError, ApiResult};
use crate::org::{config_specs, validate_org};
use crate::state::AppState;
use llm_gateway::config::{ConfigSpec, ProviderSpec};
use sqlx::{Any, Transaction};

pub struct OrgWrite<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
    started: std::time::Instant,
    metrics: &'a crate::metrics::Metrics,
    pub tx: Transaction<'static, Any>,
    /// The organization's providers and configs as stored when the transaction began.
    pub providers: Vec<StoredProvider>,
    pub configs: Vec<StoredConfig>,
}

impl<'a> OrgWrite<'a> {
    pub async fn begin(st: &'a AppState, org: &'a str) -> ApiResult<OrgWrite<'a>> {
        let guard = st.write_lock.lock().await;
        let started = std::time::Instant::now();
        let mut tx = db::begin_write(&st.pool).await?;
        db::lock_org(&mut tx, org).await?;
        let providers = db::providers(&mut tx, org).await?;
        let configs = db::configs(&mut tx, org).await?;
        Ok(OrgWrite {
            _guard: guard,
            started,
            metrics: &st.metrics,
            tx,
            providers,
            configs,
        })
    }

    /// The stored configs as the filter's specs (without their keys).
    pub fn config_specs(&self) -> Vec<ConfigSpec> {
        config_specs(&self.configs)
    }

    /// Validates a changed set of providers and configs exactly as the filter would compile it; the
    /// compiler's message goes through `on_error` (each resource has its own error code).
    pub fn validate(
        &self,
        providers: &[ProviderSpec],
        configs: &[ConfigSpec],
        on_error: impl FnOnce(String) -> ApiError,
    ) -> ApiResult<()> {
        validate_org(providers, configs).map_err(on_error)
    }

    pub async fn commit(self) -> ApiResult<()> {
        self.tx.commit().await?;
        self.metrics.db_write.observe(self.started.elapsed());
        Ok(())
    }
}
