//! The savings report: one self-contained HTML page (inline CSS, server-rendered inline SVG charts, no
//! script, nothing fetched) at `GET /v1/llm/report`.
//!
//! Authentication: the gateway API key in `X-API-Key` / `Authorization: Bearer` (scripts, curl), or a
//! short-lived signed link from `POST /v1/llm/report/link` (`?token=`) for browsers. API keys are never
//! accepted in the URL: URLs end up in browser history, proxy logs and `Referer` headers.

use super::usage::{self, aggregate, query_pairs, usd, Dim, Filter, Group, Sums};
use crate::caller::{presented_key, Caller};
use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::util::{now_ms, parse_json, rfc3339};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use llm_gateway::config::hash_key;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt::Write as _;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const LINK_AAD: &str = "report-link:v1";
const DEFAULT_LINK_TTL: u64 = 900;
const MAX_LINK_TTL: u64 = 86_400;
const DAY_MS: i64 = 86_400_000;

// ----------------------------------------------------------------------------------------------
// Signed links.
// ----------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct LinkClaims {
    /// Key id the link was made with (revoking the key kills its links).
    k: String,
    o: String,
    /// Expiry, Unix ms.
    e: i64,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LinkIn {
    #[serde(default, alias = "ttl_seconds")]
    ttl_seconds: Option<u64>,
}

fn to_url_token(sealed: &str) -> String {
    sealed
        .trim_start_matches("v1:")
        .replace('+', "-")
        .replace('/', "_")
        .trim_end_matches('=')
        .to_string()
}

fn from_url_token(t: &str) -> String {
    let mut b = t.replace('-', "+").replace('_', "/");
    while !b.len().is_multiple_of(4) {
        b.push('=');
    }
    format!("v1:{b}")
}

/// `POST /v1/llm/report/link`: a signed report URL valid `ttlSeconds` (default 900, max 86400).
#[utoipa::path(
    post,
    path = "/v1/llm/report/link",
    tag = "report",
    request_body = LinkIn,
    responses((status = 201, description = "created", body = serde_json::Value), (status = "4XX", description = "error (see the code)", body = crate::error::ErrorBody), (status = "5XX", description = "server or database error", body = crate::error::ErrorBody)),
    security(("apiKey" = []), ("bearer" = []))
)]
pub async fn create_link(
    State(st): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let input: LinkIn = if body.iter().all(u8::is_ascii_whitespace) {
        LinkIn::default()
    } else {
        parse_json(&body)?
    };
    let ttl = input.ttl_seconds.unwrap_or(DEFAULT_LINK_TTL);
    if ttl == 0 || ttl > MAX_LINK_TTL {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("ttlSeconds must be 1-{MAX_LINK_TTL}"),
        )
        .with_param("ttlSeconds"));
    }
    let exp = now_ms() + i64::try_from(ttl).unwrap_or(0) * 1000;
    let claims = serde_json::to_string(&LinkClaims {
        k: caller.key_id.clone(),
        o: caller.org_id.clone(),
        e: exp,
    })
    .map_err(ApiError::internal)?;
    let sealed = st
        .vault
        .seal(&claims, LINK_AAD)
        .map_err(ApiError::internal)?;
    let token = to_url_token(&sealed);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "url": format!("/v1/llm/report?token={token}"),
            "token": token,
            "expiresAt": rfc3339(exp),
        })),
    ))
}

async fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
) -> ApiResult<Caller> {
    let mut conn = st.pool.acquire().await?;
    if let Some(t) = token {
        let bad = || ApiError::unauthorized("invalid or expired report link; create a new one");
        let claims = st
            .vault
            .open(&from_url_token(t), LINK_AAD)
            .map_err(|_| bad())?;
        let c: LinkClaims = serde_json::from_str(&claims).map_err(|_| bad())?;
        if c.e <= now_ms() {
            return Err(bad());
        }
        let k = db::key_by_id(&mut conn, &c.o, &c.k)
            .await?
            .filter(|k| k.revoked_at.is_none())
            .ok_or_else(bad)?;
        return Ok(Caller {
            org_id: k.org_id,
            key_id: k.id,
            cluster_id: k.cluster_id,
        });
    }
    let key = presented_key(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "send the API key in X-API-Key / Authorization: Bearer, or open a link from POST /v1/llm/report/link",
        )
    })?;
    let k = db::active_key_by_hash(&mut conn, &hash_key(&key))
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
    Ok(Caller {
        org_id: k.org_id,
        key_id: k.id,
        cluster_id: k.cluster_id,
    })
}

