//! Usage records: ingestion from the filter (`POST /internal/v1/usage`), aggregation
//! (`GET /v1/llm/usage`, JSON or CSV) shared with the savings report.

use crate::caller::{check_internal_token, Caller};
use crate::db::{self, StoredProvider};
use crate::error::{ApiError, ApiResult};
use crate::metrics;
use crate::prices::Tokens;
use crate::state::AppState;
use crate::util::{now_ms, parse_json, rfc3339};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::{AnyConnection, Row};
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub const MAX_BATCH: usize = 500;
const MAX_TAGS: usize = 64;

// ----------------------------------------------------------------------------------------------
// Ingestion.
// ----------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn {
    records: Vec<Value>,
}

/// The batch as documented: each record is validated on its own (a bad record fails the batch with its
/// index), so the handler reads `records` as raw JSON first.
#[derive(ToSchema)]
#[allow(dead_code)]
struct BatchDoc {
    records: Vec<RecordIn>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RecordIn {
    id: String,
    time: i64,
    org_id: String,
    #[serde(default)]
    cluster_id: Option<String>,
    #[serde(default)]
    api_key_id: Option<String>,
    #[serde(default)]
    config_id: Option<String>,
    provider: String,
    #[serde(default)]
    provider_type: Option<String>,
    #[serde(default)]
    provider_key_last4: Option<String>,
    #[serde(default)]
    model_requested: Option<String>,
    model_used: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    estimated: bool,
    status: u16,
    #[serde(default)]
    latency_ms: Option<u64>,
    #[serde(default)]
    ttft_ms: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    fallback: bool,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    completion: Option<Value>,
}

fn record_error(i: usize, id: Option<&str>, msg: impl std::fmt::Display) -> ApiError {
    let which = match id {
        Some(id) => format!("records[{i}] (id '{id}')"),
        None => format!("records[{i}]"),
    };
    ApiError::bad_request("invalid_record", format!("{which}: {msg}"))
        .with_param(format!("records[{i}]"))
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn text_of(v: Option<Value>) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn validate(i: usize, r: &RecordIn) -> ApiResult<()> {
    let id = Some(r.id.as_str());
    if r.id.trim().is_empty() || r.id.len() > 256 {
        return Err(record_error(i, None, "id must be 1-256 characters"));
    }
    if r.org_id.trim().is_empty() || r.org_id.len() > 256 {
        return Err(record_error(i, id, "orgId must be 1-256 characters"));
    }
    if r.time <= 0 {
        return Err(record_error(i, id, "time must be Unix milliseconds > 0"));
    }
    if r.provider.len() > 256 || r.model_used.len() > 512 {
        return Err(record_error(i, id, "provider or modelUsed is too long"));
    }
    if let Some(tags) = &r.tags {
        if tags.len() > MAX_TAGS {
            return Err(record_error(i, id, format!("more than {MAX_TAGS} tags")));
        }
        for (k, v) in tags {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(record_error(
                    i,
                    id,
                    format!("tag '{k}': keys must be 1-128 characters, values at most 1024"),
                ));
            }
        }
    }
    Ok(())
}

/// Effective `storePrompts` of (organization, key): key -> its cluster context -> organization -> false.
async fn store_prompts(
    conn: &mut AnyConnection,
    org: &str,
    key_id: Option<&str>,
) -> ApiResult<bool> {
    let key = match key_id {
        Some(k) => db::key_by_id(&mut *conn, org, k).await?,
        None => None,
    };
    if let Some(v) = key.as_ref().and_then(|k| k.settings.store_prompts) {
        return Ok(v);
    }
    if let Some(c) = key.as_ref().and_then(|k| k.cluster_id.clone()) {
        if let Some(v) = db::cluster_settings(&mut *conn, org, &c)
            .await?
            .store_prompts
        {
            return Ok(v);
        }
    }
    Ok(db::org_settings(&mut *conn, org)
        .await?
        .store_prompts
        .unwrap_or(false))
}

async fn org_exists(conn: &mut AnyConnection, org: &str) -> ApiResult<bool> {
    Ok(sqlx::query("SELECT id FROM organizations WHERE id = $1")
        .bind(org)
        .fetch_optional(conn)
        .await?
        .is_some())
}

/// `POST /internal/v1/usage`: idempotent on record id; `{"accepted":N,"duplicates":M}`.
#[utoipa::path(
    post,
    path = "/internal/v1/usage",
    tag = "internal",
    request_body = BatchDoc,
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("gatewayToken" = []))
)]
pub async fn ingest(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    check_internal_token(&st, &headers)?;
    let batch: BatchIn = parse_json(&body)?;
    if batch.records.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "a batch holds at most {MAX_BATCH} records, this one {}",
                batch.records.len()
            ),
        )
        .with_param("records"));
    }
    metrics::add(&st.metrics.ingest_batches, 1);
    let n = batch.records.len() as u64;
    let mut records = Vec::with_capacity(batch.records.len());
    for (i, v) in batch.records.into_iter().enumerate() {
        let id = v.get("id").and_then(Value::as_str).map(str::to_string);
        let r: Result<RecordIn, ApiError> =
            serde_json::from_value(v).map_err(|e| record_error(i, id.as_deref(), e));
        match r.and_then(|r| validate(i, &r).map(|_| r)) {
            Ok(r) => records.push(r),
            Err(e) => {
                metrics::add(&st.metrics.ingest_refused, n);
                tracing::warn!(records = n, index = i, "usage batch refused: {}", e.message);
                return Err(e);
            }
        }
    }

    let catalogs = st.catalogs();
    let _w = st.write_lock.lock().await;
    let started = std::time::Instant::now();
    let mut tx = db::begin_write(&st.pool).await?;
    let mut providers: HashMap<String, Vec<StoredProvider>> = HashMap::new();
    let mut prompts: HashMap<(String, Option<String>), bool> = HashMap::new();
    let mut known: HashMap<String, bool> = HashMap::new();
    let (mut accepted, mut duplicates, mut orphans) = (0u64, 0u64, 0u64);
    let received = now_ms();
    for r in records {
        let org = r.org_id.trim().to_string();
        if !known.contains_key(&org) {
            let exists = org_exists(&mut tx, &org).await?;
            known.insert(org.clone(), exists);
            let list = if exists {
                db::providers(&mut tx, &org).await?
            } else {
                Vec::new()
            };
            providers.insert(org.clone(), list);
        }
        let key_id = nonempty(r.api_key_id.clone());
        let pk = (org.clone(), key_id.clone());
        let keep_prompts = match prompts.get(&pk) {
            Some(v) => *v,
            None => {
                let v = if known.get(&org).copied().unwrap_or(false) {
                    store_prompts(&mut tx, &org, key_id.as_deref()).await?
                } else {
                    false
                };
                prompts.insert(pk, v);
                v
            }
        };
        let provider_name = r.provider.trim().to_string();
        let provider = providers
            .get(&org)
            .and_then(|l| l.iter().find(|p| p.spec.name == provider_name));
        let model_used = r.model_used.trim().to_string();
        let model_requested =
            nonempty(r.model_requested.clone()).unwrap_or_else(|| model_used.clone());
        let tokens = Tokens {
            prompt: r.prompt_tokens,
            completion: r.completion_tokens,
            cached: r.cached_tokens.unwrap_or(0),
        };
        let costed = catalogs.pricing.cost(
            provider,
            r.provider_type.as_deref(),
            &model_used,
            &model_requested,
            tokens,
        );
        let (prompt, completion) = if keep_prompts {
            (text_of(r.prompt), text_of(r.completion))
        } else {
            (None, None)
        };
        let tags = r.tags.unwrap_or_default();
        let day = rfc3339(r.time).chars().take(10).collect::<String>();
        let done = sqlx::query(
            "INSERT INTO usage_records (id, org_id, time_ms, day, cluster_id, api_key_id, config_id, provider, \
             provider_type, provider_key_last4, model_requested, model_used, prompt_tokens, completion_tokens, \
             cached_tokens, estimated, status, latency_ms, ttft_ms, stream, fallback, truncated, tags, prompt, \
             completion, cost_nusd, list_cost_nusd, price_source, catalog_version, received_at) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
             $22, $23, $24, $25, $26, $27, $28, $29, $30) ON CONFLICT (id) DO NOTHING",
        )
        .bind(r.id.clone())
        .bind(org.clone())
        .bind(r.time)
        .bind(day)
        .bind(nonempty(r.cluster_id))
        .bind(key_id)
        .bind(nonempty(r.config_id))
        .bind(provider_name)
        .bind(nonempty(r.provider_type))
        .bind(nonempty(r.provider_key_last4))
        .bind(model_requested)
        .bind(model_used)
        .bind(to_i64(tokens.prompt))
        .bind(to_i64(tokens.completion))
        .bind(to_i64(tokens.cached))
        .bind(i64::from(r.estimated))
        .bind(i64::from(r.status))
        .bind(to_i64(r.latency_ms.unwrap_or(0)))
        .bind(r.ttft_ms.map(to_i64))
        .bind(i64::from(r.stream))
        .bind(i64::from(r.fallback))
        .bind(i64::from(r.truncated))
        .bind(serde_json::to_string(&tags).map_err(ApiError::internal)?)
        .bind(prompt)
        .bind(completion)
        .bind(costed.cost_nusd)
        .bind(costed.list_cost_nusd)
        .bind(costed.source.as_str())
        .bind(catalogs.pricing.catalog.version.clone())
        .bind(received)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done == 0 {
            duplicates += 1;
            continue;
        }
        accepted += 1;
        if !known.get(&org).copied().unwrap_or(false) {
            orphans += 1;
        }
        for (k, v) in &tags {
            sqlx::query("INSERT INTO usage_tags (usage_id, org_id, k, v) VALUES ($1, $2, $3, $4)")
                .bind(r.id.clone())
                .bind(org.clone())
                .bind(k.clone())
                .bind(v.clone())
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    st.metrics.db_ingest.observe(started.elapsed());
    metrics::add(&st.metrics.ingest_accepted, accepted);
    metrics::add(&st.metrics.ingest_duplicates, duplicates);
    metrics::add(&st.metrics.ingest_orphans, orphans);
    if orphans > 0 {
        tracing::warn!(
            records = orphans,
            "stored usage records of unknown organization(s)"
        );
    }
    Ok(Json(
        json!({ "accepted": accepted, "duplicates": duplicates }),
    ))
}

