//! What the filter needs from the platform besides the proxy-wasm host: the wall clock, random
//! bits, the environment, memory, and what a panic leaves behind.
//!
//! On the host (tests, the sidecar, the fuzz targets) these are the standard library's. The filter
//! is `no_std` (issue 10, `.wasm` size: `std` brought its panic machinery, `RUST_BACKTRACE`
//! handling, stderr writing and WASI error tables, ~20 KB, none of which a proxy-wasm module can use):
//! there the clock is the proxy-wasm host's, random bits and the environment come from WASI calls
//! made here, memory from wasi-libc's `malloc`, and a panic is logged to Envoy before the VM traps.

#[allow(unused_imports)]
use crate::prelude::*;

/// A value of the VM's one thread: a `static` in the filter (a wasm VM in Envoy runs on one worker
/// thread), a `thread_local!` on the host, where tests run in parallel threads. Read with `with`.
#[cfg(target_arch = "wasm32")]
pub struct VmLocal<T>(pub T);

// SAFETY: a proxy-wasm module runs on one thread (no shared-memory threads in wasm32-wasip1).
#[cfg(target_arch = "wasm32")]
unsafe impl<T> Sync for VmLocal<T> {}

#[cfg(target_arch = "wasm32")]
impl<T> VmLocal<T> {
    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}

/// `static NAME: T = const_init;` kept per VM (see [`VmLocal`]).
#[cfg(target_arch = "wasm32")]
macro_rules! vm_local {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        $(#[$m])* static $name: $crate::sys::VmLocal<$t> = $crate::sys::VmLocal($init);
    };
}

#[cfg(not(target_arch = "wasm32"))]
macro_rules! vm_local {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        std::thread_local! { $(#[$m])* static $name: $t = const { $init }; }
    };
}

pub(crate) use vm_local;

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;

    pub fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn random_u64() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    }

    pub fn env_var(name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::hostapi::Read;

    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn random_get(buf: *mut u8, len: usize) -> u32;
        fn environ_sizes_get(count: *mut usize, buf_size: *mut usize) -> u32;
        fn environ_get(environ: *mut *mut u8, environ_buf: *mut u8) -> u32;
    }

    pub fn unix_now() -> u64 {
        crate::abi::Wasm.now_ms() / 1000
    }

    pub fn random_u64() -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: `b` is 8 writable bytes. On failure the bytes stay zero (ids then rely on the time).
        let _ = unsafe { random_get(b.as_mut_ptr(), b.len()) };
        u64::from_le_bytes(b)
    }

    pub fn env_var(name: &str) -> Option<String> {
        let (mut count, mut size) = (0usize, 0usize);
        // SAFETY: out-pointers to locals.
        if unsafe { environ_sizes_get(&mut count, &mut size) } != 0 || size == 0 {
            return None;
        }
        let mut ptrs: Vec<*mut u8> = vec![core::ptr::null_mut(); count];
        let mut buf = vec![0u8; size];
        // SAFETY: `ptrs` has room for `count` pointers and `buf` for `size` bytes, as the host said.
        if unsafe { environ_get(ptrs.as_mut_ptr(), buf.as_mut_ptr()) } != 0 {
            return None;
        }
        // The pointers point into `buf` as NUL-terminated `NAME=value` strings, one after another.
        buf.split(|b| *b == 0).find_map(|entry| {
            let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            String::from_utf8(value.to_vec()).ok()
        })
    }

    /// wasi-libc's allocator (dlmalloc), which the module links anyway.
    struct Malloc;

    #[link(name = "c")]
    extern "C" {
        fn malloc(size: usize) -> *mut u8;
        fn aligned_alloc(align: usize, size: usize) -> *mut u8;
        fn realloc(p: *mut u8, size: usize) -> *mut u8;
        fn free(p: *mut u8);
    }

    /// What `malloc` guarantees on wasm32 (wasi-libc: 16).
    const MALLOC_ALIGN: usize = 16;

    // SAFETY: the C allocator returns blocks aligned to MALLOC_ALIGN (aligned_alloc for more), or null.
    unsafe impl core::alloc::GlobalAlloc for Malloc {
        unsafe fn alloc(&self, l: core::alloc::Layout) -> *mut u8 {
            if l.align() <= MALLOC_ALIGN {
                malloc(l.size())
            } else {
                aligned_alloc(l.align(), l.size())
            }
        }

        unsafe fn dealloc(&self, p: *mut u8, _l: core::alloc::Layout) {
            free(p)
        }

        unsafe fn realloc(&self, p: *mut u8, l: core::alloc::Layout, size: usize) -> *mut u8 {
            if l.align() <= MALLOC_ALIGN {
                realloc(p, size)
            } else {
                let n = aligned_alloc(l.align(), size);
                if !n.is_null() {
                    core::ptr::copy_nonoverlapping(p, n, l.size().min(size));
                    free(p);
                }
                n
            }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Malloc = Malloc;

    /// A panic (there should be none: clippy denies the usual sources) is logged, then the VM traps.
    /// The message is formatted into a stack buffer: the panic may be an allocation failure.
    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        use crate::hostapi::{Host, Level};
        use core::fmt::Write;
        struct Buf {
            b: [u8; 512],
            n: usize,
        }
        impl Write for Buf {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                for c in s.chars() {
                    let mut tmp = [0u8; 4];
                    let e = c.encode_utf8(&mut tmp).as_bytes();
                    let end = self.n + e.len();
                    let Some(dst) = self.b.get_mut(self.n..end) else {
                        return Err(core::fmt::Error);
                    };
                    dst.copy_from_slice(e);
                    self.n = end;
                }
                Ok(())
            }
        }
        let mut buf = Buf { b: [0; 512], n: 0 };
        let _ = write!(buf, "llm-gateway panicked: {info}");
        let msg = buf
            .b
            .get(..buf.n)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("llm-gateway panicked");
        crate::abi::Wasm.log(Level::Error, msg);
        core::arch::wasm32::unreachable()
    }
}

/// Seconds since the Unix epoch; 0 if the clock is unavailable.
pub fn unix_now() -> u64 {
    imp::unix_now()
}

/// 64 random bits (for identifiers that must differ between VMs).
pub fn random_u64() -> u64 {
    imp::random_u64()
}

/// A variable of the process environment (in Envoy: the variables exposed to the VM); `None` if
/// unset, empty or not UTF-8.
pub fn env_var(name: &str) -> Option<String> {
    imp::env_var(name).filter(|v| !v.is_empty())
}
