//! `/v1/llm/budgets` and `/v1/llm/rate-limits`: spend/token caps and per-minute limits per key, config
//! or organization; `/internal/v1/allowances`: what each filter VM may spend and admit until its next
//! renewal. The decisions (windows, grants, shares) are in `crate::budgets`.

use crate::budgets::{self, Period};
use crate::caller::{check_internal_token, Caller};
use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::util::{new_id, now_ms, parse_json, JsonBody};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What a budget or rate limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Scope {
    /// One API key (`scope_id` = the key's id).
    Key,
    /// Every key of one configuration (`scope_id` = the config id).
    Config,
    /// The whole organization.
    Org,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Config => "config",
            Scope::Org => "org",
        }
    }
    fn parse(s: &str) -> Scope {
        match s {
            "key" => Scope::Key,
            "config" => Scope::Config,
            _ => Scope::Org,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BudgetIn {
    /// Shown in the 429 message and the usage API.
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    scope: Scope,
    /// Key id or config id (not for `org`).
    #[serde(default)]
    scope_id: Option<String>,
    period: Period,
    /// Length of a `fixed` window.
    #[serde(default)]
    #[schema(minimum = 1)]
    window_seconds: Option<u64>,
    /// Start of the first `fixed` window (ms since the epoch; default: now).
    #[serde(default)]
    #[schema(minimum = 0)]
    starts_at_ms: Option<u64>,
    /// Spend cap in USD (list prices of the catalog, as the usage records are costed).
    #[serde(default)]
    #[schema(minimum = 0)]
    max_usd: Option<f64>,
    /// Token cap (prompt + completion).
    #[serde(default)]
    #[schema(minimum = 0)]
    max_tokens: Option<u64>,
    /// Soft: never refuses; past the cap it only alerts (metric, header).
    #[serde(default)]
    soft: bool,
}

/// A budget with its current window and spend.
#[derive(Serialize, ToSchema)]
struct BudgetOut {
    id: String,
    name: String,
    scope: Scope,
    scope_id: String,
    period: Period,
    window_seconds: Option<u64>,
    soft: bool,
    max_usd: Option<f64>,
    max_tokens: Option<u64>,
    window_start: String,
    resets_at: String,
    spent_usd: f64,
    spent_tokens: u64,
    remaining_usd: Option<f64>,
    remaining_tokens: Option<u64>,
    exceeded: bool,
}

#[derive(Serialize, ToSchema)]
struct BudgetsOut {
    data: Vec<BudgetOut>,
}

/// A stored budget row.
#[derive(Clone)]
struct Budget {
    id: String,
    org_id: String,
    name: String,
    scope: Scope,
    scope_id: String,
    period: Period,
    window_seconds: i64,
    starts_at_ms: i64,
    max_nusd: Option<u64>,
    max_tokens: Option<u64>,
    soft: bool,
}

const BUDGET_COLS: &str = "id, org_id, name, scope, scope_id, period, window_seconds, starts_at_ms, max_nusd, max_tokens, soft";

fn budget_row(r: &sqlx::any::AnyRow) -> ApiResult<Budget> {
    let period: String = r.try_get("period")?;
    let scope: String = r.try_get("scope")?;
    let u = |v: Option<i64>| v.map(|x| u64::try_from(x).unwrap_or(0));
    Ok(Budget {
        id: r.try_get("id")?,
        org_id: r.try_get("org_id")?,
        name: r.try_get("name")?,
        scope: Scope::parse(&scope),
        scope_id: r.try_get("scope_id")?,
        period: Period::parse(&period).unwrap_or(Period::Month),
        window_seconds: r.try_get("window_seconds")?,
        starts_at_ms: r.try_get("starts_at_ms")?,
        max_nusd: u(r.try_get("max_nusd")?),
        max_tokens: u(r.try_get("max_tokens")?),
        soft: r.try_get::<i64, _>("soft")? != 0,
    })
}

/// Spend (nano-USD, tokens) of the budget's scope in the window `[start, end)`.
async fn spend(
    conn: &mut AnyConnection,
    b: &Budget,
    start: i64,
    end: i64,
) -> ApiResult<(u64, u64)> {
    let filter = match b.scope {
        Scope::Key => " AND api_key_id = $4",
        Scope::Config => " AND config_id = $4",
        Scope::Org => " AND $4 = $4",
    };
    let q = format!(
        "SELECT CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT) AS c, \
         CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t \
         FROM usage_records WHERE org_id = $1 AND time_ms >= $2 AND time_ms < $3{filter}"
    );
    let row = sqlx::query(&q)
        .bind(&b.org_id)
        .bind(start)
        .bind(end)
        .bind(&b.scope_id)
        .fetch_one(conn)
        .await?;
    let c: i64 = row.try_get("c")?;
    let t: i64 = row.try_get("t")?;
    Ok((u64::try_from(c).unwrap_or(0), u64::try_from(t).unwrap_or(0)))
}

fn usd(nusd: u64) -> f64 {
    nusd as f64 / 1e9
}

async fn budget_out(conn: &mut AnyConnection, b: &Budget, now: i64) -> ApiResult<BudgetOut> {
    let (start, end) = budgets::window(b.period, b.starts_at_ms, b.window_seconds, now);
    let (spent, tokens) = spend(conn, b, start, end).await?;
    let rem_usd = b.max_nusd.map(|m| m.saturating_sub(spent));
    let rem_tok = b.max_tokens.map(|m| m.saturating_sub(tokens));
    Ok(BudgetOut {
        id: b.id.clone(),
        name: b.name.clone(),
        scope: b.scope,
        scope_id: b.scope_id.clone(),
        period: b.period,
        window_seconds: (b.period == Period::Fixed)
            .then(|| u64::try_from(b.window_seconds).unwrap_or(0)),
        soft: b.soft,
        max_usd: b.max_nusd.map(usd),
        max_tokens: b.max_tokens,
        window_start: budgets::rfc3339(start),
        resets_at: budgets::rfc3339(end),
        spent_usd: usd(spent),
        spent_tokens: tokens,
        remaining_usd: rem_usd.map(usd),
        remaining_tokens: rem_tok,
        exceeded: rem_usd == Some(0) || rem_tok == Some(0),
    })
}

async fn org_budgets(conn: &mut AnyConnection, org: &str) -> ApiResult<Vec<Budget>> {
    let q = format!("SELECT {BUDGET_COLS} FROM budgets WHERE org_id = $1 ORDER BY created_at, id");
    sqlx::query(&q)
        .bind(org)
        .fetch_all(conn)
        .await?
        .iter()
        .map(budget_row)
        .collect()
}

/// The caller's budgets with their current spend (also part of `GET /v1/llm/usage`'s answer).
/// Cluster-scoped callers see the organization's and config budgets and their own key's.
pub async fn budgets_with_spend(conn: &mut AnyConnection, caller: &Caller) -> ApiResult<Value> {
    let now = now_ms();
    let mut out = Vec::new();
    for b in org_budgets(conn, &caller.org_id).await? {
        if caller.cluster_id.is_some() && b.scope == Scope::Key && b.scope_id != caller.key_id {
            continue;
        }
        out.push(budget_out(conn, &b, now).await?);
    }
    Ok(serde_json::to_value(out).unwrap_or(Value::Null))
}

#[utoipa::path(
    post,
    path = "/v1/llm/budgets",
    tag = "budgets",
    request_body = BudgetIn,
    responses((status = 201, description = "created", body = BudgetOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn create_budget(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<BudgetIn>,
) -> ApiResult<(StatusCode, Json<BudgetOut>)> {
    caller.require_org()?;
    let name = input.name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(
            ApiError::bad_request("invalid_value", "name must be 1 to 200 characters")
                .with_param("name"),
        );
    }
    let max_nusd = match input.max_usd {
        None => None,
        Some(u) if (0.0..1e9).contains(&u) => Some((u * 1e9).round() as u64),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "max_usd must be a number of USD >= 0",
            )
            .with_param("max_usd"))
        }
    };
    if max_nusd.is_none() && input.max_tokens.is_none() {
        return Err(ApiError::bad_request(
            "invalid_value",
            "set max_usd, max_tokens or both",
        ));
    }
    if input.window_seconds == Some(0) {
        return Err(
            ApiError::bad_request("invalid_value", "window_seconds must be >= 1")
                .with_param("window_seconds"),
        );
    }
    let window_seconds = match (input.period, input.window_seconds) {
        (Period::Fixed, Some(s)) if s >= 1 => i64::try_from(s).unwrap_or(i64::MAX),
        (Period::Fixed, _) => {
            return Err(ApiError::bad_request(
                "invalid_value",
                "a fixed period needs window_seconds >= 1",
            )
            .with_param("window_seconds"))
        }
        _ => 0,
    };
    let mut conn = st.pool.acquire().await?;
    let scope_id = match input.scope {
        Scope::Org => caller.org_id.clone(),
        s => {
            let id = input.scope_id.clone().unwrap_or_default();
            if id.trim().is_empty() {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "scope_id is required for key and config budgets",
                )
                .with_param("scope_id"));
            }
            if s == Scope::Key
                && db::key_by_id(&mut conn, &caller.org_id, &id)
                    .await?
                    .is_none()
            {
                return Err(ApiError::not_found(format!("no API key '{id}'")));
            }
            id
        }
    };
    let now = now_ms();
    let b = Budget {
        id: new_id("bud"),
        org_id: caller.org_id.clone(),
        name,
        scope: input.scope,
        scope_id,
        period: input.period,
        window_seconds,
        starts_at_ms: input
            .starts_at_ms
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX))
            .unwrap_or(now),
        max_nusd,
        max_tokens: input.max_tokens,
        soft: input.soft,
    };
    let opt = |v: Option<u64>| v.map(|x| i64::try_from(x).unwrap_or(i64::MAX));
    {
        let _w = st.write_lock.lock().await;
        sqlx::query(
            "INSERT INTO budgets (id, org_id, name, scope, scope_id, period, window_seconds, starts_at_ms, max_nusd, max_tokens, soft, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&b.id)
        .bind(&b.org_id)
        .bind(&b.name)
        .bind(b.scope.as_str())
        .bind(&b.scope_id)
        .bind(b.period.as_str())
        .bind(b.window_seconds)
        .bind(b.starts_at_ms)
        .bind(opt(b.max_nusd))
        .bind(opt(b.max_tokens))
        .bind(i64::from(b.soft))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(budget_out(&mut conn, &b, now).await?),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/llm/budgets",
    tag = "budgets",
    responses((status = 200, description = "OK", body = BudgetsOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn list_budgets(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<BudgetsOut>> {
    let mut conn = st.pool.acquire().await?;
    let now = now_ms();
    let mut data = Vec::new();
    for b in org_budgets(&mut conn, &caller.org_id).await? {
        // Cluster-scoped callers see their own key's budgets and the organization's.
        if caller.cluster_id.is_some() && b.scope == Scope::Key && b.scope_id != caller.key_id {
            continue;
        }
        data.push(budget_out(&mut conn, &b, now).await?);
    }
    Ok(Json(BudgetsOut { data }))
}

#[utoipa::path(
    delete,
    path = "/v1/llm/budgets/{id}",
    tag = "budgets",
    params(("id" = String, Path, description = "budget id")),
    responses((status = 204, description = "deleted"), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn delete_budget(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_org()?;
    let _w = st.write_lock.lock().await;
    let mut conn = st.pool.acquire().await?;
    let r = sqlx::query("DELETE FROM budgets WHERE org_id = $1 AND id = $2")
        .bind(&caller.org_id)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("no budget '{id}'")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
struct RateLimitIn {
    scope: Scope,
    /// Key id or config id (not for `org`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope_id: Option<String>,
    /// Requests per minute (absent: no request limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    requests_per_minute: Option<u64>,
    /// Prompt + completion tokens per minute (absent: no token limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    tokens_per_minute: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct RateLimitsOut {
    data: Vec<RateLimitIn>,
}

#[utoipa::path(
    put,
    path = "/v1/llm/rate-limits",
    tag = "budgets",
    request_body = RateLimitIn,
    responses((status = 200, description = "OK (both limits absent: removed)", body = RateLimitIn), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn put_rate_limit(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(mut input): JsonBody<RateLimitIn>,
) -> ApiResult<Json<RateLimitIn>> {
    caller.require_org()?;
    if input.requests_per_minute == Some(0) || input.tokens_per_minute == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_value",
            "limits are >= 1 (absent: no limit)",
        ));
    }
    let scope_id = match input.scope {
        Scope::Org => caller.org_id.clone(),
        _ => match input.scope_id.clone().filter(|s| !s.trim().is_empty()) {
            Some(s) => s,
            None => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "scope_id is required for key and config limits",
                )
                .with_param("scope_id"))
            }
        },
    };
    input.scope_id = Some(scope_id.clone());
    let opt = |v: Option<u64>| v.map(|x| i64::try_from(x).unwrap_or(i64::MAX));
    let _w = st.write_lock.lock().await;
    let mut conn = st.pool.acquire().await?;
    sqlx::query("DELETE FROM rate_limits WHERE org_id = $1 AND scope = $2 AND scope_id = $3")
        .bind(&caller.org_id)
        .bind(input.scope.as_str())
        .bind(&scope_id)
        .execute(&mut *conn)
        .await?;
    if input.requests_per_minute.is_some() || input.tokens_per_minute.is_some() {
        sqlx::query("INSERT INTO rate_limits (org_id, scope, scope_id, rpm, tpm, updated_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&caller.org_id)
            .bind(input.scope.as_str())
            .bind(&scope_id)
            .bind(opt(input.requests_per_minute))
            .bind(opt(input.tokens_per_minute))
            .bind(now_ms())
            .execute(&mut *conn)
            .await?;
    }
    Ok(Json(input))
}

#[utoipa::path(
    get,
    path = "/v1/llm/rate-limits",
    tag = "budgets",
    responses((status = 200, description = "OK", body = RateLimitsOut), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
async fn list_rate_limits(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<RateLimitsOut>> {
    let mut conn = st.pool.acquire().await?;
    let rows = sqlx::query("SELECT scope, scope_id, rpm, tpm FROM rate_limits WHERE org_id = $1 ORDER BY scope, scope_id")
        .bind(&caller.org_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut data = Vec::new();
    for r in rows {
        let scope: String = r.try_get("scope")?;
        let rpm: Option<i64> = r.try_get("rpm")?;
        let tpm: Option<i64> = r.try_get("tpm")?;
        data.push(RateLimitIn {
            scope: Scope::parse(&scope),
            scope_id: Some(r.try_get("scope_id")?),
            requests_per_minute: rpm.and_then(|v| u64::try_from(v).ok()),
            tokens_per_minute: tpm.and_then(|v| u64::try_from(v).ok()),
        });
    }
    Ok(Json(RateLimitsOut { data }))
}

/// A stored rate limit: scope, scope id, requests and tokens per minute.
type RateRow = (Scope, String, Option<u64>, Option<u64>);

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AllowanceKey {
    key_id: String,
    org_id: String,
    #[serde(default)]
    config_id: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AllowanceIn {
    /// The filter VM asking (unique per VM and start).
    #[schema(min_length = 1, max_length = 200)]
    holder: String,
    #[schema(max_items = 4096)]
    keys: Vec<AllowanceKey>,
}

/// Filter endpoint (renewed on the filter's tick): for each key, its rate limits (this holder's
/// share) and, per budget, the allowance this holder may spend until the next renewal.
#[utoipa::path(
    post,
    path = "/internal/v1/allowances",
    tag = "internal",
    request_body = AllowanceIn,
    responses((status = 200, description = "OK", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("gatewayToken" = []))
)]
async fn allowances(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    check_internal_token(&st, &headers)?;
    let input: AllowanceIn = parse_json(&body)?;
    if input.holder.is_empty() || input.holder.len() > 200 || input.keys.len() > 4096 {
        return Err(ApiError::bad_request(
            "invalid_value",
            "holder must be 1 to 200 characters, keys at most 4096",
        ));
    }
    let now = now_ms();
    let mut conn = st.pool.acquire().await?;
    // Per organization: active holders, budgets, rate limits (each read once per answer).
    let mut holders: HashMap<String, u64> = HashMap::new();
    let mut org_b: HashMap<String, Vec<Budget>> = HashMap::new();
    let mut org_rl: HashMap<String, Vec<RateRow>> = HashMap::new();
    let mut spent: HashMap<String, (u64, u64, i64, i64)> = HashMap::new();
    let mut out = Vec::new();
    for k in &input.keys {
        if !holders.contains_key(&k.org_id) {
            {
                let _w = st.write_lock.lock().await;
                sqlx::query(
                    "INSERT INTO limit_holders (holder, org_id, seen_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (holder, org_id) DO UPDATE SET seen_ms = excluded.seen_ms",
                )
                .bind(&input.holder)
                .bind(&k.org_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            let n: i64 = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM limit_holders WHERE org_id = $1 AND seen_ms > $2")
                .bind(&k.org_id)
                .bind(now - budgets::HOLDER_ACTIVE_MS)
                .fetch_one(&mut *conn)
                .await?
                .try_get("n")?;
            holders.insert(k.org_id.clone(), u64::try_from(n).unwrap_or(1).max(1));
            org_b.insert(k.org_id.clone(), org_budgets(&mut conn, &k.org_id).await?);
            let rows =
                sqlx::query("SELECT scope, scope_id, rpm, tpm FROM rate_limits WHERE org_id = $1")
                    .bind(&k.org_id)
                    .fetch_all(&mut *conn)
                    .await?;
            let mut rl = Vec::new();
            for r in rows {
                let scope: String = r.try_get("scope")?;
                let rpm: Option<i64> = r.try_get("rpm")?;
                let tpm: Option<i64> = r.try_get("tpm")?;
                rl.push((
                    Scope::parse(&scope),
                    r.try_get::<String, _>("scope_id")?,
                    rpm.and_then(|v| u64::try_from(v).ok()),
                    tpm.and_then(|v| u64::try_from(v).ok()),
                ));
            }
            org_rl.insert(k.org_id.clone(), rl);
        }
        let h = holders.get(&k.org_id).copied().unwrap_or(1);
        let applies = |scope: Scope, id: &str| match scope {
            Scope::Key => id == k.key_id,
            Scope::Config => id == k.config_id,
            Scope::Org => true,
        };
        let (mut rpm, mut tpm): (Option<u64>, Option<u64>) = (None, None);
        for (scope, id, r, t) in org_rl.get(&k.org_id).into_iter().flatten() {
            if applies(*scope, id) {
                rpm = match (rpm, *r) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                tpm = match (tpm, *t) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let mut grants = Vec::new();
        let list = org_b.get(&k.org_id).cloned().unwrap_or_default();
        for b in list.iter().filter(|b| applies(b.scope, &b.scope_id)) {
            let (c, t, start, end) = match spent.get(&b.id) {
                Some(v) => *v,
                None => {
                    let (start, end) =
                        budgets::window(b.period, b.starts_at_ms, b.window_seconds, now);
                    let (c, t) = spend(&mut conn, b, start, end).await?;
                    spent.insert(b.id.clone(), (c, t, start, end));
                    (c, t, start, end)
                }
            };
            let g = |cap: Option<u64>, used: u64| {
                cap.map(|cap| {
                    if b.soft {
                        cap.saturating_sub(used)
                    } else {
                        budgets::grant(cap, used, h, budgets::default_floor(cap))
                    }
                })
            };
            let exhausted =
                b.max_nusd.is_some_and(|m| c >= m) || b.max_tokens.is_some_and(|m| t >= m);
            grants.push(json!({
                "id": b.id,
                "name": b.name,
                "scope": b.scope.as_str(),
                "soft": b.soft,
                "windowStartMs": start,
                "resetsAtMs": end,
                "resetsAt": budgets::rfc3339(end),
                "maxNanoUsd": b.max_nusd,
                "maxTokens": b.max_tokens,
                "remainingNanoUsd": b.max_nusd.map(|m| m.saturating_sub(c)),
                "remainingTokens": b.max_tokens.map(|m| m.saturating_sub(t)),
                "grantNanoUsd": g(b.max_nusd, c),
                "grantTokens": g(b.max_tokens, t),
                "exhausted": exhausted,
            }));
        }
        out.push(json!({
            "keyId": k.key_id,
            "holders": h,
            "requestsPerMinute": rpm,
            "tokensPerMinute": tpm,
            "requestsShare": rpm.map(|r| budgets::share(r, h)),
            "tokensShare": tpm.map(|t| budgets::share(t, h)),
            "budgets": grants,
        }));
    }
    Ok(Json(json!({
        "leaseSeconds": budgets::lease_seconds(),
        "keys": out,
    })))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_budget, list_budgets))
        .routes(routes!(delete_budget))
        .routes(routes!(put_rate_limit, list_rate_limits))
}

/// The filter's endpoint (internal listener).
pub fn internal_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(allowances))
}