// ----------------------------------------------------------------------------------------------
// Query parameters.
// ----------------------------------------------------------------------------------------------

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string as (name, value) pairs, in order (names may repeat).
pub fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Unix milliseconds, an RFC 3339 time (`2025-11-24T10:00:00Z`, offsets allowed) or a UTC date,
/// parsed strictly by the `time` crate: `2025-02-31` is refused, not read as March 3.
pub fn parse_time(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    let nanos = if s.len() == 10 {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, &format)
            .ok()?
            .midnight()
            .assume_utc()
            .unix_timestamp_nanos()
    } else {
        // RFC 3339 also allows a space between date and time.
        let t = match (s.get(..10), s.get(10..11), s.get(11..)) {
            (Some(d), Some(" "), Some(rest)) => format!("{d}T{rest}"),
            _ => s.to_string(),
        };
        time::OffsetDateTime::parse(&t, &Rfc3339)
            .ok()?
            .unix_timestamp_nanos()
    };
    i64::try_from(nanos / 1_000_000).ok()
}

/// A grouping dimension of `group_by`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Provider,
    ProviderType,
    Model,
    ModelRequested,
    ApiKey,
    Cluster,
    Config,
    Day,
    Tag(String),
}

impl Dim {
    pub fn parse(s: &str) -> Option<Dim> {
        Some(match s.trim() {
            "provider" => Dim::Provider,
            "provider_type" | "providerType" => Dim::ProviderType,
            "model" | "model_used" | "modelUsed" => Dim::Model,
            "model_requested" | "modelRequested" => Dim::ModelRequested,
            "api_key" | "apiKey" | "api_key_id" | "apiKeyId" | "key" => Dim::ApiKey,
            "cluster" | "cluster_id" | "clusterId" => Dim::Cluster,
            "config" | "config_id" | "configId" => Dim::Config,
            "day" | "date" => Dim::Day,
            t => {
                let k = t.strip_prefix("tag:")?;
                if k.is_empty() {
                    return None;
                }
                Dim::Tag(k.to_string())
            }
        })
    }

