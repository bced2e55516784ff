//! The only file that knows Python: argument conversion, dtype dispatch, errors, and releasing
//! the GIL around every kernel call.

use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::simd::{active_level, force_level, SimdLevel};
use crate::{AttentionOptions, AttnError, CausalAlignment, Float, Mask, Window};

impl From<AttnError> for PyErr {
    fn from(error: AttnError) -> PyErr {
        PyValueError::new_err(error.to_string())
    }
}

fn dtype_error(name: &str, array: &Bound<'_, PyAny>) -> PyErr {
    let dtype = array
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| array.get_type().to_string());
    PyTypeError::new_err(format!(
        "{name} must be a float32 or float64 numpy array, got {dtype}"
    ))
}

fn parse_alignment(alignment: &str) -> PyResult<CausalAlignment> {
    match alignment {
        "top_left" => Ok(CausalAlignment::TopLeft),
        "bottom_right" => Ok(CausalAlignment::BottomRight),
        other => Err(PyValueError::new_err(format!(
            "causal_alignment must be 'top_left' or 'bottom_right', got {other:?}"
        ))),
    }
}

fn parse_scale(scale: Option<f64>) -> PyResult<Option<f64>> {
    match scale {
        Some(value) if !value.is_finite() => Err(PyValueError::new_err(format!(
            "scale must be finite, got {value}"
        ))),
        other => Ok(other),
    }
}

/// Runs attention for one element type with the GIL released.
#[allow(clippy::too_many_arguments)]
fn attend_typed<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    options: AttentionOptions,
) -> PyResult<Bound<'py, PyAny>> {
    let borrow = |array: &Bound<'py, PyAny>, name: &str| -> PyResult<PyReadonlyArrayDyn<'py, T>> {
        array
            .extract::<PyReadonlyArrayDyn<'py, T>>()
            .map_err(|_| dtype_error(name, array))
    };
    let (q, k, v) = (
        borrow(query, "query")?,
        borrow(key, "key")?,
        borrow(value, "value")?,
    );
    let bool_mask = match attn_mask {
        Some(mask) => mask.extract::<PyReadonlyArrayDyn<'py, bool>>().ok(),
        None => None,
    };
    let additive_mask = match (attn_mask, &bool_mask) {
        (Some(mask), None) => Some(mask.extract::<PyReadonlyArrayDyn<'py, T>>().map_err(|_| {
            PyTypeError::new_err(
                "attn_mask must be a bool array or a float array of the same dtype as query",
            )
        })?),
        _ => None,
    };
    let (q_view, k_view, v_view) = (q.as_array(), k.as_array(), v.as_array());
    let mask = match (&bool_mask, &additive_mask) {
        (Some(mask), _) => Mask::Bool(mask.as_array()),
        (_, Some(mask)) => Mask::Additive(mask.as_array()),
        _ => Mask::None,
    };
    let result =
        py.detach(|| crate::scaled_dot_product_attention(q_view, k_view, v_view, mask, &options))?;
    let output = result.output.into_pyarray(py).into_any();
    match result.weights {
        Some(weights) => {
            let weights = weights.into_pyarray(py).into_any();
            Ok(PyTuple::new(py, [output, weights])?.into_any())
        }
        None => Ok(output),
    }
}

/// scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
/// causal_alignment, window, return_weights) -- the arguments checked by the Python wrapper.
#[pyfunction]
#[pyo3(signature = (query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, return_weights))]
#[allow(clippy::too_many_arguments)]
fn scaled_dot_product_attention<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    is_causal: bool,
    scale: Option<f64>,
    enable_gqa: bool,
    causal_alignment: &str,
    window: Option<(Option<usize>, Option<usize>)>,
    return_weights: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let options = AttentionOptions {
        is_causal,
        alignment: parse_alignment(causal_alignment)?,
        window: window.map(|(left, right)| Window { left, right }),
        scale: parse_scale(scale)?,
        enable_gqa,
        return_weights,
    };
    // A type check, not a borrow: the array is borrowed once, in `attend_typed`.
    if query.cast::<PyArrayDyn<f32>>().is_ok() {
        attend_typed::<f32>(py, query, key, value, attn_mask, options)
    } else if query.cast::<PyArrayDyn<f64>>().is_ok() {
        attend_typed::<f64>(py, query, key, value, attn_mask, options)
    } else {
        Err(dtype_error("query", query))
    }
}

#[pyfunction]
fn set_num_threads(num_threads: usize) -> PyResult<()> {
    Ok(crate::set_num_threads(num_threads)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    crate::num_threads()
}

#[pyfunction]
fn set_weights_memory_limit(num_bytes: u64) {
    crate::set_weights_memory_limit(num_bytes)
}

#[pyfunction]
fn get_weights_memory_limit() -> u64 {
    crate::weights_memory_limit()
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
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(set_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(get_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(force_simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level_supported, module)?)?;
    Ok(())
}
