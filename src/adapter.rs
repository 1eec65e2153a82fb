//! The one place effects reach a host: [`apply`] turns each [`Effect`] of the exchange machine into a
//! [`Host`] call; [`Root`] and [`Http`] turn the host's callbacks into [`RootEvent`]s / [`Event`]s, run
//! the machine, apply its effects and feed a callout's dispatch result (or a body the host refused)
//! back to it as an event. Generic over the host: `host.rs` drives them with Envoy's (`abi::Wasm`); the
//! tests, the benchmark and the fuzz lifecycle with [`crate::hostapi::fake::Fake`]. No decisions here:
//! a failed host call is logged (as the machine would have), or handed back as an event.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::exchange::{
    call_answer, log_at, Effect, Event, Flow, GatewayHttp, GatewayRoot, Purpose, RootEvent,
};
use crate::hostapi::{Buffer, Host, Map, Status};
use alloc::rc::Rc;
use core::cell::RefCell;

/// Host metric ids by the machine's metric number (`None`: the host refused the definition).
#[derive(Default)]
pub struct MetricIds(RefCell<Vec<Option<u32>>>);

impl MetricIds {
    fn get(&self, local: u32) -> Option<u32> {
        let i = usize::try_from(local).ok()?;
        self.0.borrow().get(i).copied().flatten()
    }

    fn set(&self, local: u32, id: Option<u32>) {
        let Ok(i) = usize::try_from(local) else {
            return;
        };
        let mut ids = self.0.borrow_mut();
        if ids.len() <= i {
            ids.resize(i + 1, None);
        }
        if let Some(slot) = ids.get_mut(i) {
            *slot = id;
        }
    }
}

/// The outbox and its spare, shared by every context of the VM (callbacks never nest, so one pair
/// serves all; their capacity is kept from request to request).
#[derive(Default)]
pub struct Outbox {
    out: Vec<Effect>,
    spare: Vec<Effect>,
}

/// What the adapter keeps for the whole VM: metric ids and the outbox.
#[derive(Default)]
pub struct Vm {
    ids: MetricIds,
    outbox: RefCell<Outbox>,
}

/// Runs `f` with the VM's outbox (fresh buffers in the impossible case that it is in use).
fn with_outbox<R>(shared: &RefCell<Outbox>, f: impl FnOnce(&mut Outbox) -> R) -> R {
    match shared.try_borrow_mut() {
        Ok(mut o) => {
            let r = f(&mut o);
            o.out.clear();
            o.spare.clear();
            r
        }
        Err(_) => f(&mut Outbox::default()),
    }
}

/// What the machine must hear about an applied effect.
#[derive(Debug)]
pub enum Back {
    Dispatched {
        purpose: Purpose,
        result: Result<u32, Status>,
    },
    BodyNotSet {
        status: Status,
    },
}

/// Applies one effect to the host. A callout's dispatch result, and a request body the host refused,
/// come back for the machine; other failures are logged.
pub fn apply<H: Host + ?Sized>(host: &H, ids: &MetricIds, effect: &Effect) -> Option<Back> {
    match effect {
        Effect::SetHeader { map, name, value } => {
            if let Err(e) = host.set_header(*map, name, value) {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot set header {name}: {e:?}"),
                );
            }
        }
        Effect::RemoveHeader { map, name } => {
            if let Err(e) = host.remove_header(*map, name) {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot set header {name}: {e:?}"),
                );
            }
        }
        Effect::SetBuffer {
            buffer,
            start,
            size,
            data,
        } => {
            if let Err(status) = host.set_buffer(*buffer, *start, *size, data) {
                if *buffer == Buffer::RequestBody {
                    return Some(Back::BodyNotSet { status });
                }
                log_at(
                    log::Level::Warn,
                    format_args!("cannot set the response body: {status:?}"),
                );
            }
        }
        Effect::Reply {
            status,
            headers,
            body,
        } => {
            let pairs: Vec<(&str, &[u8])> =
                headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
            if let Err(e) = host.send_response(*status, &pairs, body) {
                log_at(
                    log::Level::Error,
                    format_args!("cannot send local reply: {e:?}"),
                );
            }
        }
        Effect::ResumeRequest => {
            if let Err(e) = host.resume_request() {
                log_at(
                    log::Level::Error,
                    format_args!("cannot resume request: {e:?}"),
                );
            }
        }
        Effect::SharedSet { key, value } => {
            if let Err(e) = host.shared_set(key, Some(value)) {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot set shared data {key}: {e:?}"),
                );
            }
        }
        Effect::SetProperties(values) => {
            for (name, value) in values {
                if let Err(e) = host.set_property(&[name], value.as_bytes()) {
                    log_at(
                        log::Level::Debug,
                        format_args!("cannot set filter state {name}: {e:?}"),
                    );
                }
            }
        }
        Effect::SetTick { ms } => {
            if let Err(e) = host.set_tick_ms(*ms) {
                log_at(
                    log::Level::Warn,
                    format_args!("cannot start the usage timer: {e:?}"),
                );
            }
        }
        Effect::Done => {
            if let Err(e) = host.done() {
                log_at(log::Level::Warn, format_args!("cannot signal done: {e:?}"));
            }
        }
        Effect::Call(call) => {
            let pairs: Vec<(&str, &str)> =
                call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let result = host.call(&call.cluster, &pairs, &call.body, call.timeout_ms);
            return Some(Back::Dispatched {
                purpose: call.purpose.clone(),
                result,
            });
        }
        Effect::DefineMetric { local, kind, name } => {
            let id = match host.define_metric(*kind, name) {
                Ok(id) => Some(id),
                Err(e) => {
                    log_at(
                        log::Level::Warn,
                        format_args!("cannot define metric {name}: {e:?}"),
                    );
                    None
                }
            };
            ids.set(*local, id);
        }
        Effect::Increment { local, by } => {
            if let Some(id) = ids.get(*local) {
                host.increment_metric(id, *by);
            }
        }
        Effect::GaugeAdd { local, delta } => {
            if let Some(id) = ids.get(*local) {
                host.add_gauge(id, *delta);
            }
        }
        Effect::Record { local, value } => {
            if let Some(id) = ids.get(*local) {
                host.record_metric(id, *value);
            }
        }
    }
    None
}

