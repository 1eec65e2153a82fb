//! The proxy-wasm ABI calls the filter makes, declared directly so that no host answer can panic the VM.
//!
//! The Rust SDK's `hostcalls` wrappers `panic!` on any status they do not expect and unwrap
//! `String::from_utf8` on header maps; one header byte >= 0x80 (or a map not available in a phase)
//! would kill the worker's VM. Here every call returns a `Result` with the raw status, every map is
//! read as bytes, and every serialized map is read in place with bounds checks ([`crate::hostapi::Headers`]).
//! The callbacks the host makes into the module are exported by [`crate::host`].

#[allow(unused_imports)]
use crate::prelude::*;

use crate::hostapi::{self, Buffer, Headers, Map, MetricKind};
use core::ptr::{null, null_mut};

/// A status the host answered other than `Ok`.
pub type Status = u32;
const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_done() -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
}

fn status(s: u32) -> Result<(), Status> {
    if s == OK {
        Ok(())
    } else {
        Err(s)
    }
}

/// Takes ownership of memory the host allocated through `proxy_on_memory_allocate` ([`crate::host`])
/// (an allocation of exactly `size` bytes).
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host wrote `size` bytes into a buffer it obtained from proxy_on_memory_allocate(size),
    // which leaks a `Vec<u8>` of exactly that capacity; we are its only owner.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn map_id(m: Map) -> u32 {
    match m {
        Map::RequestHeaders => 0,
        Map::ResponseHeaders => 2,
        Map::CallResponseHeaders => 6,
    }
}

fn buffer_id(b: Buffer) -> u32 {
    match b {
        Buffer::RequestBody => 0,
        Buffer::ResponseBody => 1,
        Buffer::CallResponseBody => 4,
        Buffer::PluginConfiguration => 7,
    }
}

/// The real host: Envoy, through the proxy-wasm ABI.
#[derive(Clone, Copy, Default)]
pub struct Wasm;

impl hostapi::Read for Wasm {
    fn headers(&self, map: Map) -> Result<Headers, Status> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers to locals; the returned buffer is taken over by `owned`.
        let s = unsafe { proxy_get_header_map_pairs(map_id(map), &mut data, &mut size) };
        let bytes = owned(data, size);
        status(s)?;
        Ok(Headers::from_serialized(bytes))
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `name` outlives the call; out-pointers to locals.
        let s = unsafe {
            proxy_get_header_map_value(map_id(map), name.as_ptr(), name.len(), &mut data, &mut size)
        };
        let bytes = owned(data, size);
        match s {
            // Ok with no data is a present, empty value (absent is NotFound): e.g. the emptied
            // shared record that marks a revoked key, or an empty header.
            OK => Ok(Some(bytes)),
            NOT_FOUND => Ok(None),
            e => Err(e),
        }
    }

    fn buffer(&self, b: Buffer, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: out-pointers to locals.
        let s = unsafe { proxy_get_buffer_bytes(buffer_id(b), start, max, &mut data, &mut size) };
        let bytes = owned(data, size);
        match s {
            OK => Ok(bytes),
            NOT_FOUND => Ok(Vec::new()),
            e => Err(e),
        }
    }

    fn shared_get(&self, key: &str) -> Result<Option<Vec<u8>>, Status> {
        let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
        // SAFETY: `key` outlives the call; out-pointers to locals.
        let s = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        let bytes = owned(data, size);
        match s {
            // Ok with no data is a present, empty value (absent is NotFound): e.g. the emptied
            // shared record that marks a revoked key, or an empty header.
            OK => Ok(Some(bytes)),
            NOT_FOUND => Ok(None),
            e => Err(e),
        }
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        let p = hostapi::encode_path(path);
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: `p` outlives the call; out-pointers to locals.
        let s = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
        let bytes = owned(data, size);
        match s {
            // Ok with no data is a present, empty value (absent is NotFound): e.g. the emptied
            // shared record that marks a revoked key, or an empty header.
            OK => Ok(Some(bytes)),
            NOT_FOUND => Ok(None),
            e => Err(e),
        }
    }

    fn now_ms(&self) -> u64 {
        let mut ns = 0u64;
        // SAFETY: out-pointer to a local.
        match unsafe { proxy_get_current_time_nanoseconds(&mut ns) } {
            OK => ns / 1_000_000,
            _ => 0,
        }
    }
}