    pub fn name(&self) -> String {
        match self {
            Dim::Provider => "provider".into(),
            Dim::ProviderType => "provider_type".into(),
            Dim::Model => "model".into(),
            Dim::ModelRequested => "model_requested".into(),
            Dim::ApiKey => "api_key".into(),
            Dim::Cluster => "cluster".into(),
            Dim::Config => "config".into(),
            Dim::Day => "day".into(),
            Dim::Tag(k) => format!("tag:{k}"),
        }
    }
}

/// Filters and grouping of a usage query.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub from: i64,
    pub to: i64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub model_requested: Option<String>,
    pub api_key_id: Option<String>,
    pub cluster_id: Option<String>,
    pub config_id: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// The usage filter's query parameters, as documented in the OpenAPI description of `/v1/llm/usage`,
/// `/v1/llm/usage/records` and `/v1/llm/report` (read by [`parse_query`], not by this type).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct FilterParams {
    /// start (inclusive): Unix ms, RFC 3339 or YYYY-MM-DD
    from: Option<String>,
    /// end (exclusive): Unix ms, RFC 3339 or YYYY-MM-DD
    to: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    model_requested: Option<String>,
    api_key_id: Option<String>,
    cluster_id: Option<String>,
    config_id: Option<String>,
    /// key=value
    tag: Option<String>,
}

