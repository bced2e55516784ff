//! The engine's own rayon pool, sized by `set_num_threads` or `ATTNSCOPE_NUM_THREADS`.
//!
//! A dedicated pool (not rayon's global one) lets the thread count change at run time and keeps
//! the engine from competing with a host application's own use of rayon.

use std::sync::{Arc, OnceLock, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::AttnError;

/// The environment variable read once, at first use, for the initial thread count.
pub const NUM_THREADS_ENV: &str = "ATTNSCOPE_NUM_THREADS";

struct Pool {
    threads: usize,
    pool: Arc<ThreadPool>,
}

fn default_threads() -> usize {
    std::env::var(NUM_THREADS_ENV)
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .filter(|&threads| threads >= 1)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn build(threads: usize) -> Result<Pool, AttnError> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("attnscope-{index}"))
        .build()
        .map_err(|error| {
            AttnError::value(
                "num_threads",
                format!("cannot start {threads} threads: {error}"),
            )
        })?;
    Ok(Pool {
        threads,
        pool: Arc::new(pool),
    })
}

fn slot() -> &'static RwLock<Option<Pool>> {
    static POOL: OnceLock<RwLock<Option<Pool>>> = OnceLock::new();
    POOL.get_or_init(|| RwLock::new(None))
}

/// The pool every kernel call runs on (created on first use).
pub(crate) fn pool() -> Arc<ThreadPool> {
    if let Some(existing) = slot().read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Arc::clone(&existing.pool);
    }
    let mut guard = slot().write().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let threads = default_threads();
        // Falling back to one thread beats failing a computation over a pool that won't start.
        *guard = Some(
            build(threads)
                .or_else(|_| build(1))
                .expect("a one-thread pool starts"),
        );
    }
    Arc::clone(&guard.as_ref().expect("pool was just set").pool)
}

/// The number of worker threads kernels use.
pub fn num_threads() -> usize {
    if let Some(existing) = slot().read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return existing.threads;
    }
    pool().current_num_threads()
}

/// Replaces the pool with one of `threads` workers. Calls already running finish on the old one.
pub fn set_num_threads(threads: usize) -> Result<(), AttnError> {
    if threads == 0 {
        return Err(AttnError::value("num_threads", "must be >= 1, got 0"));
    }
    let fresh = build(threads)?;
    *slot().write().unwrap_or_else(|e| e.into_inner()) = Some(fresh);
    Ok(())
}
