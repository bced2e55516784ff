//! The engine's rayon pools: one per thread count in use, the engine-wide count set by
//! `set_num_threads` or `ATTNSCOPE_NUM_THREADS`, and any call may ask for its own count.
//!
//! Dedicated pools (not rayon's global one) let the thread count change at run time, let two
//! callers use different counts at the same time, and keep the engine from competing with a
//! host application's own use of rayon.

use std::sync::{Arc, OnceLock, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::AttnError;

/// The environment variable read at first use for the engine-wide thread count.
pub const NUM_THREADS_ENV: &str = "ATTNSCOPE_NUM_THREADS";
/// More worker threads than this is a mistake, not a configuration.
pub const MAX_THREADS: usize = 1024;
/// Below this many multiply-adds an attention call runs its tasks on the calling thread: waking
/// the pool would cost more than it saves.
pub(crate) const ATTENTION_INLINE_WORK: usize = 1 << 18;
/// Below this many multiply-adds a projection (`linear`) runs on the calling thread; gemm's
/// parallel split pays off sooner than attention's tasks.
pub(crate) const PROJECTION_INLINE_WORK: usize = 1 << 16;
/// Up to this many values (keys and values together) an `append` converts on the calling
/// thread, as it does a decoding step's few rows; a longer chunk spreads its heads over the
/// pool.
pub(crate) const APPEND_INLINE_VALUES: usize = 1 << 16;
/// Pools kept for counts other than the engine-wide one; older ones are dropped (a call still
/// running on one keeps it alive until it returns).
const SPARE_POOLS: usize = 4;

/// Checks a thread count against the one rule every way of setting it follows.
pub fn check_thread_count(threads: usize) -> Result<usize, AttnError> {
    if (1..=MAX_THREADS).contains(&threads) {
        Ok(threads)
    } else {
        Err(AttnError::value(
            "num_threads",
            format!("must be between 1 and {MAX_THREADS}, got {threads}"),
        ))
    }
}

/// The count `ATTNSCOPE_NUM_THREADS` asks for, or the CPU count when it is unset. A value that
/// is not a whole number in range is an error: silently ignoring it would hide a typo.
fn count_from_environment() -> Result<usize, AttnError> {
    let Some(raw) = std::env::var_os(NUM_THREADS_ENV) else {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    };
    let text = raw.to_string_lossy();
    match text.trim().parse::<usize>() {
        Ok(threads) if (1..=MAX_THREADS).contains(&threads) => Ok(threads),
        _ => Err(AttnError::value(
            NUM_THREADS_ENV,
            format!(
                "must be a whole number between 1 and {MAX_THREADS}, got {text:?}; fix or unset \
                 the variable, or call set_num_threads()"
            ),
        )),
    }
}

fn build(threads: usize) -> Result<Arc<ThreadPool>, AttnError> {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("attnscope-{index}"))
        .build()
        .map(Arc::new)
        .map_err(|error| {
            AttnError::value(
                "num_threads",
                format!("cannot start {threads} threads: {error}"),
            )
        })
}

#[derive(Default)]
struct Pools {
    /// The engine-wide count and its pool, once set or read from the environment.
    global: Option<(usize, Arc<ThreadPool>)>,
    /// Pools for per-call counts, most recently used last.
    spare: Vec<(usize, Arc<ThreadPool>)>,
}

impl Pools {
    fn find(&self, threads: usize) -> Option<Arc<ThreadPool>> {
        std::iter::once(&self.global)
            .flatten()
            .chain(&self.spare)
            .find(|(count, _)| *count == threads)
            .map(|(_, pool)| Arc::clone(pool))
    }

    /// The pool of `threads` workers, started if none exists.
    fn find_or_build(&self, threads: usize) -> Result<Arc<ThreadPool>, AttnError> {
        self.find(threads).map_or_else(|| build(threads), Ok)
    }

    /// Keeps `pool` for later calls that ask for its count, dropping the oldest spare.
    fn keep_spare(&mut self, threads: usize, pool: Arc<ThreadPool>) {
        self.spare.retain(|(count, _)| *count != threads);
        if self.spare.len() == SPARE_POOLS {
            self.spare.remove(0);
        }
        self.spare.push((threads, pool));
    }
}

fn pools() -> &'static RwLock<Pools> {
    static POOLS: OnceLock<RwLock<Pools>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

/// The engine-wide count and pool, read from the environment at first use.
fn global() -> Result<(usize, Arc<ThreadPool>), AttnError> {
    if let Some((threads, pool)) = &pools().read().unwrap_or_else(|e| e.into_inner()).global {
        return Ok((*threads, Arc::clone(pool)));
    }
    let mut guard = pools().write().unwrap_or_else(|e| e.into_inner());
    if guard.global.is_none() {
        let threads = count_from_environment()?;
        guard.global = Some((threads, guard.find_or_build(threads)?));
    }
    let (threads, pool) = guard.global.as_ref().expect("the global pool was just set");
    Ok((*threads, Arc::clone(pool)))
}

/// The pool a call runs on: `requested` workers, or the engine-wide count when `None`.
pub(crate) fn pool_for(requested: Option<usize>) -> Result<Arc<ThreadPool>, AttnError> {
    let Some(threads) = requested else {
        return global().map(|(_, pool)| pool);
    };
    check_thread_count(threads)?;
    if let Some(found) = pools()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .find(threads)
    {
        return Ok(found);
    }
    let mut guard = pools().write().unwrap_or_else(|e| e.into_inner());
    let pool = guard.find_or_build(threads)?;
    guard.keep_spare(threads, Arc::clone(&pool));
    Ok(pool)
}

/// The engine-wide number of worker threads.
pub fn num_threads() -> Result<usize, AttnError> {
    global().map(|(threads, _)| threads)
}

/// Sets the engine-wide thread count. Calls already running finish on their pool.
pub fn set_num_threads(threads: usize) -> Result<(), AttnError> {
    check_thread_count(threads)?;
    let mut guard = pools().write().unwrap_or_else(|e| e.into_inner());
    let pool = guard.find_or_build(threads)?;
    guard.spare.retain(|(count, _)| *count != threads);
    if let Some((previous, old_pool)) = guard.global.replace((threads, pool)) {
        // The old engine-wide pool stays at hand for calls that ask for its count.
        if previous != threads {
            guard.keep_spare(previous, old_pool);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outside_the_rule_are_refused() {
        for bad in [0, MAX_THREADS + 1, usize::MAX] {
            let error = check_thread_count(bad).unwrap_err().to_string();
            assert!(
                error.starts_with("num_threads: must be between 1 and"),
                "{error}"
            );
            assert!(pool_for(Some(bad)).is_err());
        }
        assert_eq!(check_thread_count(3), Ok(3));
    }

    #[test]
    fn a_requested_count_gets_a_pool_of_that_size() {
        for threads in [1, 3, 2, 3] {
            assert_eq!(
                pool_for(Some(threads)).unwrap().current_num_threads(),
                threads
            );
        }
    }
}