pub struct UsageQuery {
    pub filter: Filter,
    pub group_by: Vec<Dim>,
    pub csv: bool,
}

fn bad_param(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_value", msg).with_param(param)
}

/// Parses the `/v1/llm/usage` parameters. `extra` names further parameters the caller handles.
pub fn parse_query(pairs: &[(String, String)], extra: &[&str]) -> ApiResult<UsageQuery> {
    let mut q = UsageQuery {
        filter: Filter {
            from: 0,
            to: i64::MAX,
            ..Default::default()
        },
        group_by: Vec::new(),
        csv: false,
    };
    for (k, v) in pairs {
        let val = || Some(v.trim().to_string()).filter(|s| !s.is_empty());
        match k.as_str() {
            "from" | "to" => {
                let t = parse_time(v).ok_or_else(|| {
                    bad_param(
                        k,
                        format!("{k}: '{v}' is not Unix milliseconds, an RFC 3339 time or a YYYY-MM-DD date"),
                    )
                })?;
                if k == "from" {
                    q.filter.from = t;
                } else {
                    q.filter.to = t;
                }
            }
            "provider" => q.filter.provider = val(),
            "model" => q.filter.model = val(),
            "modelRequested" | "model_requested" => q.filter.model_requested = val(),
            "apiKeyId" | "api_key_id" => q.filter.api_key_id = val(),
            "clusterId" | "cluster_id" => q.filter.cluster_id = val(),
            "configId" | "config_id" => q.filter.config_id = val(),
            "tag" => {
                let (tk, tv) = v
                    .split_once('=')
                    .filter(|(a, _)| !a.trim().is_empty())
                    .ok_or_else(|| bad_param("tag", format!("tag: '{v}' is not key=value")))?;
                q.filter
                    .tags
                    .push((tk.trim().to_string(), tv.trim().to_string()));
            }
            "group_by" | "groupBy" => {
                for part in v.split(',').filter(|p| !p.trim().is_empty()) {
                    let d = Dim::parse(part).ok_or_else(|| {
                        bad_param(
                            "group_by",
                            format!(
                                "group_by: unknown dimension '{part}' (provider, provider_type, model, \
                                 model_requested, api_key, cluster, config, day, tag:<key>)"
                            ),
                        )
                    })?;
                    if !q.group_by.contains(&d) {
                        q.group_by.push(d);
                    }
                }
                if q.group_by.len() > 4 {
                    return Err(bad_param("group_by", "group_by takes at most 4 dimensions"));
                }
            }
            "format" => match v.as_str() {
                "csv" => q.csv = true,
                "json" | "" => q.csv = false,
                other => {
                    return Err(bad_param(
                        "format",
                        format!("format: '{other}' (json or csv)"),
                    ))
                }
            },
            other if extra.contains(&other) => {}
            other => {
                return Err(ApiError::bad_request(
                    "unknown_field",
                    format!("unknown query parameter '{other}'"),
                )
                .with_param(other.to_string()))
            }
        }
    }
    if q.filter.from >= q.filter.to {
        return Err(bad_param("from", "from must be before to"));
    }
    Ok(q)
}

// ----------------------------------------------------------------------------------------------
// Aggregation.
// ----------------------------------------------------------------------------------------------

/// Sums of a group (costs in nano-USD).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sums {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost_nusd: i64,
    pub list_cost_nusd: i64,
    pub errors: i64,
    pub estimated: i64,
    pub unpriced: i64,
    pub fallbacks: i64,
}

impl Sums {
    pub fn add(&mut self, o: &Sums) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cached_tokens += o.cached_tokens;
        self.cost_nusd += o.cost_nusd;
        self.list_cost_nusd += o.list_cost_nusd;
        self.errors += o.errors;
        self.estimated += o.estimated;
        self.unpriced += o.unpriced;
        self.fallbacks += o.fallbacks;
    }
    pub fn savings_nusd(&self) -> i64 {
        self.list_cost_nusd - self.cost_nusd
    }
    pub fn savings_pct(&self) -> f64 {
        if self.list_cost_nusd > 0 {
            self.savings_nusd() as f64 * 100.0 / self.list_cost_nusd as f64
        } else {
            0.0
        }
    }
}

