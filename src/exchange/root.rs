//! The worker VM's root context: configuration, the 1 s tick (usage flush, background refreshes of
//! stale keys, allowance renewals) and shutdown. Its callouts' answers come back here.

#[allow(unused_imports)]
use crate::prelude::*;

use super::{
    call_sidecar, log_at, resolve_call, share_limits, store_answer, Cx, Effect, GatewayHttp,
    Purpose, RootEvent, Shared, REFRESHES_PER_TICK, REFRESH_QUEUE,
};
use crate::config::{self, Plan, ProcessEnv};
use crate::hostapi::{Buffer, Read};
use crate::metrics;
use crate::report::{self, Reporter};
use crate::resolve::{Breaker, IdentityCache, Refresher, TokenBucket};
use alloc::rc::Rc;
use hashbrown::HashMap;

pub struct GatewayRoot {
    plan: Option<Rc<Plan>>,
    shared: Rc<Shared>,
    /// Root callouts in flight: token → what for.
    callouts: HashMap<u32, Purpose>,
    /// Set when Envoy asked the VM to finish (`on_done`): when it asked.
    done_at: Option<u64>,
}

impl Default for GatewayRoot {
    fn default() -> Self {
        GatewayRoot {
            plan: None,
            shared: Rc::new(Shared::default()),
            callouts: HashMap::new(),
            done_at: None,
        }
    }
}

impl GatewayRoot {
    /// Handles one root event, pushing the effects into `out`. The answer: for `Configure`, whether
    /// the configuration is accepted; for `Done`, whether the VM may finish now; otherwise true.
    pub fn handle(&mut self, host: &dyn Read, event: RootEvent, out: &mut Vec<Effect>) -> bool {
        let mut cx = Cx { host, out };
        match event {
            RootEvent::Configure => self.on_configure(&mut cx),
            RootEvent::Tick => {
                self.on_tick(&mut cx);
                true
            }
            RootEvent::Done => self.on_done(&mut cx),
            RootEvent::CallResponse {
                token,
                status,
                body,
            } => {
                self.on_call_response(&mut cx, token, status, &body);
                true
            }
            RootEvent::Dispatched { purpose, result } => {
                self.on_dispatched(&mut cx, purpose, result);
                true
            }
        }
    }

    /// A request context sharing this VM's state (none before a configuration is accepted).
    pub fn create_http_context(&self) -> Option<GatewayHttp> {
        let plan = self.plan.clone()?;
        Some(GatewayHttp::new(plan, self.shared.clone()))
    }