// ----------------------------------------------------------------------------------------------
// Formatting.
// ----------------------------------------------------------------------------------------------

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `1234567` -> `1,234,567`.
pub fn fmt_int(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// USD: 2 decimals from $1 up, 4 below (LLM bills are often fractions of a cent per request).
pub fn fmt_usd(nusd: i64) -> String {
    let v = usd(nusd).abs();
    let sign = if nusd < 0 { "-" } else { "" };
    if v >= 1.0 {
        let cents = (v * 100.0).round() as i64;
        format!("{sign}${}.{:02}", fmt_int(cents / 100), cents % 100)
    } else {
        format!("{sign}${v:.4}")
    }
}

fn fmt_compact(n: i64) -> String {
    let v = n as f64;
    if v.abs() >= 1e9 {
        format!("{:.1}B", v / 1e9)
    } else if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        fmt_int(n)
    }
}

fn month_day(day: &str) -> String {
    const M: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m: usize = day.get(5..7).and_then(|x| x.parse().ok()).unwrap_or(1);
    let d: u32 = day.get(8..10).and_then(|x| x.parse().ok()).unwrap_or(1);
    format!("{} {d}", M.get(m.saturating_sub(1)).copied().unwrap_or("?"))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// A "nice" axis: (step, top) with top >= max and ~4 steps.
fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (0.25, 1.0);
    }
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    (step, top.max(step))
}

fn axis_usd(v: f64, step: f64) -> String {
    // The fewest decimals that show the step exactly (0.25 -> 2, 0.1 -> 1, 5 -> 0).
    let decimals = (0..=8usize)
        .find(|d| {
            let x = step * 10f64.powi(*d as i32);
            (x - x.round()).abs() < 1e-6 * x.max(1.0)
        })
        .unwrap_or(8);
    if v >= 1000.0 {
        format!("${}", fmt_int(v.round() as i64))
    } else {
        format!("${v:.decimals$}")
    }
}

// ----------------------------------------------------------------------------------------------
// Charts (inline SVG).
// ----------------------------------------------------------------------------------------------

const C_ACTUAL: &str = "#4f46e5";
const C_LIST: &str = "#c7d2fe";
const C_MUTED: &str = "#6b7280";
const C_GRID: &str = "#e5e7eb";

/// Daily cost: list-price bars (light) behind actual-cost bars (solid); the gap is the savings.
fn daily_chart(days: &[String], by_day: &[(String, Sums)]) -> String {
    let (w, h) = (1040.0, 300.0);
    let (ml, mr, mt, mb) = (78.0, 16.0, 16.0, 56.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let get = |d: &str| by_day.iter().find(|(k, _)| k == d).map(|(_, s)| s);
    let max = days
        .iter()
        .filter_map(|d| get(d))
        .map(|s| usd(s.list_cost_nusd.max(s.cost_nusd)))
        .fold(0.0, f64::max);
    let (step, top) = nice_axis(max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="Daily cost as routed and at list price">"#
    );
    // Grid and y labels.
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let y = mt + ph - v / top * ph;
        let _ = write!(
            s,
            r#"<line x1="{ml}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{C_GRID}"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"#,
            ml + pw,
            ml - 8.0,
            y + 4.0,
            axis_usd(v, step)
        );
        v += step;
    }
    let n = days.len().max(1) as f64;
    let slot = pw / n;
    let label_every = ((days.len() as f64) / 10.0).ceil().max(1.0) as usize;
    for (i, d) in days.iter().enumerate() {
        let x0 = ml + slot * i as f64;
        if let Some(sm) = get(d) {
            let lh = usd(sm.list_cost_nusd) / top * ph;
            let ah = usd(sm.cost_nusd) / top * ph;
            let bw = (slot * 0.72).max(1.0);
            let aw = (slot * 0.44).max(1.0);
            let _ = write!(
                s,
                r#"<g><title>{} — actual {} · list price {} · {} requests</title><rect x="{:.1}" y="{:.1}" width="{bw:.1}" height="{lh:.1}" rx="2" fill="{C_LIST}"/><rect x="{:.1}" y="{:.1}" width="{aw:.1}" height="{ah:.1}" rx="2" fill="{C_ACTUAL}"/></g>"#,
                esc(d),
                fmt_usd(sm.cost_nusd),
                fmt_usd(sm.list_cost_nusd),
                fmt_int(sm.requests),
                x0 + (slot - bw) / 2.0,
                mt + ph - lh,
                x0 + (slot - aw) / 2.0,
                mt + ph - ah,
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
                x0 + slot / 2.0,
                mt + ph + 18.0,
                month_day(d)
            );
        }
    }
    let _ = write!(
        s,
        r#"<line x1="{ml}" x2="{}" y1="{}" y2="{}" stroke="{C_MUTED}"/>"#,
        ml + pw,
        mt + ph,
        mt + ph
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" class="axis">Date (UTC)</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle" class="axis">Cost per day (USD)</text></svg>"#,
        ml + pw / 2.0,
        h - 10.0,
        mt + ph / 2.0
    );
    s
}