pub struct Group {
    pub key: Vec<Option<String>>,
    pub sums: Sums,
}

enum Bind {
    S(String),
    I(i64),
}

/// The WHERE conditions of a query (binds `$1..$3` are org, from, to and already in `binds`).
fn where_clause(caller: &Caller, f: &Filter, binds: &mut Vec<Bind>) -> Vec<String> {
    let next = |binds: &mut Vec<Bind>, b: Bind| {
        binds.push(b);
        format!("${}", binds.len())
    };
    let mut wh = vec![
        "u.org_id = $1".to_string(),
        "u.time_ms >= $2".to_string(),
        "u.time_ms < $3".to_string(),
    ];
    let scope_cluster = caller.cluster_id.clone();
    for (col, v) in [
        ("u.cluster_id", scope_cluster),
        ("u.provider", f.provider.clone()),
        ("u.model_used", f.model.clone()),
        ("u.model_requested", f.model_requested.clone()),
        ("u.api_key_id", f.api_key_id.clone()),
        ("u.cluster_id", f.cluster_id.clone()),
        ("u.config_id", f.config_id.clone()),
    ] {
        if let Some(v) = v {
            let p = next(binds, Bind::S(v));
            wh.push(format!("{col} = {p}"));
        }
    }
    for (k, v) in &f.tags {
        let pk = next(binds, Bind::S(k.clone()));
        let pv = next(binds, Bind::S(v.clone()));
        wh.push(format!(
            "EXISTS (SELECT 1 FROM usage_tags tf WHERE tf.usage_id = u.id AND tf.k = {pk} AND tf.v = {pv})"
        ));
    }
    wh
}

/// Aggregates the caller's records (organization; cluster-scoped callers: their cluster only).
pub async fn aggregate(
    conn: &mut AnyConnection,
    caller: &Caller,
    f: &Filter,
    group_by: &[Dim],
) -> ApiResult<Vec<Group>> {
    let mut binds: Vec<Bind> = vec![
        Bind::S(caller.org_id.clone()),
        Bind::I(f.from),
        Bind::I(f.to),
    ];
    let next = |binds: &mut Vec<Bind>, b: Bind| {
        binds.push(b);
        format!("${}", binds.len())
    };
    let mut joins = String::new();
    let mut cols = Vec::new();
    for (i, d) in group_by.iter().enumerate() {
        let expr = match d {
            Dim::Provider => "u.provider".to_string(),
            Dim::ProviderType => "u.provider_type".to_string(),
            Dim::Model => "u.model_used".to_string(),
            Dim::ModelRequested => "u.model_requested".to_string(),
            Dim::ApiKey => "u.api_key_id".to_string(),
            Dim::Cluster => "u.cluster_id".to_string(),
            Dim::Config => "u.config_id".to_string(),
            Dim::Day => "u.day".to_string(),
            Dim::Tag(k) => {
                let p = next(&mut binds, Bind::S(k.clone()));
                joins.push_str(&format!(
                    " LEFT JOIN usage_tags g{i} ON g{i}.usage_id = u.id AND g{i}.k = {p}"
                ));
                format!("g{i}.v")
            }
        };
        cols.push(expr);
    }
    let wh = where_clause(caller, f, &mut binds);
    let sum = |e: &str, alias: &str| format!("CAST(COALESCE(SUM({e}), 0) AS BIGINT) AS {alias}");
    let mut select: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} AS k{i}"))
        .collect();
    select.push("CAST(COUNT(*) AS BIGINT) AS requests".to_string());
    select.push(sum("u.prompt_tokens", "prompt_tokens"));
    select.push(sum("u.completion_tokens", "completion_tokens"));
    select.push(sum("u.cached_tokens", "cached_tokens"));
    select.push(sum("u.cost_nusd", "cost_nusd"));
    select.push(sum("u.list_cost_nusd", "list_cost_nusd"));
    select.push(sum(
        "CASE WHEN u.status >= 400 OR u.status < 100 THEN 1 ELSE 0 END",
        "errors",
    ));
    select.push(sum("u.estimated", "estimated"));
    select.push(sum(
        "CASE WHEN u.price_source = 'unpriced' THEN 1 ELSE 0 END",
        "unpriced",
    ));
    select.push(sum("u.fallback", "fallbacks"));
    let mut sql = format!(
        "SELECT {} FROM usage_records u{joins} WHERE {}",
        select.join(", "),
        wh.join(" AND ")
    );
    if !cols.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", cols.join(", ")));
    }
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = match b {
            Bind::S(s) => q.bind(s),
            Bind::I(i) => q.bind(i),
        };
    }
    let rows = q.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut key = Vec::with_capacity(cols.len());
        for i in 0..cols.len() {
            key.push(r.try_get::<Option<String>, _>(format!("k{i}").as_str())?);
        }
        let sums = Sums {
            requests: r.try_get("requests")?,
            prompt_tokens: r.try_get("prompt_tokens")?,
            completion_tokens: r.try_get("completion_tokens")?,
            cached_tokens: r.try_get("cached_tokens")?,
            cost_nusd: r.try_get("cost_nusd")?,
            list_cost_nusd: r.try_get("list_cost_nusd")?,
            errors: r.try_get("errors")?,
            estimated: r.try_get("estimated")?,
            unpriced: r.try_get("unpriced")?,
            fallbacks: r.try_get("fallbacks")?,
        };
        if sums.requests > 0 {
            out.push(Group { key, sums });
        }
    }
    // Days ascending; otherwise the most expensive first.
    let day_pos = group_by.iter().position(|d| *d == Dim::Day);
    out.sort_by(|a, b| {
        let by_day = match day_pos {
            Some(p) => a.key.get(p).cmp(&b.key.get(p)),
            None => std::cmp::Ordering::Equal,
        };
        by_day
            .then(b.sums.cost_nusd.cmp(&a.sums.cost_nusd))
            .then(b.sums.requests.cmp(&a.sums.requests))
            .then(a.key.cmp(&b.key))
    });
    Ok(out)
}

