//! Budgets and rate limits in the filter (pure: no host calls). Each worker VM is a *holder*: the
//! sidecar grants it, per budget, an allowance it may spend until its next renewal (on the 1 s tick,
//! one callout per VM for all its active keys, never per request), and its share of each per-minute
//! limit (`ceil(limit / holders)`, enforced by a token bucket). Spend and tokens count when a request
//! ends (a stream is never cut by a budget; the next request is refused). See docs/operations.md,
//! "Budgets and rate limits", for the bounds.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::error::GatewayError;
use crate::read::{Obj, Res};
use crate::translate::obj;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The sidecar's allowance endpoint.
pub const ALLOWANCE_PATH: &str = "/internal/v1/allowances";
/// Keys a VM tracks (beyond it, idle keys are dropped; a key that cannot be tracked is not limited
/// until it can).
pub const MAX_KEYS: usize = 4096;
/// A key unused this long is no longer renewed.
pub const IDLE_MS: u64 = 60_000;
/// How often allowances are renewed: on every tick (1 s); the wait after an answer is shorter than
/// the tick so that a tick is never skipped.
pub const RENEW_MS: u64 = 500;

/// One budget's allowance for this holder, as the sidecar grants it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Grant {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub soft: bool,
    pub resets_at_ms: u64,
    pub resets_at: String,
    pub remaining_nano_usd: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub grant_nano_usd: Option<u64>,
    pub grant_tokens: Option<u64>,
    pub exhausted: bool,
    pub max_nano_usd: Option<u64>,
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
struct KeyAnswer {
    key_id: String,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    requests_share: Option<u64>,
    tokens_share: Option<u64>,
    budgets: Vec<Grant>,
}

/// A key's answer as one VM shares it with the other workers of its Envoy (shared data), so that
/// their first request of the key needs no callout.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
struct SharedAnswer {
    at: u64,
    lease_ms: u64,
    key: KeyAnswer,
}

/// A VM shares a key's answer at most this often.
const SHARE_EVERY_MS: u64 = 10_000;

/// Shared-data key of a key's answer.
pub fn shared_key(key_id: &str) -> String {
    format!("llmgw.limits.{key_id}")
}

/// The sidecar's answer to a renewal (`leaseSeconds`, `keys`).
#[derive(Debug, Default)]
struct Answer {
    lease_seconds: u64,
    keys: Vec<KeyAnswer>,
}

// Readers for the filter (see `crate::read`): every field defaults, unknown fields are ignored, as
// in the derives.

impl Grant {
    fn read(v: &Value, at: &str) -> Res<Grant> {
        let o = Obj::new(v, at, None)?;
        let n = |name: &str| o.opt_uint(&[name], u64::MAX);
        o.finish(Grant {
            id: o.string_or(&["id"], ""),
            name: o.string_or(&["name"], ""),
            scope: o.string_or(&["scope"], ""),
            soft: o.bool_or(&["soft"], false),
            resets_at_ms: o.uint_or(&["resetsAtMs"], u64::MAX, 0),
            resets_at: o.string_or(&["resetsAt"], ""),
            remaining_nano_usd: n("remainingNanoUsd"),
            remaining_tokens: n("remainingTokens"),
            grant_nano_usd: n("grantNanoUsd"),
            grant_tokens: n("grantTokens"),
            exhausted: o.bool_or(&["exhausted"], false),
            max_nano_usd: n("maxNanoUsd"),
            max_tokens: n("maxTokens"),
        })
    }
}

impl KeyAnswer {
    fn read(v: &Value, at: &str) -> Res<KeyAnswer> {
        let o = Obj::new(v, at, None)?;
        let n = |name: &str| o.opt_uint(&[name], u64::MAX);
        o.finish(KeyAnswer {
            key_id: o.string_or(&["keyId"], ""),
            requests_per_minute: n("requestsPerMinute"),
            tokens_per_minute: n("tokensPerMinute"),
            requests_share: n("requestsShare"),
            tokens_share: n("tokensShare"),
            budgets: o.list(&["budgets"], Grant::read),
        })
    }
}

