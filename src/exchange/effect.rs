//! What goes into the exchange machine ([`Event`], [`RootEvent`]) and what comes out ([`Effect`]).
//!
//! The machine never changes its host: every change it decides is an [`Effect`] pushed into the
//! outbox of the callback, in the order the host must apply it ([`crate::adapter::apply`] does, for
//! the real host and for the fake one). A callout's dispatch result comes back as
//! [`Event::Dispatched`] / [`RootEvent::Dispatched`], so the machine records or handles it itself.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::hostapi::{Buffer, Headers, Map, MetricKind, Read, Status};
use alloc::borrow::Cow;

/// One change to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    SetHeader {
        map: Map,
        name: &'static str,
        value: Cow<'static, [u8]>,
    },
    RemoveHeader {
        map: Map,
        name: &'static str,
    },
    /// Replaces `size` bytes of `buffer` from `start` with `data`.
    SetBuffer {
        buffer: Buffer,
        start: usize,
        size: usize,
        data: Vec<u8>,
    },
    /// A local reply (`send_response`).
    Reply {
        status: u32,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Resume the request paused in its headers or body.
    ResumeRequest,
    SharedSet {
        key: String,
        value: Vec<u8>,
    },
    /// Sets properties of one segment each, in order (the access log's filter state: one effect for
    /// the whole summary).
    SetProperties(Vec<(&'static str, String)>),
    SetTick {
        ms: u32,
    },
    /// The VM finished what it had to do after `on_done` returned false.
    Done,
    /// An HTTP callout; the dispatch result comes back as a `Dispatched` event with its `purpose`.
    /// (Boxed: callouts are rare, and every effect is as large as the largest.)
    Call(Box<Call>),
    /// Defines the metric `name` under the machine's own number `local` (once per number).
    DefineMetric {
        local: u32,
        kind: MetricKind,
        name: String,
    },
    Increment {
        local: u32,
        by: u64,
    },
    GaugeAdd {
        local: u32,
        delta: i64,
    },
    Record {
        local: u32,
        value: u64,
    },
}

/// An HTTP callout (to the sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub purpose: Purpose,
    pub cluster: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// What a callout is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// A request's key lookup (`/internal/v1/resolve`).
    Resolve,
    /// A key's first request on this VM learns its budgets and rate limits.
    FirstLimits,
    /// Root: a batch of usage records.
    Usage,
    /// Root: the renewal of this VM's allowances.
    Renewal,
    /// Root: the background refresh of a stale key (its digest).
    Refresh(String),
}

/// A callback of one request, as the machine sees it.
#[derive(Debug)]
pub enum Event {
    /// The request headers, read in one host call.
    RequestHeaders {
        headers: Headers,
        end_of_stream: bool,
    },
    /// `size` bytes of request body are buffered (read through the view only if needed).
    RequestBody {
        size: usize,
        end_of_stream: bool,
    },
    /// The response headers arrived (read through the view only for routed requests).
    ResponseHeaders {
        end_of_stream: bool,
    },
    ResponseBody {
        size: usize,
        end_of_stream: bool,
    },
    /// The request's callout answered: `:status` (`None`: no answer) and body.
    CallResponse {
        token: u32,
        status: Option<u32>,
        body: Vec<u8>,
    },
    /// The adapter dispatched a `Call` effect: its token, or the host's refusal.
    Dispatched {
        purpose: Purpose,
        result: Result<u32, Status>,
    },
    /// The adapter could not replace the request body (`SetBuffer` failed).
    BodyNotSet {
        status: Status,
    },
    Log,
}

/// A callback of the VM's root context.
#[derive(Debug)]
pub enum RootEvent {
    /// The plugin configuration is ready (read through the view).
    Configure,
    Tick,
    /// Envoy is done with the VM.
    Done,
    CallResponse {
        token: u32,
        status: Option<u32>,
        body: Vec<u8>,
    },
    Dispatched {
        purpose: Purpose,
        result: Result<u32, Status>,
    },
}

/// One callback's context: the read-only view of the host and the outbox of effects.
pub struct Cx<'a> {
    pub host: &'a dyn Read,
    pub out: &'a mut Vec<Effect>,
}

impl Cx<'_> {
    pub fn now_ms(&self) -> u64 {
        self.host.now_ms()
    }

    pub fn push(&mut self, e: Effect) {
        self.out.push(e);
    }

    pub fn set_header(
        &mut self,
        map: Map,
        name: &'static str,
        value: impl Into<Cow<'static, [u8]>>,
    ) {
        self.out.push(Effect::SetHeader {
            map,
            name,
            value: value.into(),
        });
    }

    pub fn remove_header(&mut self, map: Map, name: &'static str) {
        self.out.push(Effect::RemoveHeader { map, name });
    }

    /// Replaces the whole request body (`size` bytes as received) with `data`, and its `content-length`.
    pub fn replace_request_body(&mut self, size: usize, data: Vec<u8>) {
        let length = data.len().to_string();
        self.out.push(Effect::SetBuffer {
            buffer: Buffer::RequestBody,
            start: 0,
            size,
            data,
        });
        self.request_header("content-length", Some(length));
    }

    /// Replaces the response chunk at hand (`size` bytes) with `data`.
    pub fn replace_response_chunk(&mut self, size: usize, data: Vec<u8>) {
        self.out.push(Effect::SetBuffer {
            buffer: Buffer::ResponseBody,
            start: 0,
            size,
            data,
        });
    }

    /// A request header: set to `value`, or removed.
    pub fn request_header(&mut self, name: &'static str, value: Option<String>) {
        match value {
            Some(v) => self.set_header(Map::RequestHeaders, name, v.into_bytes()),
            None => self.remove_header(Map::RequestHeaders, name),
        }
    }
}
