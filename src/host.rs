//! The proxy-wasm adapter: the only code that knows Envoy's callbacks. It exports the ABI's
//! callbacks itself (no SDK dispatcher: it `panic!`s on unknown context ids and tokens and its trait
//! objects keep every default method in the module), keeps the VM's contexts, and hands each
//! callback to [`crate::adapter`] over the real host ([`Wasm`], the filter's own ABI layer), which
//! turns it into an event for the exchange machine and applies the effects the machine returns; no
//! decision here.
//!
//! A callback that finds no context for its id (or a callout token nobody owns) does nothing: the
//! host never sends one, and a VM must not die for it.

#[allow(unused_imports)]
use crate::prelude::*;

use crate::abi::Wasm;
use crate::adapter;
use crate::exchange::Flow;
use crate::hostapi::{Host, Level};
use crate::sys::VmLocal;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

static HOST: Wasm = Wasm;

type Root = adapter::Root<'static, Wasm>;
type Http = adapter::Http<'static, Wasm>;

/// What the VM keeps between callbacks: its root contexts (one per plugin sharing the VM), its
/// request contexts, and which context made each pending callout.
#[derive(Default)]
struct Contexts {
    roots: Vec<(u32, Root)>,
    streams: hashbrown::HashMap<u32, Http>,
}

static CONTEXTS: VmLocal<RefCell<Option<Contexts>>> = VmLocal(RefCell::new(None));
/// The context whose callback is running: a callout it dispatches belongs to it.
static ACTIVE: VmLocal<Cell<u32>> = VmLocal(Cell::new(0));
/// Pending callouts: (token, context id).
static CALLOUTS: VmLocal<RefCell<Vec<(u32, u32)>>> = VmLocal(RefCell::new(Vec::new()));

/// Records that the running context dispatched callout `token` ([`Wasm::call`]).
pub(crate) fn register_callout(token: u32) {
    if let Ok(mut c) = CALLOUTS.0.try_borrow_mut() {
        c.push((token, ACTIVE.0.get()));
    }
}

/// Runs `f` on the VM's contexts (none while another callback holds them: never, single-threaded
/// and the host does not re-enter).
fn with<R>(context_id: u32, f: impl FnOnce(&mut Contexts) -> R) -> Option<R> {
    let mut guard = CONTEXTS.0.try_borrow_mut().ok()?;
    let contexts = guard.get_or_insert_with(Contexts::default);
    ACTIVE.0.set(context_id);
    Some(f(contexts))
}

fn root(c: &mut Contexts, id: u32) -> Option<&mut Root> {
    c.roots.iter_mut().find(|(i, _)| *i == id).map(|(_, r)| r)
}

fn on_stream<R>(id: u32, f: impl FnOnce(&mut Http) -> R) -> Option<R> {
    with(id, |c| c.streams.get_mut(&id).map(f)).flatten()
}

fn on_root<R>(id: u32, f: impl FnOnce(&mut Root) -> R) -> Option<R> {
    with(id, |c| root(c, id).map(f)).flatten()
}

/// The ABI's `Action`: 0 continue, 1 pause.
fn action(f: Option<Flow>) -> u32 {
    match f {
        Some(Flow::Pause) => 1,
        Some(Flow::Continue) | None => 0,
    }
}

/// `log` records go to Envoy through the host.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, r: &log::Record) {
        let level = match r.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug | log::Level::Trace => return,
        };
        HOST.log(level, &alloc::format!("{}", r.args()));
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The module's initializer (a WASI reactor): static constructors, then the logger. (Panics are
/// logged by the panic handler, [`crate::sys`].)
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once by the host before any other export, as the reactor ABI requires.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host writes into (header maps, buffers, properties); the filter takes ownership of it
/// with the exact length asked for (`abi::owned`).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::with_capacity(size);
    let p = v.as_mut_ptr();
    if v.capacity() != size {
        return core::ptr::null_mut();
    }
    core::mem::forget(v);
    p
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    with(context_id, |c| {
        if parent_id == 0 {
            if root(c, context_id).is_none() {
                c.roots.push((context_id, adapter::Root::new(&HOST)));
            }
        } else if let Some(http) = root(c, parent_id).and_then(|r| r.create_http_context()) {
            c.streams.insert(context_id, http);
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, size: usize) -> bool {
    on_root(context_id, |r| r.on_configure(size)).unwrap_or(false)
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    on_root(context_id, |r| r.on_tick());
}

#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    with(context_id, |c| match root(c, context_id) {
        Some(r) => r.on_done(),
        None => true,
    })
    .unwrap_or(true)
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    on_stream(context_id, |h| h.on_log());
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with(context_id, |c| {
        if c.streams.remove(&context_id).is_none() {
            c.roots.retain(|(i, _)| *i != context_id);
        }
    });
    if let Ok(mut calls) = CALLOUTS.0.try_borrow_mut() {
        calls.retain(|(_, owner)| *owner != context_id);
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, n: usize, end_of_stream: bool) -> u32 {
    action(on_stream(context_id, |h| {
        h.on_http_request_headers(n, end_of_stream)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, size: usize, end_of_stream: bool) -> u32 {
    action(on_stream(context_id, |h| {
        h.on_http_request_body(size, end_of_stream)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(_context_id: u32, _n: usize) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context_id: u32, n: usize, end_of_stream: bool) -> u32 {
    action(on_stream(context_id, |h| {
        h.on_http_response_headers(n, end_of_stream)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, size: usize, end_of_stream: bool) -> u32 {
    action(on_stream(context_id, |h| {
        h.on_http_response_body(size, end_of_stream)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(_context_id: u32, _n: usize) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    _context_id: u32,
    token: u32,
    headers: usize,
    body: usize,
    trailers: usize,
) {
    let owner = {
        let Ok(mut calls) = CALLOUTS.0.try_borrow_mut() else {
            return;
        };
        let Some(i) = calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        calls.swap_remove(i).1
    };
    // Host calls made while handling the answer (resume, local reply, headers) act on the owner.
    if HOST.set_effective_context(owner).is_err() {
        return;
    }
    with(owner, |c| {
        if let Some(h) = c.streams.get_mut(&owner) {
            h.on_http_call_response(token, headers, body, trailers);
        } else if let Some(r) = root(c, owner) {
            r.on_http_call_response(token, headers, body, trailers);
        }
    });
}