impl SharedAnswer {
    fn parse(body: &[u8]) -> Res<SharedAnswer> {
        crate::read::document(body, |o| {
            Ok(SharedAnswer {
                at: o.uint_or(&["at"], u64::MAX, 0),
                lease_ms: o.uint_or(&["leaseMs"], u64::MAX, 0),
                key: o.with_or_default(&["key"], KeyAnswer::read),
            })
        })
    }
}

impl Answer {
    fn parse(body: &[u8]) -> Res<Answer> {
        crate::read::document(body, |o| {
            Ok(Answer {
                lease_seconds: o.uint_or(&["leaseSeconds"], u64::MAX, 0),
                keys: o.list(&["keys"], KeyAnswer::read),
            })
        })
    }
}

/// A per-minute limit: token bucket of `share` (this holder's part), refilled over a minute.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// The configured limit (what the `x-ratelimit-limit-*` header says).
    pub limit: u64,
    capacity: f64,
    level: f64,
    last_ms: u64,
}

impl Bucket {
    pub fn new(limit: u64, share: u64, now: u64) -> Self {
        let capacity = share.max(1) as f64;
        Bucket {
            limit,
            capacity,
            level: capacity,
            last_ms: now,
        }
    }

    fn per_ms(&self) -> f64 {
        self.capacity / 60_000.0
    }

    fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last_ms) as f64;
        self.level = (self.level + dt * self.per_ms()).min(self.capacity);
        self.last_ms = now.max(self.last_ms);
    }

    /// New limit or share: the level keeps what was used.
    fn resize(&mut self, limit: u64, share: u64, now: u64) {
        self.refill(now);
        let used = self.capacity - self.level;
        self.limit = limit;
        self.capacity = share.max(1) as f64;
        self.level = (self.capacity - used).min(self.capacity);
    }

    /// At least `need` is available now.
    pub fn has(&mut self, need: f64, now: u64) -> bool {
        self.refill(now);
        self.level >= need
    }

    /// Takes `n` (the level may go below zero: tokens are counted when a request ends).
    pub fn take(&mut self, n: f64, now: u64) {
        self.refill(now);
        self.level -= n;
    }

    pub fn remaining(&self) -> u64 {
        // `as` truncates: the floor of a non-negative number.
        self.level.max(0.0) as u64
    }

    /// Until `need` is available.
    pub fn wait_ms(&self, need: f64) -> u64 {
        let ms = (need - self.level).max(0.0) / self.per_ms();
        // The ceiling (`f64::ceil` is not in `core`); `as` saturates.
        let whole = ms as u64;
        whole.saturating_add(u64::from((whole as f64) < ms))
    }

    /// Until the bucket is full again.
    pub fn reset_ms(&self) -> u64 {
        self.wait_ms(self.capacity)
    }
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it (`250ms`, `6s`, `1m30s`).
pub fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

#[derive(Debug, Clone)]
struct BudgetState {
    grant: Grant,
    used_nano_usd: u64,
    used_tokens: u64,
}

impl BudgetState {
    fn allowance_left(&self) -> bool {
        self.grant
            .grant_nano_usd
            .is_none_or(|g| self.used_nano_usd < g)
            && self.grant.grant_tokens.is_none_or(|g| self.used_tokens < g)
    }

    fn remaining_usd(&self) -> Option<u64> {
        self.grant
            .remaining_nano_usd
            .map(|r| r.saturating_sub(self.used_nano_usd))
    }

    fn remaining_tokens(&self) -> Option<u64> {
        self.grant
            .remaining_tokens
            .map(|r| r.saturating_sub(self.used_tokens))
    }
}

#[derive(Debug, Clone)]
struct KeyState {
    org: String,
    config: String,
    seen_ms: u64,
    /// When the sidecar last answered for this key; none: limits not known yet.
    answered_ms: Option<u64>,
    lease_until_ms: u64,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    budgets: Vec<BudgetState>,
    /// When this VM last shared the key's answer.
    shared_ms: Option<u64>,
}

/// What an admitted request carries: response headers, and whether a soft budget is past its cap.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Admitted {
    pub headers: Vec<(&'static str, String)>,
    pub soft_over: bool,
}

