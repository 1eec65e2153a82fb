//! An OpenAI-compatible LLM gateway as a proxy-wasm filter for Envoy.
//!
//! The modules follow a request: [`entry`] (which endpoint) → [`auth`] (who is calling) →
//! [`select`] (which provider and model) → [`providers`] (how the upstream request must look) →
//! [`gateway`] (the composition). [`config`] compiles the configuration once into a read-only plan.
//! [`exchange`] is the per-request state machine (events in, effects out); [`adapter`] applies its
//! effects to a host; only `host` talks to Envoy; everything else is plain Rust tested on the host.

// The filter is `no_std` (its own panic handler and allocator, WASI called directly: src/sys.rs);
// on the host (tests, the sidecar, the fuzz targets) the same code builds with `std`.
#![cfg_attr(target_arch = "wasm32", no_std)]

#[macro_use]
extern crate alloc;

pub mod prelude;

pub mod access_log;
pub mod adapter;
pub mod api;
pub mod auth;
pub mod body;
pub mod config;
pub mod destination;
pub mod entry;
pub mod error;
pub mod exchange;
pub mod fallback;
pub mod gateway;
pub mod hostapi;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod pbstruct;
pub mod plan;
pub mod providers;
pub mod read;
pub mod report;
pub mod resolve;
pub mod select;
pub mod sse;
pub mod sys;
pub mod translate;
pub mod url;
pub mod usage;

#[cfg(test)]
mod bench_exchange;

/// `len` deterministic pseudo-random bytes (a 64-bit LCG), for the tests that hold the filter's own
/// codecs (SHA-256, base64) to the crates they replace.
#[cfg(test)]
pub(crate) fn test_bytes(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 56) as u8
        })
        .collect()
}

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod host;