impl hostapi::Host for Wasm {
    fn set_header(&self, map: Map, name: &str, value: &[u8]) -> Result<(), Status> {
        // SAFETY: both slices outlive the call.
        status(unsafe {
            proxy_replace_header_map_value(
                map_id(map),
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn remove_header(&self, map: Map, name: &str) -> Result<(), Status> {
        // SAFETY: `name` outlives the call.
        status(unsafe { proxy_remove_header_map_value(map_id(map), name.as_ptr(), name.len()) })
    }

    fn set_buffer(&self, b: Buffer, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
        // SAFETY: `data` outlives the call.
        status(unsafe {
            proxy_set_buffer_bytes(buffer_id(b), start, size, data.as_ptr(), data.len())
        })
    }

    fn send_response(
        &self,
        code: u32,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<(), Status> {
        let map = hostapi::encode_pairs(headers);
        // SAFETY: all slices outlive the call.
        status(unsafe {
            proxy_send_local_response(
                code,
                null(),
                0,
                body.as_ptr(),
                body.len(),
                map.as_ptr(),
                map.len(),
                -1,
            )
        })
    }

    fn call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, Status> {
        let map = hostapi::encode_map(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let trailers = hostapi::encode_pairs(&[]);
        let mut token = 0u32;
        // SAFETY: every pointer refers to a live buffer of the given length; `token` outlives the call.
        status(unsafe {
            proxy_http_call(
                cluster.as_ptr(),
                cluster.len(),
                map.as_ptr(),
                map.len(),
                body.as_ptr(),
                body.len(),
                trailers.as_ptr(),
                trailers.len(),
                u32::try_from(timeout_ms).unwrap_or(u32::MAX),
                &mut token,
            )
        })?;
        crate::host::register_callout(token);
        Ok(token)
    }

    fn resume_request(&self) -> Result<(), Status> {
        // SAFETY: no pointers.
        status(unsafe { proxy_continue_stream(0) })
    }

    fn shared_set(&self, key: &str, value: Option<&[u8]>) -> Result<(), Status> {
        let (ptr, len) = value.map_or((null(), 0), |v| (v.as_ptr(), v.len()));
        // SAFETY: `key` and `value` outlive the call.
        status(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), ptr, len, 0) })
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let mut id = 0u32;
        let kind = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        // SAFETY: `name` outlives the call; out-pointer to a local.
        status(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, by: u64) {
        // SAFETY: no pointers.
        let _ = unsafe { proxy_increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX)) };
    }

    fn add_gauge(&self, id: u32, delta: i64) {
        // SAFETY: no pointers.
        let _ = unsafe { proxy_increment_metric(id, delta) };
    }

    fn record_metric(&self, id: u32, value: u64) {
        // SAFETY: no pointers.
        let _ = unsafe { proxy_record_metric(id, value) };
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        let p = hostapi::encode_path(path);
        // SAFETY: both slices outlive the call.
        status(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
    }

    fn set_tick_ms(&self, ms: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        status(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    fn done(&self) -> Result<(), Status> {
        // SAFETY: no pointers.
        status(unsafe { proxy_done() })
    }

    fn log(&self, level: hostapi::Level, msg: &str) {
        let level = match level {
            hostapi::Level::Info => 2,
            hostapi::Level::Warn => 3,
            hostapi::Level::Error => 4,
        };
        // SAFETY: `msg` outlives the call. A failed log is ignored (nothing better to do with it).
        let _ = unsafe { proxy_log(level, msg.as_ptr(), msg.len()) };
    }
}

impl Wasm {
    /// Makes `context_id` the context later host calls act on (a callout's answer arrives on the
    /// root context; the request that made the callout must be the one resumed or answered).
    pub fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        status(unsafe { proxy_set_effective_context(context_id) })
    }
}