/// A VM's budgets and rate limits.
#[derive(Debug, Default)]
pub struct Limits {
    keys: HashMap<String, KeyState>,
    /// Past the lease without a renewal: admit (true) or refuse with 503 (false).
    pub fail_open: bool,
    in_flight: bool,
    next_renew_ms: u64,
    /// Answers to write to shared data (`shared_key` → record), taken by the host adapter.
    to_share: Vec<(String, Vec<u8>)>,
}

fn retry_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

impl Limits {
    pub fn new(fail_open: bool) -> Self {
        Limits {
            fail_open,
            ..Default::default()
        }
    }

    /// A key this VM has never asked about (and could track): its limits must be learned before its
    /// first request is admitted ([`Limits::first_sight`], one callout per key and VM).
    pub fn needs_fetch(&self, key_id: &str) -> bool {
        match self.keys.get(key_id) {
            Some(k) => k.answered_ms.is_none(),
            None => self.keys.len() < MAX_KEYS,
        }
    }

    /// Tracks a key seen for the first time; the body asks the sidecar about it alone.
    pub fn first_sight(
        &mut self,
        key_id: &str,
        org: &str,
        config: &str,
        holder: &str,
        now: u64,
    ) -> Vec<u8> {
        self.track(key_id, org, config, now);
        allowance_request(holder, vec![key_value(key_id, org, config)])
    }

    /// The sidecar answered (or not) about a key seen for the first time: without an answer the key
    /// is treated as past its lease (the failure policy decides), until a renewal succeeds.
    pub fn on_first_answer(&mut self, key_id: &str, status: Option<u32>, body: &[u8], now: u64) {
        let ok = status == Some(200) && self.apply(body, now);
        if let Some(k) = self.keys.get_mut(key_id) {
            if !ok || k.answered_ms.is_none() {
                k.answered_ms = Some(now);
                // Over before now: the request that asked is admitted (or not) in this same
                // millisecond, and a lease is good up to and including its last millisecond.
                k.lease_until_ms = now.saturating_sub(1);
            }
        }
    }

    fn track(&mut self, key_id: &str, org: &str, config: &str, now: u64) {
        if self.keys.contains_key(key_id) {
            return;
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys
                .retain(|_, k| now.saturating_sub(k.seen_ms) < IDLE_MS);
        }
        if self.keys.len() >= MAX_KEYS {
            return;
        }
        self.keys.insert(
            key_id.to_string(),
            KeyState {
                org: org.to_string(),
                config: config.to_string(),
                seen_ms: now,
                answered_ms: None,
                lease_until_ms: 0,
                requests: None,
                tokens: None,
                budgets: Vec::new(),
                shared_ms: None,
            },
        );
    }

