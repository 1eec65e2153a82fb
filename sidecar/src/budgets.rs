//! Budgets and rate limits: the pure decisions of the control plane (window math, allowance grants,
//! rate-limit shares). The router (`routes/budgets.rs`) reads spend and holders from the database and
//! asks this module what to grant; see docs/operations.md, "Budgets and rate limits".

use serde::{Deserialize, Serialize};
use time::{Date, Duration, OffsetDateTime, Time};
use utoipa::ToSchema;

/// How a budget's window is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// UTC calendar day.
    Day,
    /// ISO week, Monday 00:00 UTC.
    Week,
    /// UTC calendar month.
    Month,
    /// `windowSeconds` long windows starting at `startsAtMs` (the first reset is `startsAtMs + windowSeconds`).
    Fixed,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Fixed => "fixed",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            "fixed" => Some(Period::Fixed),
            _ => None,
        }
    }
}

fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn midnight(d: Date) -> OffsetDateTime {
    d.with_time(Time::MIDNIGHT).assume_utc()
}

/// The window `[start, end)` (ms since the epoch, UTC) that contains `now_ms`. A fixed window before
/// its start is the first window.
pub fn window(period: Period, starts_at_ms: i64, window_seconds: i64, now_ms: i64) -> (i64, i64) {
    let now = from_ms(now_ms);
    match period {
        Period::Day => {
            let s = midnight(now.date());
            (to_ms(s), to_ms(s + Duration::days(1)))
        }
        Period::Week => {
            let back = i64::from(now.weekday().number_days_from_monday());
            let s = midnight(now.date()) - Duration::days(back);
            (to_ms(s), to_ms(s + Duration::days(7)))
        }
        Period::Month => {
            let first = now.date().replace_day(1).unwrap_or(now.date());
            let next = if first.month() == time::Month::December {
                Date::from_calendar_date(first.year() + 1, time::Month::January, 1)
            } else {
                Date::from_calendar_date(first.year(), first.month().next(), 1)
            }
            .unwrap_or(first);
            (to_ms(midnight(first)), to_ms(midnight(next)))
        }
        Period::Fixed => {
            let len = window_seconds.max(1).saturating_mul(1000);
            let k = if now_ms <= starts_at_ms {
                0
            } else {
                (now_ms - starts_at_ms) / len
            };
            let s = starts_at_ms.saturating_add(k.saturating_mul(len));
            (s, s.saturating_add(len))
        }
    }
}