pub fn usd(nusd: i64) -> f64 {
    nusd as f64 / 1e9
}

/// Exact decimal USD of a nano-USD amount (9 decimals).
fn usd_text(nusd: i64) -> String {
    let sign = if nusd < 0 { "-" } else { "" };
    let a = nusd.unsigned_abs();
    format!("{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
}

fn sums_json(s: &Sums, m: &mut Map<String, Value>) {
    m.insert("requests".into(), json!(s.requests));
    m.insert("promptTokens".into(), json!(s.prompt_tokens));
    m.insert("completionTokens".into(), json!(s.completion_tokens));
    m.insert("cachedTokens".into(), json!(s.cached_tokens));
    m.insert(
        "totalTokens".into(),
        json!(s.prompt_tokens + s.completion_tokens),
    );
    m.insert("cost".into(), json!(usd(s.cost_nusd)));
    m.insert("listCost".into(), json!(usd(s.list_cost_nusd)));
    m.insert("savings".into(), json!(usd(s.savings_nusd())));
    m.insert(
        "savingsPercent".into(),
        json!((s.savings_pct() * 100.0).round() / 100.0),
    );
    m.insert("costNanoUsd".into(), json!(s.cost_nusd));
    m.insert("listCostNanoUsd".into(), json!(s.list_cost_nusd));
    m.insert("errors".into(), json!(s.errors));
    m.insert("estimated".into(), json!(s.estimated));
    m.insert("unpriced".into(), json!(s.unpriced));
    m.insert("fallbacks".into(), json!(s.fallbacks));
}

/// One CSV cell of user-controlled text (tag values, model and provider names). A cell a spreadsheet
/// would read as a formula (`= + - @`, tab, CR at the start) gets a leading `'` so that it stays text
/// (OWASP's CSV injection advice); cells with separators, quotes or line breaks are quoted.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `GET /v1/llm/usage`.
#[utoipa::path(
    get,
    path = "/v1/llm/usage",
    tag = "usage",
    params(
        FilterParams,
        ("group_by" = Option<String>, Query, description = "up to 4 of provider, provider_type, model, model_requested, api_key, cluster, config, day, tag:<key>, comma-separated"),
        ("format" = Option<String>, Query, description = "json or csv")
    ),
    responses((status = 200, description = "sums (JSON) or CSV", content((serde_json::Value = "application/json"), (String = "text/csv"))), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
pub async fn usage(State(st): State<AppState>, caller: Caller, uri: Uri) -> ApiResult<Response> {
    let q = parse_query(&query_pairs(&uri), &[])?;
    let mut conn = st.pool.acquire().await?;
    let groups = aggregate(&mut conn, &caller, &q.filter, &q.group_by).await?;
    let mut totals = Sums::default();
    for g in &groups {
        totals.add(&g.sums);
    }
    let rows: Vec<(Vec<Option<String>>, Sums)> = if q.group_by.is_empty() {
        vec![(Vec::new(), totals.clone())]
    } else {
        groups.into_iter().map(|g| (g.key, g.sums)).collect()
    };
    if q.csv {
        let mut out = String::new();
        let mut head: Vec<String> = q.group_by.iter().map(|d| csv_field(&d.name())).collect();
        head.extend(
            [
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "total_tokens",
                "cost_usd",
                "list_cost_usd",
                "savings_usd",
                "savings_percent",
                "errors",
                "estimated",
                "unpriced",
                "fallbacks",
            ]
            .map(String::from),
        );
        out.push_str(&head.join(","));
        out.push('\n');
        for (key, s) in &rows {
            let mut f: Vec<String> = key
                .iter()
                .map(|k| csv_field(k.as_deref().unwrap_or("")))
                .collect();
            f.extend([
                s.requests.to_string(),
                s.prompt_tokens.to_string(),
                s.completion_tokens.to_string(),
                s.cached_tokens.to_string(),
                (s.prompt_tokens + s.completion_tokens).to_string(),
                usd_text(s.cost_nusd),
                usd_text(s.list_cost_nusd),
                usd_text(s.savings_nusd()),
                format!("{:.2}", s.savings_pct()),
                s.errors.to_string(),
                s.estimated.to_string(),
                s.unpriced.to_string(),
                s.fallbacks.to_string(),
            ]);
            out.push_str(&f.join(","));
            out.push('\n');
        }
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"usage.csv\"",
                ),
            ],
            out,
        )
            .into_response());
    }
    let names: Vec<String> = q.group_by.iter().map(Dim::name).collect();
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|(key, s)| {
            let mut m = Map::new();
            let g: Map<String, Value> = names
                .iter()
                .zip(key)
                .map(|(n, k)| (n.clone(), json!(k)))
                .collect();
            m.insert("group".into(), Value::Object(g));
            sums_json(s, &mut m);
            Value::Object(m)
        })
        .collect();
    let mut t = Map::new();
    sums_json(&totals, &mut t);
    let budgets = super::budgets::budgets_with_spend(&mut conn, &caller).await?;
    Ok(Json(json!({
        "from": rfc3339(q.filter.from),
        "to": if q.filter.to == i64::MAX { Value::Null } else { json!(rfc3339(q.filter.to)) },
        "groupBy": names,
        "currency": "USD",
        "catalogVersion": st.catalogs().pricing.catalog.version,
        "rows": json_rows,
        "totals": Value::Object(t),
        "budgets": budgets,
    }))
    .into_response())
}