    /// Whether a request of `key_id` may start now.
    pub fn admit(
        &mut self,
        key_id: &str,
        org: &str,
        config: &str,
        now: u64,
    ) -> Result<Admitted, GatewayError> {
        self.track(key_id, org, config, now);
        let Some(k) = self.keys.get_mut(key_id) else {
            return Ok(Admitted::default());
        };
        k.seen_ms = now;
        if k.answered_ms.is_none() {
            return Ok(Admitted::default());
        }
        if now > k.lease_until_ms {
            // The sidecar has not renewed the allowance within its lease.
            if self.fail_open {
                return Ok(Admitted::default());
            }
            return Err(GatewayError::LimitsUnavailable);
        }
        let mut out = Admitted::default();
        for b in &k.budgets {
            if b.grant.soft {
                if b.remaining_usd() == Some(0) || b.remaining_tokens() == Some(0) {
                    out.soft_over = true;
                }
                continue;
            }
            let over = b.grant.exhausted
                || b.remaining_usd() == Some(0)
                || b.remaining_tokens() == Some(0);
            if over {
                let wait = b.grant.resets_at_ms.saturating_sub(now);
                return Err(GatewayError::BudgetExceeded {
                    message: format!(
                        "Budget '{}' ({}) is used up; it resets at {}.",
                        b.grant.name, b.grant.scope, b.grant.resets_at
                    ),
                    retry_after: retry_secs(wait),
                    renewing: false,
                });
            }
            if !b.allowance_left() {
                return Err(GatewayError::BudgetExceeded {
                    message: format!(
                        "Budget '{}' ({}): this gateway instance's allowance is used up until the control plane renews it; retry shortly.",
                        b.grant.name, b.grant.scope
                    ),
                    retry_after: 1,
                    renewing: true,
                });
            }
        }
        if let Some(r) = k.requests.as_mut() {
            if !r.has(1.0, now) {
                return Err(GatewayError::RateLimited {
                    message: format!(
                        "Rate limit of {} requests per minute reached for this API key.",
                        r.limit
                    ),
                    retry_after: retry_secs(r.wait_ms(1.0)),
                    headers: rate_headers(k.requests.as_ref(), k.tokens.as_ref()),
                });
            }
        }
        if let Some(t) = k.tokens.as_mut() {
            if !t.has(f64::MIN_POSITIVE, now) {
                return Err(GatewayError::RateLimited {
                    message: format!(
                        "Rate limit of {} tokens per minute reached for this API key.",
                        t.limit
                    ),
                    retry_after: retry_secs(t.wait_ms(f64::MIN_POSITIVE)),
                    headers: rate_headers(k.requests.as_ref(), k.tokens.as_ref()),
                });
            }
        }
        if let Some(r) = k.requests.as_mut() {
            r.take(1.0, now);
        }
        out.headers = rate_headers(k.requests.as_ref(), k.tokens.as_ref());
        if let Some(h) = budget_header(&k.budgets) {
            out.headers.push((BUDGET_HEADER, h));
        }
        Ok(out)
    }

    /// A request of `key_id` ended: what it cost.
    pub fn record(&mut self, key_id: &str, nano_usd: u64, tokens: u64, now: u64) {
        let Some(k) = self.keys.get_mut(key_id) else {
            return;
        };
        if let Some(t) = k.tokens.as_mut() {
            t.take(tokens as f64, now);
        }
        for b in &mut k.budgets {
            b.used_nano_usd = b.used_nano_usd.saturating_add(nano_usd);
            b.used_tokens = b.used_tokens.saturating_add(tokens);
        }
    }

    /// The renewal to send now, if one is due: the keys used recently.
    pub fn renewal(&mut self, holder: &str, now: u64) -> Option<Vec<u8>> {
        if self.in_flight || now < self.next_renew_ms {
            return None;
        }
        self.keys
            .retain(|_, k| now.saturating_sub(k.seen_ms) < IDLE_MS);
        if self.keys.is_empty() {
            return None;
        }
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|(id, k)| key_value(id, &k.org, &k.config))
            .collect();
        self.in_flight = true;
        Some(allowance_request(holder, keys))
    }

    /// The renewal could not be sent.
    pub fn renewal_failed(&mut self, now: u64) {
        self.in_flight = false;
        self.next_renew_ms = now.saturating_add(RENEW_MS);
    }

    /// The sidecar answered a renewal. Anything but a 200 with a valid body keeps the current
    /// allowances until their lease ends.
    pub fn on_answer(&mut self, status: Option<u32>, body: &[u8], now: u64) -> bool {
        self.renewal_failed(now);
        status == Some(200) && self.apply(body, now)
    }

    fn apply(&mut self, body: &[u8], now: u64) -> bool {
        let Ok(a) = Answer::parse(body) else {
            return false;
        };
        let lease = a.lease_seconds.clamp(1, 3600).saturating_mul(1000);
        for ka in a.keys {
            let Some(k) = self.keys.get_mut(&ka.key_id) else {
                continue;
            };
            if k.shared_ms
                .is_none_or(|t| now.saturating_sub(t) >= SHARE_EVERY_MS)
            {
                k.shared_ms = Some(now);
                let record = SharedAnswer {
                    at: now,
                    lease_ms: lease,
                    key: ka.clone(),
                };
                if let Ok(b) = serde_json::to_vec(&record) {
                    self.to_share.push((shared_key(&ka.key_id), b));
                }
            }
            apply_key(k, ka, now, now.saturating_add(lease), false);
        }
        true
    }

    /// Answers to write to shared data since the last call.
    pub fn take_shared(&mut self) -> Vec<(String, Vec<u8>)> {
        core::mem::take(&mut self.to_share)
    }

    /// A key seen for the first time on this VM, answered by another worker recently (its shared
    /// record, within the lease): rate-limit shares and budget states apply at once, without a
    /// callout; this VM may spend at most a floor (1% of the cap) of each budget until its own
    /// renewal (next tick) brings its own grant. Returns whether the record was used.
    pub fn adopt_shared(
        &mut self,
        key_id: &str,
        org: &str,
        config: &str,
        record: &[u8],
        now: u64,
    ) -> bool {
        let Ok(r) = SharedAnswer::parse(record) else {
            return false;
        };
        let until = r.at.saturating_add(r.lease_ms.min(3_600_000));
        if r.key.key_id != key_id || now >= until {
            return false;
        }
        self.track(key_id, org, config, now);
        let Some(k) = self.keys.get_mut(key_id) else {
            return false;
        };
        k.shared_ms = Some(r.at);
        apply_key(k, r.key, now, until, true);
        true
    }
}

