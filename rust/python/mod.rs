//! The only code that knows Python (split by topic: `arrays`, `attention`, `cache`, `layer`,
//! `masks`): argument conversion and the checks only Python values
//! need (types, dtypes, byte order), dtype dispatch, errors, releasing the GIL around every
//! kernel call, and the last line of defence that turns a panic into a `RuntimeError`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::simd::{active_level, force_level, SimdLevel};
use crate::threads::MAX_THREADS;
use crate::AttnError;

impl From<AttnError> for PyErr {
    fn from(error: AttnError) -> PyErr {
        PyValueError::new_err(error.to_string())
    }
}

/// The last line of defence: a panic in the core is a bug, and it reaches Python as a
/// RuntimeError that says so (never as a `PanicException`, which `except Exception` misses).
fn guarded<R>(call: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        Err(PyRuntimeError::new_err(format!(
            "attnscope internal error (a bug in attnscope, please report it): {message}"
        )))
    })
}

/// A native-byte-order copy of a byte-swapped array (`'>f4'` on a little-endian machine), so
/// such input is computed on rather than refused; `None` for any other array.
mod arrays;
mod attention;
mod cache;
mod layer;
mod masks;

use arrays::thread_count;
use attention::{register_backward, scaled_dot_product_attention};
use cache::register_layer;
use masks::register_masks;

/// Sets the engine-wide thread count (`1..=MAX_THREADS`).
#[pyfunction]
fn set_num_threads(num_threads: &Bound<'_, PyAny>) -> PyResult<()> {
    Ok(crate::set_num_threads(thread_count(num_threads)?)?)
}

/// `num_threads` if it follows the thread-count rule, else the ValueError every setter raises.
#[pyfunction]
fn check_num_threads(num_threads: &Bound<'_, PyAny>) -> PyResult<usize> {
    thread_count(num_threads)
}

/// The engine-wide thread count; a bad `ATTNSCOPE_NUM_THREADS` is reported here.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(crate::num_threads()?)
}

/// Panics on purpose, so tests can check that a panic reaches Python as a RuntimeError.
#[pyfunction]
fn _panic_for_tests() -> PyResult<()> {
    guarded(|| panic!("a deliberate panic"))
}

#[pyfunction]
fn set_weights_memory_limit(num_bytes: u64) {
    crate::set_weights_memory_limit(num_bytes)
}

#[pyfunction]
fn get_weights_memory_limit() -> PyResult<u64> {
    crate::weights_memory_limit().map_err(Into::into)
}

/// The instruction set kernels run at: "avx512", "avx2" or "portable".
#[pyfunction]
fn simd_level() -> &'static str {
    active_level().name()
}

/// Forces an instruction set (None = automatic). For tests and benchmarks of each path.
#[pyfunction]
#[pyo3(signature = (level))]
fn force_simd_level(level: Option<&str>) -> PyResult<()> {
    let parsed = match level {
        None => None,
        Some(name) => Some(SimdLevel::from_name(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "level must be 'avx512', 'avx2', 'portable' or None, got {name:?}"
            ))
        })?),
    };
    Ok(force_level(parsed)?)
}

/// Whether this CPU can run an instruction set level.
#[pyfunction]
fn simd_level_supported(level: &str) -> PyResult<bool> {
    SimdLevel::from_name(level)
        .map(SimdLevel::is_supported)
        .ok_or_else(|| PyValueError::new_err(format!("unknown level {level:?}")))
}

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(scaled_dot_product_attention, module)?)?;
    register_backward(module)?;
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(check_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(_panic_for_tests, module)?)?;
    module.add("MAX_THREADS", MAX_THREADS)?;
    // The storages a float32 cache can keep (a float64 cache keeps float64): the one list.
    let storages: Vec<&str> = crate::Storage::ALL
        .iter()
        .map(|storage| storage.name::<f32>())
        .collect();
    module.add("STORAGES", PyTuple::new(module.py(), storages)?)?;
    module.add_function(wrap_pyfunction!(set_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(get_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(force_simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level_supported, module)?)?;
    register_layer(module)?;
    register_masks(module)?;
    Ok(())
}
