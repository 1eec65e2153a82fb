//! What the standard prelude would give, for the `no_std` filter build (on the host the same names).

pub use alloc::borrow::ToOwned;
pub use alloc::boxed::Box;
pub use alloc::string::{String, ToString};
pub use alloc::vec::Vec;