    /// Sends the next batch of usage records to the sidecar, if there is one and none is in flight.
    fn flush_usage(&mut self, cx: &mut Cx) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let Some(body) = self.shared.reporter.borrow_mut().take_batch() else {
            return;
        };
        cx.push(call_sidecar(
            &sidecar,
            Purpose::Usage,
            report::USAGE_PATH,
            body,
            5000,
        ));
    }

    /// Background refreshes of stale identities (one in flight per key), unless the breaker is open.
    fn refresh_stale(&mut self, cx: &mut Cx) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let now = cx.now_ms();
        let due = self
            .shared
            .refresher
            .borrow_mut()
            .take(REFRESHES_PER_TICK, now);
        for hash in due {
            if !self.shared.breaker.borrow_mut().allow(now) {
                self.shared.refresher.borrow_mut().finished(&hash);
                continue;
            }
            let call = resolve_call(&sidecar, &hash, Purpose::Refresh(hash.clone()));
            cx.push(call);
        }
    }

    /// Renews this VM's budget allowances and rate-limit shares (one callout for all active keys).
    fn renew_limits(&mut self, cx: &mut Cx) {
        let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) else {
            return;
        };
        let now = cx.now_ms();
        let holder = self.shared.id_prefix.borrow().clone();
        let Some(body) = self.shared.limits.borrow_mut().renewal(&holder, now) else {
            return;
        };
        cx.push(call_sidecar(
            &sidecar,
            Purpose::Renewal,
            crate::limits::ALLOWANCE_PATH,
            body,
            sidecar.timeout_ms,
        ));
    }

    /// A callout was dispatched (its answer will come with the token) or refused by the host.
    fn on_dispatched(&mut self, cx: &mut Cx, purpose: Purpose, result: Result<u32, u32>) {
        let e = match result {
            Ok(token) => {
                self.callouts.insert(token, purpose);
                return;
            }
            Err(e) => e,
        };
        let now = cx.now_ms();
        match purpose {
            Purpose::Usage => {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot send usage records: {e:?}"),
                );
                let dropped = self.shared.reporter.borrow_mut().nack();
                self.shared
                    .metrics
                    .borrow_mut()
                    .add(cx.out, metrics::USAGE_DROPPED, dropped);
                self.shared.sync_buffered(cx.out);
            }
            Purpose::Refresh(hash) => {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot refresh a key: {e:?}"),
                );
                self.shared.breaker.borrow_mut().failure(now);
                self.shared.refresher.borrow_mut().finished(&hash);
            }
            Purpose::Renewal => {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot renew budget allowances: {e:?}"),
                );
                self.shared.limits.borrow_mut().renewal_failed(now);
            }
            Purpose::Resolve | Purpose::FirstLimits => {}
        }
    }

    /// Shutting down: finish once every record is handed over (or the grace period is over).
    fn maybe_finish(&mut self, cx: &mut Cx) {
        let Some(at) = self.done_at else { return };
        let reporter = self.shared.reporter.borrow();
        if !report::may_finish(&reporter, at, cx.now_ms()) {
            return;
        }
        let left = reporter.buffered();
        drop(reporter);
        if left > 0 {
            log_at(
                log::Level::Warn,
                format_args!("shutting down with {left} usage record(s) not delivered"),
            );
            self.shared
                .metrics
                .borrow_mut()
                .add(cx.out, metrics::USAGE_DROPPED, left as u64);
        } else {
            log_at(
                log::Level::Info,
                format_args!("usage records flushed; VM done"),
            );
        }
        self.done_at = None;
        self.shared.reporter.replace(Reporter::default());
        self.shared.sync_buffered(cx.out);
        cx.push(Effect::Done);
    }

    /// Envoy is done with this VM (shutdown, drain, configuration replaced): hand the queued usage
    /// records over first. Returning false keeps the VM until `proxy_done` (see `maybe_finish`).
    fn on_done(&mut self, cx: &mut Cx) -> bool {
        let buffered = self.shared.reporter.borrow().buffered();
        let has_sidecar = self.plan.as_ref().is_some_and(|p| p.sidecar.is_some());
        log_at(
            log::Level::Info,
            format_args!("VM done requested ({buffered} usage record(s) buffered)"),
        );
        if !has_sidecar || buffered == 0 {
            return true;
        }
        self.done_at = Some(cx.now_ms());
        self.flush_usage(cx);
        false
    }

    fn on_call_response(&mut self, cx: &mut Cx, token: u32, status: Option<u32>, body: &[u8]) {
        match self.callouts.remove(&token) {
            Some(Purpose::Refresh(hash)) => {
                // A background refresh answered.
                self.shared.refresher.borrow_mut().finished(&hash);
                if let Some(sidecar) = self.plan.as_ref().and_then(|p| p.sidecar.clone()) {
                    let _ = store_answer(cx, &self.shared, &sidecar, &hash, status, body);
                }
                return;
            }
            Some(Purpose::Renewal) => {
                let now = cx.now_ms();
                if !self.shared.limits.borrow_mut().on_answer(status, body, now) {
                    log_at(
                        log::Level::Warn,
                        format_args!("budget allowances not renewed (status {status:?})"),
                    );
                }
                share_limits(cx, &self.shared);
                return;
            }
            Some(Purpose::Usage) => {}
            Some(Purpose::Resolve | Purpose::FirstLimits) | None => return,
        }
        let mut reporter = self.shared.reporter.borrow_mut();
        let (sent, dropped) = if status == Some(200) {
            (reporter.ack(), 0)
        } else {
            log_at(
                log::Level::Warn,
                format_args!("sidecar did not take usage records (status {status:?}); will retry"),
            );
            (0, reporter.nack())
        };
        drop(reporter);
        let mut m = self.shared.metrics.borrow_mut();
        m.add(cx.out, metrics::USAGE_SENT, sent);
        m.add(cx.out, metrics::USAGE_DROPPED, dropped);
        drop(m);
        self.shared.sync_buffered(cx.out);
        // Drain a backlog without waiting for the next tick.
        if status == Some(200) {
            self.flush_usage(cx);
        }
        self.maybe_finish(cx);
    }

    fn on_configure(&mut self, cx: &mut Cx) -> bool {
        let bytes = match cx.host.buffer(Buffer::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b,
            Err(e) => {
                log_at(
                    log::Level::Error,
                    format_args!("cannot read plugin configuration: {e:?}"),
                );
                return false;
            }
        };
        let plan = config::parse(&bytes).and_then(|raw| config::compile(&raw, &ProcessEnv));
        match plan {
            Ok(plan) => {
                log_at(
                    log::Level::Info,
                    format_args!(
                        "configured with {} static key(s), sidecar {}",
                        plan.keys.len(),
                        if plan.sidecar.is_some() {
                            "enabled"
                        } else {
                            "disabled"
                        }
                    ),
                );
                if let Some(sc) = &plan.sidecar {
                    cx.push(Effect::SetTick { ms: 1000 });
                    self.shared
                        .lookups
                        .replace(TokenBucket::new(sc.lookups_per_second, sc.lookup_burst));
                    self.shared.breaker.replace(Breaker::new(
                        sc.breaker_failures,
                        sc.breaker_cooldown_ms,
                        sc.timeout_ms,
                    ));
                    self.shared
                        .refresher
                        .replace(Refresher::new(REFRESH_QUEUE, sc.timeout_ms));
                    self.shared
                        .reporter
                        .borrow_mut()
                        .set_max_bytes(sc.usage_buffer_bytes);
                    self.shared
                        .limits
                        .replace(crate::limits::Limits::new(sc.limits_fail_open));
                }
                self.plan = Some(Rc::new(plan));
                self.shared.cache.replace(IdentityCache::default());
                let seed = crate::sys::random_u64();
                self.shared
                    .id_prefix
                    .replace(format!("{:x}-{seed:016x}", cx.now_ms()));
                true
            }
            Err(e) => {
                log_at(log::Level::Error, format_args!("refusing to start: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self, cx: &mut Cx) {
        self.flush_usage(cx);
        self.refresh_stale(cx);
        self.renew_limits(cx);
        self.maybe_finish(cx);
    }
}