/// Applies a key's answer. `adopted`: the grants are another holder's; this one may spend at most a
/// floor of each budget until its own renewal.
fn apply_key(k: &mut KeyState, ka: KeyAnswer, now: u64, lease_until: u64, adopted: bool) {
    k.answered_ms = Some(now);
    k.lease_until_ms = lease_until;
    k.requests = merge_bucket(
        k.requests.take(),
        ka.requests_per_minute,
        ka.requests_share,
        now,
    );
    k.tokens = merge_bucket(k.tokens.take(), ka.tokens_per_minute, ka.tokens_share, now);
    k.budgets = ka
        .budgets
        .into_iter()
        .map(|mut grant| {
            if adopted {
                // Another holder's grant: this one may spend at most a floor (1% of the cap, as the
                // sidecar's floor) until its own renewal.
                let floor = |max: Option<u64>| max.map_or(1, |m| (m / 100).max(1));
                grant.grant_nano_usd = grant
                    .grant_nano_usd
                    .map(|g| g.min(floor(grant.max_nano_usd)));
                grant.grant_tokens = grant.grant_tokens.map(|g| g.min(floor(grant.max_tokens)));
            }
            BudgetState {
                grant,
                used_nano_usd: 0,
                used_tokens: 0,
            }
        })
        .collect();
}

fn merge_bucket(
    old: Option<Bucket>,
    limit: Option<u64>,
    share: Option<u64>,
    now: u64,
) -> Option<Bucket> {
    let limit = limit?;
    let share = share.unwrap_or(limit);
    Some(match old {
        Some(mut b) => {
            b.resize(limit, share, now);
            b
        }
        None => Bucket::new(limit, share, now),
    })
}