/// Horizontal bars: actual cost (solid) over list price (light) per row.
fn bar_chart(rows: &[(String, Sums)], aria: &str) -> String {
    let w = 500.0;
    let (ml, mr, mt) = (176.0, 70.0, 8.0);
    let row_h = 30.0;
    let h = mt + row_h * rows.len() as f64 + 44.0;
    let pw = w - ml - mr;
    let max = rows
        .iter()
        .map(|(_, s)| usd(s.list_cost_nusd.max(s.cost_nusd)))
        .fold(0.0, f64::max);
    let (step, top) = nice_axis(max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        esc(aria)
    );
    let base = mt + row_h * rows.len() as f64;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let x = ml + v / top * pw;
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{mt}" y2="{base}" stroke="{C_GRID}"/><text x="{x:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
            base + 16.0,
            axis_usd(v, step)
        );
        v += step;
    }
    for (i, (label, sm)) in rows.iter().enumerate() {
        let y = mt + row_h * i as f64;
        let lw = usd(sm.list_cost_nusd) / top * pw;
        let aw = usd(sm.cost_nusd) / top * pw;
        let _ = write!(
            s,
            r#"<g><title>{} — actual {} · list price {} · {} requests</title><text x="{}" y="{:.1}" text-anchor="end" class="label">{}</text><rect x="{ml}" y="{:.1}" width="{lw:.1}" height="18" rx="3" fill="{C_LIST}"/><rect x="{ml}" y="{:.1}" width="{aw:.1}" height="10" rx="2" fill="{C_ACTUAL}"/><text x="{:.1}" y="{:.1}" class="value">{}</text></g>"#,
            esc(label),
            fmt_usd(sm.cost_nusd),
            fmt_usd(sm.list_cost_nusd),
            fmt_int(sm.requests),
            ml - 8.0,
            y + 15.0,
            esc(&truncate(label, 24)),
            y + 2.0,
            y + 6.0,
            ml + lw.max(aw) + 6.0,
            y + 15.0,
            fmt_usd(sm.cost_nusd),
        );
    }
    let _ = write!(
        s,
        r#"<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{base}" stroke="{C_MUTED}"/><text x="{}" y="{}" text-anchor="middle" class="axis">Cost (USD)</text></svg>"#,
        ml + pw / 2.0,
        h - 6.0
    );
    s
}

/// The top `n` groups by cost plus an "other" row.
fn top_n(groups: &[Group], n: usize) -> Vec<(String, Sums)> {
    let mut rows: Vec<(String, Sums)> = groups
        .iter()
        .map(|g| {
            (
                g.key
                    .first()
                    .cloned()
                    .flatten()
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(|| "(none)".to_string()),
                g.sums.clone(),
            )
        })
        .collect();
    rows.sort_by(|a, b| {
        b.1.list_cost_nusd
            .max(b.1.cost_nusd)
            .cmp(&a.1.list_cost_nusd.max(a.1.cost_nusd))
            .then(b.1.requests.cmp(&a.1.requests))
    });
    if rows.len() > n {
        let mut other = Sums::default();
        for (_, s) in rows.drain(n - 1..) {
            other.add(&s);
        }
        rows.push(("other".to_string(), other));
    }
    rows
}