/// `GET /v1/llm/usage/records`: individual records, newest first (`limit` 1-1000, default 100).
#[utoipa::path(
    get,
    path = "/v1/llm/usage/records",
    tag = "usage",
    params(
        FilterParams,
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000)
    ),
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
pub async fn records(
    State(st): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    let pairs = query_pairs(&uri);
    let q = parse_query(&pairs, &["limit"])?;
    if !q.group_by.is_empty() || q.csv {
        return Err(bad_param(
            "group_by",
            "records are not grouped; use /v1/llm/usage for sums and CSV",
        ));
    }
    let limit = match pairs.iter().find(|(k, _)| k == "limit") {
        Some((_, v)) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| bad_param("limit", "limit must be 1-1000"))?,
        None => 100,
    };
    let mut binds = vec![
        Bind::S(caller.org_id.clone()),
        Bind::I(q.filter.from),
        Bind::I(q.filter.to),
    ];
    let wh = where_clause(&caller, &q.filter, &mut binds);
    let sql = format!(
        "SELECT u.id, u.time_ms, u.cluster_id, u.api_key_id, u.config_id, u.provider, u.provider_type, \
         u.provider_key_last4, u.model_requested, u.model_used, u.prompt_tokens, u.completion_tokens, \
         u.cached_tokens, u.estimated, u.status, u.latency_ms, u.ttft_ms, u.stream, u.fallback, u.truncated, \
         u.tags, u.prompt, u.completion, u.cost_nusd, u.list_cost_nusd, u.price_source, u.catalog_version \
         FROM usage_records u WHERE {} ORDER BY u.time_ms DESC, u.id LIMIT {limit}",
        wh.join(" AND ")
    );
    let mut query = sqlx::query(&sql);
    for b in binds {
        query = match b {
            Bind::S(s) => query.bind(s),
            Bind::I(i) => query.bind(i),
        };
    }
    let mut conn = st.pool.acquire().await?;
    let rows = query.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let flag = |c: &str| -> ApiResult<bool> { Ok(r.try_get::<i64, _>(c)? != 0) };
        let cost: i64 = r.try_get("cost_nusd")?;
        let list: i64 = r.try_get("list_cost_nusd")?;
        let tags: Value =
            serde_json::from_str(&r.try_get::<String, _>("tags")?).unwrap_or_else(|_| json!({}));
        let time: i64 = r.try_get("time_ms")?;
        out.push(json!({
            "id": r.try_get::<String, _>("id")?,
            "time": time,
            "timestamp": rfc3339(time),
            "clusterId": r.try_get::<Option<String>, _>("cluster_id")?,
            "apiKeyId": r.try_get::<Option<String>, _>("api_key_id")?,
            "configId": r.try_get::<Option<String>, _>("config_id")?,
            "provider": r.try_get::<String, _>("provider")?,
            "providerType": r.try_get::<Option<String>, _>("provider_type")?,
            "providerKeyLast4": r.try_get::<Option<String>, _>("provider_key_last4")?,
            "modelRequested": r.try_get::<String, _>("model_requested")?,
            "modelUsed": r.try_get::<String, _>("model_used")?,
            "promptTokens": r.try_get::<i64, _>("prompt_tokens")?,
            "completionTokens": r.try_get::<i64, _>("completion_tokens")?,
            "cachedTokens": r.try_get::<i64, _>("cached_tokens")?,
            "estimated": flag("estimated")?,
            "status": r.try_get::<i64, _>("status")?,
            "latencyMs": r.try_get::<i64, _>("latency_ms")?,
            "ttftMs": r.try_get::<Option<i64>, _>("ttft_ms")?,
            "stream": flag("stream")?,
            "fallback": flag("fallback")?,
            "truncated": flag("truncated")?,
            "tags": tags,
            "prompt": r.try_get::<Option<String>, _>("prompt")?,
            "completion": r.try_get::<Option<String>, _>("completion")?,
            "cost": usd(cost),
            "listCost": usd(list),
            "costNanoUsd": cost,
            "listCostNanoUsd": list,
            "priceSource": r.try_get::<String, _>("price_source")?,
            "catalogVersion": r.try_get::<String, _>("catalog_version")?,
        }));
    }
    Ok(Json(json!({ "records": out })))
}

