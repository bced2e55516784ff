//! Engine-wide limits that a user may set: how large a weights array `return_weights` (and the
//! layer's `need_weights`) may allocate. The thread count, the other engine-wide setting, lives
//! with its pools in `threads`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::AttnError;

/// The environment variable read for the initial weights memory limit, in bytes.
pub const WEIGHTS_LIMIT_ENV: &str = "ATTNSCOPE_WEIGHTS_LIMIT_BYTES";
/// The weights memory limit when neither the variable nor `set_weights_memory_limit` sets one.
pub const DEFAULT_WEIGHTS_LIMIT: u64 = 2 << 30;
const LIMIT_UNSET: u64 = u64::MAX;
static WEIGHTS_LIMIT: AtomicU64 = AtomicU64::new(LIMIT_UNSET);

/// The largest weights array, in bytes, that `return_weights` may allocate. A value of the
/// environment variable that is not a whole number of bytes is an error, as a bad
/// `ATTNSCOPE_NUM_THREADS` is: silently ignoring it would hide a typo.
pub fn weights_memory_limit() -> Result<u64, AttnError> {
    match WEIGHTS_LIMIT.load(Ordering::Relaxed) {
        LIMIT_UNSET => limit_from_environment(),
        limit => Ok(limit),
    }
}

fn limit_from_environment() -> Result<u64, AttnError> {
    let Some(raw) = std::env::var_os(WEIGHTS_LIMIT_ENV) else {
        return Ok(DEFAULT_WEIGHTS_LIMIT);
    };
    let text = raw.to_string_lossy();
    match text.trim().parse::<u64>() {
        Ok(limit) => Ok(limit.min(LIMIT_UNSET - 1)),
        Err(_) => Err(AttnError::value(
            WEIGHTS_LIMIT_ENV,
            format!(
                "must be a whole number of bytes, got {text:?}; fix or unset the variable, or \
                 call set_weights_memory_limit()"
            ),
        )),
    }
}

/// Sets the weights memory limit in bytes.
pub fn set_weights_memory_limit(bytes: u64) {
    WEIGHTS_LIMIT.store(bytes.min(LIMIT_UNSET - 1), Ordering::Relaxed);
}