// ----------------------------------------------------------------------------------------------
// The page.
// ----------------------------------------------------------------------------------------------

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;background:#f5f6fa;color:#1f2937;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","Liberation Sans",sans-serif;-webkit-font-smoothing:antialiased}
.wrap{max-width:1120px;margin:0 auto;padding:32px 28px 48px}
header{display:flex;justify-content:space-between;align-items:flex-end;gap:16px;flex-wrap:wrap;margin-bottom:22px}
h1{font-size:26px;line-height:1.2;margin:0 0 4px;letter-spacing:-.01em}
.sub{color:#6b7280;font-size:14px}
.ranges a{display:inline-block;padding:5px 12px;margin-left:4px;border-radius:999px;color:#4338ca;background:#eef2ff;text-decoration:none;font-size:13px;font-weight:600}
.ranges a.on{background:#4f46e5;color:#fff}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:14px;margin-bottom:18px}
.card{background:#fff;border-radius:14px;padding:16px 18px;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.08)}
.card .k{color:#6b7280;font-size:12px;font-weight:600;text-transform:uppercase;letter-spacing:.05em}
.card .v{font-size:26px;font-weight:700;margin-top:4px;font-variant-numeric:tabular-nums;letter-spacing:-.01em}
.card .d{color:#6b7280;font-size:13px;margin-top:2px}
.card.save{background:linear-gradient(135deg,#ecfdf5,#fff);}
.card.save .v{color:#047857}
.panel{background:#fff;border-radius:14px;padding:18px 20px 14px;margin-bottom:18px;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.08)}
.panel h2{font-size:16px;margin:0 0 2px}
.panel .hint{color:#6b7280;font-size:13px;margin:0 0 10px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.grid2 .panel{margin-bottom:0}
.legend{display:flex;gap:16px;font-size:13px;color:#374151;margin:0 0 6px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:6px;vertical-align:-1px}
svg.chart{width:100%;height:auto;display:block}
svg .tick{font-size:11px;fill:#6b7280}
svg .axis{font-size:12px;fill:#374151;font-weight:600}
svg .label{font-size:11.5px;fill:#1f2937}
svg .value{font-size:12px;fill:#374151;font-variant-numeric:tabular-nums}
table{width:100%;border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}
th{text-align:left;color:#6b7280;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em;padding:8px 10px;border-bottom:1px solid #e5e7eb}
td{padding:9px 10px;border-bottom:1px solid #f0f1f4}
td.n,th.n{text-align:right}
td.pos{color:#047857;font-weight:600}
td.neg{color:#b91c1c;font-weight:600}
.bar{display:inline-block;height:8px;border-radius:4px;background:#10b981;vertical-align:middle;margin-left:8px}
.empty{text-align:center;padding:56px 20px}
.empty h2{font-size:20px;margin:0 0 8px}
.empty p{color:#6b7280;margin:0 auto;max-width:560px}
.empty code{background:#f3f4f6;padding:2px 6px;border-radius:6px;font-size:13px}
footer{color:#6b7280;font-size:12.5px;margin-top:8px;line-height:1.6}
"#;

struct Page {
    title: String,
    org: String,
    from: i64,
    to: i64,
    days: Vec<String>,
    totals: Sums,
    by_day: Vec<(String, Sums)>,
    by_provider: Vec<(String, Sums)>,
    by_model: Vec<(String, Sums)>,
    savings: Vec<(String, String, Sums)>,
    catalog: String,
    range_links: String,
    /// The caller's budgets with their current window's spend (`routes::budgets`).
    budgets: Vec<serde_json::Value>,
}

fn card(class: &str, key: &str, metric: &str, value: &str, detail: &str) -> String {
    format!(
        r#"<div class="card {class}"><div class="k">{key}</div><div class="v" data-metric="{metric}">{value}</div><div class="d">{detail}</div></div>"#
    )
}

/// Budgets: spend of the current window against the cap (USD and/or tokens), reset time, state.
fn render_budgets(h: &mut String, budgets: &[serde_json::Value]) {
    if budgets.is_empty() {
        return;
    }
    h.push_str(r#"<section class="panel" style="margin-top:18px" data-section="budgets"><h2>Budgets</h2><p class="hint">Spend of the current window (list-price cost as in the records) against each budget's cap.</p><table><thead><tr><th>Budget</th><th>Applies to</th><th class="n">Spent</th><th class="n">Cap</th><th>Resets</th><th>State</th></tr></thead><tbody>"#);
    let text = |b: &serde_json::Value, k: &str| {
        b.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
    };
    let nusd = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.as_f64()).map(|u| (u * 1e9).round() as i64)
    };
    for b in budgets {
        let spent_usd = nusd(b.get("spent_usd")).unwrap_or(0);
        let spent_tok = b.get("spent_tokens").and_then(|v| v.as_i64()).unwrap_or(0);
        let mut spent = Vec::new();
        let mut cap = Vec::new();
        if let Some(m) = nusd(b.get("max_usd")) {
            spent.push(fmt_usd(spent_usd));
            cap.push(fmt_usd(m));
        }
        if let Some(m) = b.get("max_tokens").and_then(|v| v.as_i64()) {
            spent.push(format!("{} tokens", fmt_int(spent_tok)));
            cap.push(format!("{} tokens", fmt_int(m)));
        }
        let soft = b.get("soft").and_then(|v| v.as_bool()).unwrap_or(false);
        let exceeded = b.get("exceeded").and_then(|v| v.as_bool()).unwrap_or(false);
        let state = match (exceeded, soft) {
            (true, true) => r#"<span class="neg">over (soft: alert only)</span>"#,
            (true, false) => r#"<span class="neg">used up: requests refused</span>"#,
            (false, _) => "within budget",
        };
        let scope = match text(b, "scope").as_str() {
            "org" => "organization".to_string(),
            other => format!("{other} {}", text(b, "scope_id")),
        };
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td>{state}</td></tr>"#,
            esc(&text(b, "name")),
            esc(&scope),
            esc(&spent.join(" · ")),
            esc(&cap.join(" · ")),
            esc(&text(b, "resets_at")),
        );
    }
    h.push_str("</tbody></table></section>");
}

fn render(p: &Page) -> String {
    let t = &p.totals;
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><meta name="referrer" content="no-referrer"><title>{}</title><style>{CSS}</style></head><body><div class="wrap">"#,
        esc(&p.title)
    );
    let last_day = rfc3339(p.to - 1);
    let _ = write!(
        h,
        r#"<header><div><h1>LLM usage &amp; savings</h1><div class="sub">{} · {} – {} (UTC) · {} days</div></div><nav class="ranges">{}</nav></header>"#,
        esc(&p.org),
        esc(&rfc3339(p.from)[..10]),
        esc(&last_day[..10]),
        p.days.len(),
        p.range_links
    );
    let tokens = t.prompt_tokens + t.completion_tokens;
    h.push_str(r#"<section class="cards">"#);
    h.push_str(&card(
        "",
        "Requests",
        "requests",
        &fmt_int(t.requests),
        &format!(
            "{} errors · {} fallbacks",
            fmt_int(t.errors),
            fmt_int(t.fallbacks)
        ),
    ));
    h.push_str(&card(
        "",
        "Tokens",
        "tokens",
        &fmt_int(tokens),
        &format!(
            "{} in · {} out",
            fmt_compact(t.prompt_tokens),
            fmt_compact(t.completion_tokens)
        ),
    ));
    h.push_str(&card(
        "",
        "Cost as routed",
        "cost",
        &fmt_usd(t.cost_nusd),
        "what the traffic cost",
    ));
    h.push_str(&card(
        "",
        "At list price",
        "list-cost",
        &fmt_usd(t.list_cost_nusd),
        "of the models asked for",
    ));
    h.push_str(&card(
        "save",
        "Savings",
        "savings",
        &fmt_usd(t.savings_nusd()),
        &format!(
            r#"<span data-metric="savings-pct">{:.1}%</span> of list price"#,
            t.savings_pct()
        ),
    ));
    h.push_str("</section>");

    if t.requests == 0 {
        h.push_str(r#"<section class="panel empty" data-empty="1"><h2>No usage in this period</h2><p>Requests made through the gateway appear here within seconds of the filter reporting them. Send a chat completion with one of your API keys, or pick a longer range above.</p></section>"#);
    } else {
        let _ = write!(
            h,
            r#"<section class="panel"><h2>Cost over time</h2><p class="hint">Daily cost as routed against what the same tokens would have cost at the list price of the model each client asked for.</p><div class="legend"><span><i style="background:{C_ACTUAL}"></i>Actual cost</span><span><i style="background:{C_LIST}"></i>List price of requested model</span></div>{}</section>"#,
            daily_chart(&p.days, &p.by_day)
        );
        let _ = write!(
            h,
            r#"<div class="grid2"><section class="panel"><h2>By provider</h2><p class="hint">Actual cost (solid) and list price (light).</p>{}</section><section class="panel"><h2>By model</h2><p class="hint">Model that served the request.</p>{}</section></div>"#,
            bar_chart(&p.by_provider, "Cost by provider"),
            bar_chart(&p.by_model, "Cost by model")
        );
        h.push_str(r#"<section class="panel" style="margin-top:18px"><h2>Where the savings come from</h2><p class="hint">Model the client asked for, the model that actually served it, and the difference in cost.</p><table><thead><tr><th>Requested</th><th>Served by</th><th class="n">Requests</th><th class="n">Tokens</th><th class="n">List price</th><th class="n">Actual</th><th class="n">Savings</th></tr></thead><tbody>"#);
        let max_pct = 100.0;
        for (req, used, s) in &p.savings {
            let sv = s.savings_nusd();
            let class = match sv.cmp(&0) {
                std::cmp::Ordering::Greater => "pos",
                std::cmp::Ordering::Less => "neg",
                std::cmp::Ordering::Equal => "",
            };
            let pct = s.savings_pct();
            let bar = if pct > 0.0 {
                format!(
                    r#"<span class="bar" style="width:{:.0}px"></span>"#,
                    (pct / max_pct * 60.0).clamp(2.0, 60.0)
                )
            } else {
                String::new()
            };
            let _ = write!(
                h,
                r#"<tr><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n {class}">{}{bar}</td></tr>"#,
                esc(req),
                esc(used),
                fmt_int(s.requests),
                fmt_compact(s.prompt_tokens + s.completion_tokens),
                fmt_usd(s.list_cost_nusd),
                fmt_usd(s.cost_nusd),
                if sv == 0 {
                    "—".to_string()
                } else {
                    format!("{} ({pct:.0}%)", fmt_usd(sv))
                },
            );
        }
        h.push_str("</tbody></table></section>");
    }
    render_budgets(&mut h, &p.budgets);
    let _ = write!(
        h,
        r#"<footer>Prices: catalog {} (USD per 1M tokens, list prices) unless a provider registration overrides them; hosted models are priced at their hourly price divided by their token throughput. {} requests had no known price and count as $0; {} used estimated token counts. Generated {}.</footer></div></body></html>"#,
        esc(&p.catalog),
        fmt_int(t.unpriced),
        fmt_int(t.estimated),
        esc(&rfc3339(now_ms())[..16].replace('T', " ")),
    );
    h
}

fn error_page(e: &ApiError) -> Response {
    let body = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Report unavailable</title><style>{CSS}</style></head><body><div class="wrap"><section class="panel empty"><h2>Report unavailable</h2><p>{}</p></section></div></body></html>"#,
        esc(&e.message)
    );
    (
        e.status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `GET /v1/llm/report`.
#[utoipa::path(
    get,
    path = "/v1/llm/report",
    tag = "report",
    params(
        usage::FilterParams,
        ("token" = Option<String>, Query, description = "signed link token from POST /v1/llm/report/link")
    ),
    responses(
        (status = 200, description = "the HTML report", content_type = "text/html", body = String),
        (status = "4XX", description = "error page", content_type = "text/html", body = String),
        (status = "5XX", description = "error page", content_type = "text/html", body = String)
    ),
    security(("apiKey" = []), ("bearer" = []))
)]
pub async fn report(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    match build(&st, &headers, &uri).await {
        Ok(html) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
        Err(e) => error_page(&e),
    }
}

async fn build(st: &AppState, headers: &HeaderMap, uri: &Uri) -> ApiResult<String> {
    let pairs = query_pairs(uri);
    if pairs.iter().any(|(k, _)| k == "key" || k == "api_key") {
        return Err(ApiError::bad_request(
            "invalid_value",
            "API keys are not accepted in the URL; use a signed link from POST /v1/llm/report/link",
        ));
    }
    let token = pairs
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone());
    let caller = authenticate(st, headers, token.as_deref()).await?;
    let q = usage::parse_query(&pairs, &["token", "days"])?;
    let days_param = match pairs.iter().find(|(k, _)| k == "days") {
        Some((_, v)) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|d| (1..=366).contains(d))
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_value", "days must be 1-366").with_param("days")
                })?,
        ),
        None => None,
    };
    let mut f: Filter = q.filter.clone();
    // The range: whole UTC days; default the last 30 days including today.
    let explicit = pairs.iter().any(|(k, _)| k == "from" || k == "to");
    if !explicit || days_param.is_some() {
        let days = days_param.unwrap_or(30);
        let to = (now_ms().div_euclid(DAY_MS) + 1) * DAY_MS;
        f.to = to;
        f.from = to - days * DAY_MS;
    } else {
        if f.to == i64::MAX {
            f.to = (now_ms().div_euclid(DAY_MS) + 1) * DAY_MS;
        }
        f.from = f.from.div_euclid(DAY_MS) * DAY_MS;
        if f.to - f.from > 366 * DAY_MS {
            f.from = f.to - 366 * DAY_MS;
        }
    }
    let mut conn = st.pool.acquire().await?;
    let key_of = |g: &Group, i: usize| g.key.get(i).cloned().flatten().unwrap_or_default();
    let mut totals = Sums::default();
    let by_day: Vec<(String, Sums)> = aggregate(&mut conn, &caller, &f, &[Dim::Day])
        .await?
        .iter()
        .map(|g| {
            totals.add(&g.sums);
            (key_of(g, 0), g.sums.clone())
        })
        .collect();
    let by_provider = top_n(
        &aggregate(&mut conn, &caller, &f, &[Dim::Provider]).await?,
        8,
    );
    let by_model = top_n(&aggregate(&mut conn, &caller, &f, &[Dim::Model]).await?, 8);
    let mut savings: Vec<(String, String, Sums)> =
        aggregate(&mut conn, &caller, &f, &[Dim::ModelRequested, Dim::Model])
            .await?
            .iter()
            .map(|g| (key_of(g, 0), key_of(g, 1), g.sums.clone()))
            .collect();
    savings.sort_by(|a, b| {
        b.2.savings_nusd()
            .cmp(&a.2.savings_nusd())
            .then(b.2.requests.cmp(&a.2.requests))
    });
    savings.truncate(15);
    let org = sqlx::query("SELECT name FROM organizations WHERE id = $1")
        .bind(&caller.org_id)
        .fetch_optional(&mut *conn)
        .await?
        .and_then(|r| sqlx::Row::try_get::<String, _>(&r, "name").ok())
        .unwrap_or_else(|| caller.org_id.clone());
    let org = match &caller.cluster_id {
        Some(c) => format!("{org} · cluster {c}"),
        None => org,
    };
    let mut days = Vec::new();
    let mut d = f.from.div_euclid(DAY_MS) * DAY_MS;
    while d < f.to && days.len() < 400 {
        days.push(rfc3339(d)[..10].to_string());
        d += DAY_MS;
    }
    let current_days = days_param.unwrap_or(if explicit { 0 } else { 30 });
    let tok = token
        .as_deref()
        .map(|t| format!("token={}&", usage::percent_encode(t)))
        .unwrap_or_default();
    let range_links = [7, 30, 90]
        .iter()
        .map(|n| {
            format!(
                r#"<a href="?{tok}days={n}"{}>{n} days</a>"#,
                if *n == current_days {
                    r#" class="on""#
                } else {
                    ""
                }
            )
        })
        .collect::<String>();
    let page = Page {
        title: "LLM usage & savings".to_string(),
        org,
        from: f.from,
        to: f.to,
        days,
        totals,
        by_day,
        by_provider,
        by_model,
        savings,
        catalog: {
            let catalogs = st.catalogs();
            format!(
                "{} ({})",
                catalogs.pricing.catalog.version, catalogs.pricing.catalog.date
            )
        },
        range_links,
        budgets: match super::budgets::budgets_with_spend(&mut conn, &caller).await? {
            serde_json::Value::Array(a) => a,
            _ => Vec::new(),
        },
    };
    Ok(render(&page))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(report))
        .routes(routes!(create_link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(fmt_int(1_234_567), "1,234,567");
        assert_eq!(fmt_int(12), "12");
        assert_eq!(fmt_usd(1_234_560_000_000), "$1,234.56");
        assert_eq!(fmt_usd(12_345_678), "$0.0123");
        assert_eq!(fmt_usd(-2_000_000_000), "-$2.00");
        assert_eq!(nice_axis(0.37), (0.1, 0.4));
        assert_eq!(nice_axis(0.0), (0.25, 1.0));
        assert_eq!(from_url_token(&to_url_token("v1:ab+/cQ==")), "v1:ab+/cQ==");
    }
}