/// Applies `out` in order; whatever comes back is handed to `back`, which may push more effects
/// (into `spare`, applied after the current ones). A refused request body ends its batch: the effects
/// decided after it (its length, a resume) are dropped and the machine's answer (an error reply)
/// takes their place. Both buffers are left empty, their capacity kept.
fn drain<H: Host + ?Sized>(
    host: &H,
    ids: &MetricIds,
    out: &mut Vec<Effect>,
    spare: &mut Vec<Effect>,
    mut back: impl FnMut(Back, &mut Vec<Effect>),
) {
    loop {
        for e in out.iter() {
            if let Some(b) = apply(host, ids, e) {
                let ends = matches!(b, Back::BodyNotSet { .. });
                back(b, spare);
                if ends {
                    break;
                }
            }
        }
        out.clear();
        if spare.is_empty() {
            return;
        }
        core::mem::swap(out, spare);
    }
}

/// The VM's root context over a host.
pub struct Root<'h, H: Host> {
    machine: GatewayRoot,
    host: &'h H,
    vm: Rc<Vm>,
}

impl<'h, H: Host> Root<'h, H> {
    pub fn new(host: &'h H) -> Self {
        Root {
            machine: GatewayRoot::default(),
            host,
            vm: Rc::default(),
        }
    }

    fn run(&mut self, event: RootEvent) -> bool {
        let (host, ids, machine) = (self.host, &self.vm.ids, &mut self.machine);
        with_outbox(&self.vm.outbox, |o| {
            let answer = machine.handle(host, event, &mut o.out);
            drain(host, ids, &mut o.out, &mut o.spare, |b, out| {
                let event = match b {
                    Back::Dispatched { purpose, result } => {
                        RootEvent::Dispatched { purpose, result }
                    }
                    // The root never replaces a request body.
                    Back::BodyNotSet { .. } => return,
                };
                machine.handle(host, event, out);
            });
            answer
        })
    }

    pub fn on_configure(&mut self, _size: usize) -> bool {
        self.run(RootEvent::Configure)
    }

    pub fn on_tick(&mut self) {
        self.run(RootEvent::Tick);
    }

    pub fn on_done(&mut self) -> bool {
        self.run(RootEvent::Done)
    }

    pub fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        let (status, body) = call_answer(self.host, body);
        self.run(RootEvent::CallResponse {
            token,
            status,
            body,
        });
    }

    pub fn create_http_context(&self) -> Option<Http<'h, H>> {
        Some(Http {
            machine: self.machine.create_http_context()?,
            host: self.host,
            vm: self.vm.clone(),
        })
    }
}

/// One request's context over a host.
pub struct Http<'h, H: Host> {
    machine: GatewayHttp,
    host: &'h H,
    vm: Rc<Vm>,
}

impl<H: Host> Http<'_, H> {
    /// Runs one event; a callout's dispatch result or a refused body decides the flow instead.
    fn run(&mut self, event: Event) -> Flow {
        let (host, ids, machine) = (self.host, &self.vm.ids, &mut self.machine);
        with_outbox(&self.vm.outbox, |o| {
            let mut flow = machine.handle(host, event, &mut o.out);
            drain(host, ids, &mut o.out, &mut o.spare, |b, out| {
                let event = match b {
                    Back::Dispatched { purpose, result } => Event::Dispatched { purpose, result },
                    Back::BodyNotSet { status } => Event::BodyNotSet { status },
                };
                flow = machine.handle(host, event, out);
            });
            flow
        })
    }

    pub fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Flow {
        // One host call for all request headers, as bytes.
        let headers = self.host.headers(Map::RequestHeaders).unwrap_or_default();
        self.run(Event::RequestHeaders {
            headers,
            end_of_stream,
        })
    }

    pub fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Flow {
        self.run(Event::RequestBody {
            size,
            end_of_stream,
        })
    }

    pub fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Flow {
        self.run(Event::ResponseHeaders { end_of_stream })
    }

    pub fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Flow {
        self.run(Event::ResponseBody {
            size,
            end_of_stream,
        })
    }

    pub fn on_http_call_response(&mut self, token: u32, _headers: usize, body: usize, _t: usize) {
        let (status, body) = call_answer(self.host, body);
        self.run(Event::CallResponse {
            token,
            status,
            body,
        });
    }

    pub fn on_log(&mut self) {
        self.run(Event::Log);
    }
}