/// `GET /v1/llm/prices`: the list-price catalog in force.
#[utoipa::path(
    get,
    path = "/v1/llm/prices",
    tag = "usage",
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
pub async fn prices(State(st): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(serde_json::to_value(&st.catalogs().pricing.catalog).unwrap_or(Value::Null))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(usage))
        .routes(routes!(records))
        .routes(routes!(prices))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn csv_cells_never_start_a_formula() {
        use super::csv_field;
        assert_eq!(csv_field("search"), "search");
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(
            csv_field("+HYPERLINK(\"http://x\",\"y\")"),
            "\"'+HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""
        );
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("-2"), "'-2");
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_field("\rx"), "\"'\rx\"");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("0"), Some(0));
        assert_eq!(parse_time("2024-11-08"), Some(1_731_024_000_000));
        assert_eq!(
            parse_time("2024-11-08T12:36:45.258Z"),
            Some(1_731_069_405_258)
        );
        assert_eq!(
            parse_time("2024-11-08T14:36:45.258+02:00"),
            Some(1_731_069_405_258)
        );
        assert_eq!(parse_time("2024-13-01"), None);
        assert_eq!(parse_time("2025-02-31"), None);
        assert_eq!(parse_time("2025-02-29"), None);
        assert_eq!(parse_time("2024-02-29"), Some(1_709_164_800_000));
        assert_eq!(parse_time("2024-11-08T24:00:00Z"), None);
        assert_eq!(parse_time("2024-11-08T12:00:00"), None);
        assert_eq!(
            parse_time("2024-11-08 12:36:45.258Z"),
            Some(1_731_069_405_258)
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn decoding_and_money() {
        assert_eq!(percent_decode("team%3Dsearch+x"), "team=search x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_encode("a+b/c="), "a%2Bb%2Fc%3D");
        assert_eq!(usd_text(1_500_000_001), "1.500000001");
        assert_eq!(usd_text(-5), "-0.000000005");
    }
}