/// Remaining budget of an admitted request's tightest budget.
pub const BUDGET_HEADER: &str = "x-llm-gateway-budget-remaining";

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (remaining: this instance's share).
pub fn rate_headers(req: Option<&Bucket>, tok: Option<&Bucket>) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some(r) = req {
        h.push(("x-ratelimit-limit-requests", r.limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", r.remaining().to_string()));
        h.push(("x-ratelimit-reset-requests", duration_text(r.reset_ms())));
    }
    if let Some(t) = tok {
        h.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", t.remaining().to_string()));
        h.push(("x-ratelimit-reset-tokens", duration_text(t.reset_ms())));
    }
    h
}

/// `usd=0.012345; tokens=900; budget="name"; resets=...` of the budget with the least left (by
/// share of its cap left as seen by this instance).
fn budget_header(budgets: &[BudgetState]) -> Option<String> {
    let b = budgets.iter().min_by_key(|b| {
        let usd = b.remaining_usd().unwrap_or(u64::MAX);
        let tok = b.remaining_tokens().unwrap_or(u64::MAX);
        (usd.min(tok), b.grant.id.clone())
    })?;
    let mut parts = Vec::new();
    if let Some(u) = b.remaining_usd() {
        parts.push(format!("usd={}", usd_text(u)));
    }
    if let Some(t) = b.remaining_tokens() {
        parts.push(format!("tokens={t}"));
    }
    let name: String = b
        .grant
        .name
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != '"' && *c != '\\')
        .collect();
    parts.push(format!("budget=\"{name}\""));
    parts.push(format!("resets={}", b.grant.resets_at));
    Some(parts.join("; "))
}

/// Nano-USD as USD with six decimals, rounded (integer arithmetic: float formatting is large in wasm).
fn usd_text(nano: u64) -> String {
    let micro = nano / 1000 + u64::from(nano % 1000 >= 500);
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// One key of an allowance request: `{"keyId", "orgId", "configId"}`.
fn key_value(key_id: &str, org: &str, config: &str) -> Value {
    obj(&mut [
        ("keyId", Value::from(key_id)),
        ("orgId", Value::from(org)),
        ("configId", Value::from(config)),
    ])
}

/// The allowance request body: `{"holder", "keys"}`.
fn allowance_request(holder: &str, keys: Vec<Value>) -> Vec<u8> {
    crate::translate::json_bytes(&obj(&mut [
        ("holder", Value::from(holder)),
        ("keys", Value::Array(keys)),
    ]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usd_text_has_six_rounded_decimals() {
        assert_eq!(usd_text(0), "0.000000");
        assert_eq!(usd_text(499), "0.000000");
        assert_eq!(usd_text(500), "0.000001");
        assert_eq!(usd_text(1000), "0.000001");
        assert_eq!(usd_text(1_234_567_890), "1.234568");
        assert_eq!(usd_text(12_000_000_000), "12.000000");
        assert_eq!(usd_text(u64::MAX), "18446744073.709552");
    }

    fn answer(budgets: serde_json::Value, rpm: Option<u64>, tpm: Option<u64>) -> Vec<u8> {
        json!({"leaseSeconds": 30, "keys": [{
            "keyId": "k1", "holders": 1,
            "requestsPerMinute": rpm, "tokensPerMinute": tpm,
            "requestsShare": rpm, "tokensShare": tpm,
            "budgets": budgets,
        }]})
        .to_string()
        .into_bytes()
    }

    fn budget(remaining: u64, grant: u64, soft: bool) -> serde_json::Value {
        json!([{"id": "b1", "name": "team", "scope": "key", "soft": soft,
                "resetsAtMs": 100_000, "resetsAt": "2026-12-02T00:00:00Z",
                "remainingNanoUsd": remaining, "grantNanoUsd": grant,
                "exhausted": remaining == 0}])
    }

    fn known(l: &mut Limits, body: &[u8]) {
        l.admit("k1", "o", "c", 0).unwrap();
        assert!(l.renewal("h", 0).is_some());
        assert!(l.on_answer(Some(200), body, 0));
    }

    #[test]
    fn readers_agree_with_the_derives() {
        use crate::read::assert_agrees;
        let mut full: serde_json::Value =
            serde_json::from_slice(&answer(budget(5, 6, true), Some(1), Some(2))).unwrap();
        let grant = &mut full["keys"][0]["budgets"][0];
        grant["remainingTokens"] = json!(7);
        grant["grantTokens"] = json!(8);
        grant["maxNanoUsd"] = json!(9);
        grant["maxTokens"] = json!(10);
        let key = full["keys"][0].clone();
        assert_agrees(&key, KeyAnswer::read);
        assert_agrees(&json!({}), KeyAnswer::read);
        assert_agrees(&json!({"budgets": [{"soft": null}]}), KeyAnswer::read);
        assert_agrees(&json!({"budgets": [{"maxTokens": null}]}), KeyAnswer::read);
        assert_agrees(&json!({"requestsShare": -1}), KeyAnswer::read);
        let shared = json!({"at": 1, "leaseMs": 2, "key": key});
        let parsed = SharedAnswer::parse(shared.to_string().as_bytes()).unwrap();
        assert_eq!(
            serde_json::to_value(parsed).unwrap(),
            serde_json::to_value(serde_json::from_value::<SharedAnswer>(shared).unwrap()).unwrap()
        );
        let a = Answer::parse(&serde_json::to_vec(&full).unwrap()).unwrap();
        assert_eq!((a.lease_seconds, a.keys.len()), (30, 1));
        assert!(Answer::parse(br#"{"keys":{}}"#).is_err());
    }

    #[test]
    fn a_budget_refuses_once_crossed_and_names_its_reset() {
        let mut l = Limits::new(true);
        known(&mut l, &answer(budget(1000, 1000, false), None, None));
        let a = l.admit("k1", "o", "c", 10).unwrap();
        assert!(a
            .headers
            .iter()
            .any(|(k, v)| *k == BUDGET_HEADER && v.contains("usd=0.000001")));
        // The request in flight finishes past the cap; the next one is refused.
        l.record("k1", 1500, 10, 20);
        let e = l.admit("k1", "o", "c", 30).unwrap_err();
        assert_eq!(e.status(), 429);
        assert_eq!(
            (e.kind(), e.code()),
            ("insufficient_quota", "budget_exceeded")
        );
        assert!(e.message().contains("'team'") && e.message().contains("2026-12-02T00:00:00Z"));
        assert!(e.headers().contains(&("retry-after", "100".to_string())));
        // The window resets: the sidecar grants again.
        l.renewal("h", 2000).unwrap();
        l.on_answer(
            Some(200),
            &answer(budget(1000, 250, false), None, None),
            2000,
        );
        assert!(l.admit("k1", "o", "c", 2001).is_ok());
    }

    #[test]
    fn a_used_allowance_waits_for_renewal() {
        let mut l = Limits::new(true);
        known(&mut l, &answer(budget(1000, 100, false), None, None));
        l.record("k1", 100, 1, 1);
        let e = l.admit("k1", "o", "c", 2).unwrap_err();
        assert!(e.message().contains("allowance"));
        assert_eq!(e.code(), "budget_allowance_renewing");
        assert!(e.headers().contains(&("retry-after", "1".to_string())));
    }

    #[test]
    fn soft_budgets_only_alert() {
        let mut l = Limits::new(true);
        known(&mut l, &answer(budget(0, 0, true), None, None));
        let a = l.admit("k1", "o", "c", 1).unwrap();
        assert!(a.soft_over);
    }

    #[test]
    fn requests_per_minute_with_headers() {
        let mut l = Limits::new(true);
        known(&mut l, &answer(json!([]), Some(2), None));
        let a = l.admit("k1", "o", "c", 0).unwrap();
        assert!(a
            .headers
            .contains(&("x-ratelimit-limit-requests", "2".into())));
        assert!(a
            .headers
            .contains(&("x-ratelimit-remaining-requests", "1".into())));
        l.admit("k1", "o", "c", 0).unwrap();
        let e = l.admit("k1", "o", "c", 0).unwrap_err();
        assert_eq!(e.status(), 429);
        assert_eq!(e.code(), "rate_limit_exceeded");
        let h = e.headers();
        assert!(h.contains(&("retry-after", "30".to_string())));
        assert!(h.contains(&("x-ratelimit-remaining-requests", "0".to_string())));
        // Half a minute later one request is back.
        assert!(l.admit("k1", "o", "c", 30_000).is_ok());
    }

    #[test]
    fn tokens_per_minute_count_when_requests_end() {
        let mut l = Limits::new(true);
        known(&mut l, &answer(json!([]), None, Some(100)));
        l.admit("k1", "o", "c", 0).unwrap();
        l.record("k1", 0, 150, 0);
        let e = l.admit("k1", "o", "c", 0).unwrap_err();
        assert!(e.message().contains("tokens per minute"));
        assert!(l.admit("k1", "o", "c", 60_000).is_ok());
    }

    #[test]
    fn lease_expiry_follows_the_policy() {
        for open in [true, false] {
            let mut l = Limits::new(open);
            known(&mut l, &answer(budget(1000, 500, false), None, None));
            assert!(l.admit("k1", "o", "c", 29_000).is_ok());
            // Renewals fail: the last allowance holds until the lease ends.
            l.renewal("h", 29_000).unwrap();
            assert!(!l.on_answer(None, b"", 29_000));
            assert!(l.admit("k1", "o", "c", 30_000).is_ok());
            let r = l.admit("k1", "o", "c", 30_001);
            assert_eq!(r.is_ok(), open);
            if let Err(e) = r {
                assert_eq!(e.status(), 503);
            }
        }
    }

    #[test]
    fn unknown_keys_pass_until_learned_and_renewals_are_batched() {
        let mut l = Limits::new(false);
        assert!(l.admit("k1", "o", "c", 0).is_ok());
        let body = l.renewal("h", 0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["keys"][0]["keyId"], "k1");
        assert!(l.renewal("h", 0).is_none(), "one renewal in flight");
        l.on_answer(Some(500), b"{}", 0);
        assert!(
            l.renewal("h", 400).is_none(),
            "next renewal on the next tick"
        );
        assert!(l.renewal("h", 1000).is_some());
        l.on_answer(Some(200), b"not json", 1000);
        assert!(l.admit("k1", "o", "c", 1001).is_ok());
        assert!(
            l.renewal("h", 1000 + IDLE_MS + RENEW_MS).is_none(),
            "idle keys dropped"
        );
    }

    #[test]
    fn first_sight_learns_before_admitting() {
        for open in [true, false] {
            let mut l = Limits::new(open);
            assert!(l.needs_fetch("k1"));
            let body = l.first_sight("k1", "o", "c", "h", 0);
            assert!(String::from_utf8(body)
                .unwrap()
                .contains("\"keyId\":\"k1\""));
            l.on_first_answer("k1", Some(200), &answer(json!([]), Some(1), None), 0);
            assert!(!l.needs_fetch("k1"));
            assert!(l.admit("k1", "o", "c", 1).is_ok());
            assert!(
                l.admit("k1", "o", "c", 2).is_err(),
                "1 rpm applies to the second request"
            );
            // No answer for a new key: the failure policy applies at once.
            l.first_sight("k2", "o", "c", "h", 0);
            l.on_first_answer("k2", None, b"", 0);
            assert!(!l.needs_fetch("k2"));
            assert_eq!(l.admit("k2", "o", "c", 1).is_ok(), open);
            // ... also to the request that asked, admitted in the same millisecond.
            l.first_sight("k3", "o", "c", "h", 5_000);
            l.on_first_answer("k3", None, b"", 5_000);
            assert_eq!(l.admit("k3", "o", "c", 5_000).is_ok(), open);
        }
    }

    #[test]
    fn other_workers_answers_are_adopted_for_one_request() {
        let mut a = Limits::new(true);
        known(&mut a, &answer(budget(1000, 500, false), Some(10), None));
        let shared = a.take_shared();
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].0, shared_key("k1"));
        assert!(a.take_shared().is_empty());
        let mut b = Limits::new(true);
        assert!(
            !b.adopt_shared("k2", "o", "c", &shared[0].1, 10),
            "another key's record"
        );
        assert!(
            !b.adopt_shared("k1", "o", "c", &shared[0].1, 30_000),
            "past the lease"
        );
        assert!(b.adopt_shared("k1", "o", "c", &shared[0].1, 10));
        assert!(!b.needs_fetch("k1"));
        let ok = b.admit("k1", "o", "c", 11).unwrap();
        assert!(ok
            .headers
            .contains(&("x-ratelimit-limit-requests", "10".into())));
        b.record("k1", 10, 1, 12); // the floor: 1% of a 1000 cap (test budgets have no max: 1)
        let e = b.admit("k1", "o", "c", 13).unwrap_err();
        assert_eq!(e.code(), "budget_allowance_renewing");
        assert!(!b.adopt_shared("k1", "o", "c", b"garbage", 10));
    }

    #[test]
    fn reset_texts() {
        assert_eq!(duration_text(250), "250ms");
        assert_eq!(duration_text(6000), "6s");
        assert_eq!(duration_text(90_000), "1m30s");
    }
}
