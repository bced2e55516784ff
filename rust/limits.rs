//! Engine-wide limits that a user may set: how large a weights array `return_weights` (and the
//! layer's `need_weights`) may allocate. The thread count, the other engine-wide setting, lives
//! with its pools in `threads`.

use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable read for the initial weights memory limit, in bytes.
pub const WEIGHTS_LIMIT_ENV: &str = "ATTNSCOPE_WEIGHTS_LIMIT_BYTES";
/// The weights memory limit when neither the variable nor `set_weights_memory_limit` sets one.
pub const DEFAULT_WEIGHTS_LIMIT: u64 = 2 << 30;
const LIMIT_UNSET: u64 = u64::MAX;
static WEIGHTS_LIMIT: AtomicU64 = AtomicU64::new(LIMIT_UNSET);

/// The largest weights array, in bytes, that `return_weights` may allocate.
pub fn weights_memory_limit() -> u64 {
    match WEIGHTS_LIMIT.load(Ordering::Relaxed) {
        LIMIT_UNSET => std::env::var(WEIGHTS_LIMIT_ENV)
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .filter(|&limit| limit != LIMIT_UNSET)
            .unwrap_or(DEFAULT_WEIGHTS_LIMIT),
        limit => limit,
    }
}

/// Sets the weights memory limit in bytes.
pub fn set_weights_memory_limit(bytes: u64) {
    WEIGHTS_LIMIT.store(bytes.min(LIMIT_UNSET - 1), Ordering::Relaxed);
}