/// RFC 3339 (UTC, seconds) of a time in ms.
pub fn rfc3339(ms: i64) -> String {
    let t = from_ms(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// How long a holder (a filter VM) may keep enforcing from a grant without renewing it.
pub const DEFAULT_LEASE_SECONDS: u64 = 30;

/// The lease: `LLM_GATEWAY_LIMITS_LEASE_SECONDS` (1-3600), else [`DEFAULT_LEASE_SECONDS`].
pub fn lease_seconds() -> u64 {
    std::env::var("LLM_GATEWAY_LIMITS_LEASE_SECONDS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(DEFAULT_LEASE_SECONDS)
}
/// A holder counts as active (sharing rate limits and budgets) this long after its last renewal.
pub const HOLDER_ACTIVE_MS: i64 = 10_000;

/// What a holder may spend of one cap before it must renew: a quarter of what is left, split across
/// the active holders, but at least `floor` (and never more than is left). The database lags the
/// holders by up to one renewal (usage records are flushed on the same tick); with a quarter the
/// spend converges to the cap from below (the remaining budget d follows d' = d - d_prev / 4, a
/// double root 1/2: no oscillation), so only the floor grants near the cap overshoot: at most two
/// per holder (the one being spent and the one not yet in the database), see docs/operations.md.
pub fn grant(cap: u64, spent: u64, holders: u64, floor: u64) -> u64 {
    let remaining = cap.saturating_sub(spent);
    if remaining == 0 {
        return 0;
    }
    let slice = remaining / holders.max(1).saturating_mul(4);
    slice.max(floor).min(remaining)
}

/// The default floor of a grant: 1% of the cap, at least 1 unit.
pub fn default_floor(cap: u64) -> u64 {
    (cap / 100).max(1)
}

/// One holder's share of a per-minute limit enforced per instance: `ceil(limit / holders)`. The sum
/// over holders is at most `limit + holders - 1`.
pub fn share(limit: u64, holders: u64) -> u64 {
    let h = holders.max(1);
    limit.div_ceil(h).max(1)
}

/// The worst case spend past a cap (docs/operations.md): near the cap each of `holders` holders
/// spends at most one floor grant plus one request per renewal (it admits while its spend is below
/// the grant; the last request admitted may cost `max_request`), and the database lags by one
/// renewal: two such rounds per holder; plus the other requests in flight when the cap is reached
/// (concurrent requests admitted before the refusal, counted when they end). The filter adds one more
/// `floor + max_request` per holder once per key (a worker adopting another worker's answer), which
/// docs/operations.md adds to this steady-state bound.
#[cfg_attr(not(test), allow(dead_code))]
pub fn overshoot_bound(holders: u64, floor: u64, max_request: u64, in_flight_cost: u64) -> u64 {
    holders
        .saturating_mul(2)
        .saturating_mul(floor.saturating_add(max_request))
        .saturating_add(in_flight_cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn calendar_windows() {
        // 2026-12-01T13:00:00Z is a Tuesday.
        let now = 1_796_083_200_000 + 13 * 3_600_000;
        let (s, e) = window(Period::Day, 0, 0, now);
        assert_eq!(rfc3339(s), "2026-12-01T00:00:00Z");
        assert_eq!(e - s, DAY);
        let (s, e) = window(Period::Week, 0, 0, now);
        assert_eq!(rfc3339(s), "2026-11-30T00:00:00Z");
        assert_eq!(rfc3339(e), "2026-12-07T00:00:00Z");
        let (s, e) = window(Period::Month, 0, 0, now);
        assert_eq!(rfc3339(s), "2026-12-01T00:00:00Z");
        assert_eq!(rfc3339(e), "2027-01-01T00:00:00Z");
        let (s, e) = window(Period::Month, 0, 0, now - 5 * DAY);
        assert_eq!(rfc3339(s), "2026-11-01T00:00:00Z");
        assert_eq!(rfc3339(e), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn fixed_windows_roll_over() {
        assert_eq!(window(Period::Fixed, 1000, 10, 500), (1000, 11_000));
        assert_eq!(window(Period::Fixed, 1000, 10, 10_999), (1000, 11_000));
        assert_eq!(window(Period::Fixed, 1000, 10, 11_000), (11_000, 21_000));
        assert_eq!(window(Period::Fixed, 1000, 0, 1500), (1000, 2000));
    }

    #[test]
    fn grants_split_what_is_left() {
        assert_eq!(grant(1000, 0, 1, 10), 250);
        assert_eq!(grant(1000, 0, 5, 10), 50);
        assert_eq!(grant(1000, 990, 5, 10), 10);
        assert_eq!(grant(1000, 995, 5, 10), 5);
        assert_eq!(grant(1000, 1000, 5, 10), 0);
        assert_eq!(grant(1000, 2000, 5, 10), 0);
        assert_eq!(default_floor(1000), 10);
        assert_eq!(default_floor(5), 1);
    }

    /// Holders spend every grant at once, in requests of `cost` (the last one admitted may pass the
    /// grant); the database sees it one renewal later. Spend stays within the documented bound.
    #[test]
    fn lagging_database_stays_within_the_bound() {
        for holders in [1u64, 2, 4, 8] {
            for cost in [1u64, 2_550, 30_000] {
                let (cap, floor) = (1_000_000u64, 10_000u64);
                let (mut spent, mut db) = (0u64, 0u64);
                for _ in 0..400 {
                    let round: u64 = (0..holders)
                        .map(|_| grant(cap, db, holders, floor).div_ceil(cost) * cost)
                        .sum();
                    db = spent; // what was spent before this round reaches the database now
                    spent += round;
                }
                let bound = cap + overshoot_bound(holders, floor, cost, 0);
                assert!(spent <= bound, "{holders} x {cost}: {spent} > {bound}");
                assert!(spent >= cap, "{holders}: the whole cap is usable");
            }
        }
    }

    #[test]
    fn shares_round_up() {
        assert_eq!(share(10, 4), 3);
        assert_eq!(share(10, 1), 10);
        assert_eq!(share(1, 4), 1);
        assert_eq!(share(10, 0), 10);
        assert_eq!(overshoot_bound(4, 10, 5, 7), 127);
    }
}
