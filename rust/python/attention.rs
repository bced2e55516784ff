//! `scaled_dot_product_attention`, its log-sum-exp and its backward pass.

use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyTuple};

use super::arrays::{
    dtype_of, flag, input_array, input_error, is_dtype, parse_alignment, scale_value, type_name,
    typed_array, BorrowedMask,
};
use super::guarded;
use crate::{AttentionOptions, Float, Mask, Window};

/// The output as a new NumPy array, or `(output, weights)` when weights were computed.
pub(super) fn attention_result<'py, T: numpy::Element>(
    py: Python<'py>,
    output: ndarray::ArrayD<T>,
    weights: Option<ndarray::ArrayD<T>>,
) -> PyResult<Bound<'py, PyAny>> {
    let output = output.into_pyarray(py).into_any();
    match weights {
        Some(weights) => {
            let weights = weights.into_pyarray(py).into_any();
            Ok(PyTuple::new(py, [output, weights])?.into_any())
        }
        None => Ok(output),
    }
}

/// Runs attention for one element type with the GIL released.
#[expect(clippy::too_many_arguments, reason = "the Python arguments, parsed")]
pub(super) fn sdpa_typed<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    options: AttentionOptions,
    mods: &ScoreModArgs,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let all = [query, key, value];
    let (q, k, v) = (
        input_array::<T>(query, "query", all)?,
        input_array::<T>(key, "key", all)?,
        input_array::<T>(value, "value", all)?,
    );
    let borrowed_mask = BorrowedMask::borrow(attn_mask)?;
    // SAFETY: nothing in attnscope takes a mutable borrow of a NumPy array (every result is a
    // new array), so no Rust code can write these while the kernel reads them. This skips
    // rust-numpy's borrow bookkeeping, a measurable share of a tiny call; as with a tracked
    // borrow, Python code writing an input from another thread during the call is the
    // caller's race.
    let (q_view, k_view, v_view) = unsafe { (q.as_array(), k.as_array(), v.as_array()) };
    let mask = BorrowedMask::view(&borrowed_mask);
    let mods = mods.view();
    if return_lse {
        return sdpa_with_lse(py, [q_view, k_view, v_view], mask, &options, &mods);
    }
    let result = py.detach(|| {
        crate::scaled_dot_product_attention_with_mods(q_view, k_view, v_view, mask, &options, &mods)
    })?;
    attention_result(py, result.output, result.weights)
}

/// The options shared by the forward and the backward, checked (weights not asked for).
fn call_options(
    is_causal: &Bound<'_, PyAny>,
    scale: Option<&Bound<'_, PyAny>>,
    enable_gqa: &Bound<'_, PyAny>,
    causal_alignment: &Bound<'_, PyAny>,
    window: Option<(Option<usize>, Option<usize>)>,
    num_threads: Option<usize>,
) -> PyResult<AttentionOptions> {
    Ok(AttentionOptions {
        is_causal: flag(is_causal, "is_causal")?,
        alignment: parse_alignment(causal_alignment, "causal_alignment")?,
        window: window.map(|(left, right)| Window { left, right }),
        scale: scale_value(scale)?,
        enable_gqa: flag(enable_gqa, "enable_gqa")?,
        return_weights: false,
        num_threads,
    })
}

/// scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
/// causal_alignment, window, return_weights, num_threads, softcap=None, alibi_slopes=None,
/// return_lse=None) -- every argument is checked here and in the core; the Python wrapper only
/// turns `window=w` into its two sides, a mask expression into the `MaskExpr` it holds and
/// the slopes into float64.
#[pyfunction]
#[pyo3(signature = (query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, return_weights, num_threads, softcap=None, alibi_slopes=None, return_lse=None))]
#[expect(
    clippy::too_many_arguments,
    reason = "PyTorch's argument list, one by one"
)]
pub(super) fn scaled_dot_product_attention<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    is_causal: &Bound<'py, PyAny>,
    scale: Option<&Bound<'py, PyAny>>,
    enable_gqa: &Bound<'py, PyAny>,
    causal_alignment: &Bound<'py, PyAny>,
    window: Option<(Option<usize>, Option<usize>)>,
    return_weights: &Bound<'py, PyAny>,
    num_threads: Option<usize>,
    softcap: Option<&Bound<'py, PyAny>>,
    alibi_slopes: Option<&Bound<'py, PyAny>>,
    return_lse: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
        let mods = ScoreModArgs::parse(softcap, alibi_slopes)?;
        let shared = call_options(
            is_causal,
            scale,
            enable_gqa,
            causal_alignment,
            window,
            num_threads,
        )?;
        let options = AttentionOptions {
            return_weights: flag(return_weights, "return_weights")?,
            ..shared
        };
        let return_lse = match return_lse {
            Some(value) => flag(value, "return_lse")?,
            None => false,
        };
        // A type check, not a borrow: the array is borrowed once, in `sdpa_typed`.
        if is_dtype::<f32>(query) {
            sdpa_typed::<f32>(py, query, key, value, attn_mask, options, &mods, return_lse)
        } else if is_dtype::<f64>(query) {
            sdpa_typed::<f64>(py, query, key, value, attn_mask, options, &mods, return_lse)
        } else {
            Err(input_error("query", query))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The log-sum-exp out of the forward, and the backward pass that reads it.

pub(super) fn register_backward(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(
        scaled_dot_product_attention_backward,
        module
    )?)?;
    Ok(())
}

/// The forward with its log-sum-exp: `(output, lse)` or `(output, weights, lse)`.
pub(super) fn sdpa_with_lse<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    [query, key, value]: [ndarray::ArrayViewD<'_, T>; 3],
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &crate::ScoreMods<'_>,
) -> PyResult<Bound<'py, PyAny>> {
    let result = py.detach(|| {
        crate::scaled_dot_product_attention_with_lse(query, key, value, mask, options, mods)
    })?;
    let mut parts = vec![result.attention.output.into_pyarray(py).into_any()];
    if let Some(weights) = result.attention.weights {
        parts.push(weights.into_pyarray(py).into_any());
    }
    parts.push(result.lse.into_pyarray(py).into_any());
    Ok(PyTuple::new(py, parts)?.into_any())
}

/// `array` as an array of the query's element type `T`, or a TypeError naming `name`.
pub(super) fn same_dtype_array<'py, T: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
    query: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if let Some(typed) = typed_array::<T>(array)? {
        return Ok(typed);
    }
    if is_dtype::<f32>(array) || is_dtype::<f64>(array) {
        return Err(PyTypeError::new_err(format!(
            "{name} has dtype {} but query has {}; the backward pass computes in the forward's \
             dtype: convert {name} with .astype()",
            dtype_of(array),
            dtype_of(query)
        )));
    }
    Err(input_error(name, array))
}

/// The six arrays of a backward call, borrowed from Python.
pub(super) struct BackwardArrays<'py> {
    grad_out: Bound<'py, PyAny>,
    query: Bound<'py, PyAny>,
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
    out: Bound<'py, PyAny>,
    lse: Bound<'py, PyAny>,
}

/// Runs the backward pass for one element type with the GIL released.
pub(super) fn backward_typed<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    arrays: &BackwardArrays<'py>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    options: AttentionOptions,
    mods: &ScoreModArgs,
) -> PyResult<Bound<'py, PyAny>> {
    let all = [&arrays.query, &arrays.key, &arrays.value];
    let (q, k, v) = (
        input_array::<T>(&arrays.query, "query", all)?,
        input_array::<T>(&arrays.key, "key", all)?,
        input_array::<T>(&arrays.value, "value", all)?,
    );
    let grad_out = same_dtype_array::<T>(&arrays.grad_out, "grad_out", &arrays.query)?;
    let out = same_dtype_array::<T>(&arrays.out, "out", &arrays.query)?;
    let lse = same_dtype_array::<T>(&arrays.lse, "lse", &arrays.query)?;
    let borrowed_mask = BorrowedMask::borrow(attn_mask)?;
    // SAFETY: as in `sdpa_typed`: nothing in attnscope writes to a NumPy array it is given.
    let inputs = unsafe {
        crate::BackwardInputs {
            grad_out: grad_out.as_array(),
            query: q.as_array(),
            key: k.as_array(),
            value: v.as_array(),
            out: out.as_array(),
            lse: lse.as_array(),
        }
    };
    let mask = BorrowedMask::view(&borrowed_mask);
    let mods = mods.view();
    let grads = py.detach(|| {
        crate::scaled_dot_product_attention_backward_with_mods(inputs, mask, &options, &mods)
    })?;
    let parts = [grads.grad_query, grads.grad_key, grads.grad_value]
        .map(|grad| grad.into_pyarray(py).into_any());
    Ok(PyTuple::new(py, parts)?.into_any())
}

/// scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, attn_mask,
/// is_causal, scale, enable_gqa, causal_alignment, window, num_threads, softcap=None,
/// alibi_slopes=None) -> (dq, dk, dv).
#[pyfunction]
#[pyo3(signature = (grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, num_threads, softcap=None, alibi_slopes=None))]
#[expect(
    clippy::too_many_arguments,
    reason = "the forward's arguments, one by one, and its results"
)]
pub(super) fn scaled_dot_product_attention_backward<'py>(
    py: Python<'py>,
    grad_out: Bound<'py, PyAny>,
    query: Bound<'py, PyAny>,
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
    out: Bound<'py, PyAny>,
    lse: Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    is_causal: &Bound<'py, PyAny>,
    scale: Option<&Bound<'py, PyAny>>,
    enable_gqa: &Bound<'py, PyAny>,
    causal_alignment: &Bound<'py, PyAny>,
    window: Option<(Option<usize>, Option<usize>)>,
    num_threads: Option<usize>,
    softcap: Option<&Bound<'py, PyAny>>,
    alibi_slopes: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
        let mods = ScoreModArgs::parse(softcap, alibi_slopes)?;
        let options = call_options(
            is_causal,
            scale,
            enable_gqa,
            causal_alignment,
            window,
            num_threads,
        )?;
        let arrays = BackwardArrays {
            grad_out,
            query,
            key,
            value,
            out,
            lse,
        };
        if is_dtype::<f32>(&arrays.query) {
            backward_typed::<f32>(py, &arrays, attn_mask, options, &mods)
        } else if is_dtype::<f64>(&arrays.query) {
            backward_typed::<f64>(py, &arrays, attn_mask, options, &mods)
        } else {
            Err(input_error("query", &arrays.query))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Score modifiers: softcapping and ALiBi slopes (the Python wrapper passes float64 slopes).

/// `softcap=` and `alibi_slopes=` of a call, owned while the GIL is released.
pub(super) struct ScoreModArgs {
    softcap: Option<f64>,
    alibi_slopes: Option<Vec<f64>>,
}

impl ScoreModArgs {
    fn parse(
        softcap: Option<&Bound<'_, PyAny>>,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let softcap = match softcap {
            None => None,
            Some(cap) if cap.cast::<PyBool>().is_ok() => {
                return Err(PyTypeError::new_err(
                    "softcap must be a real number or None, got bool",
                ))
            }
            Some(cap) => Some(cap.extract::<f64>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "softcap must be a real number or None, got {}",
                    type_name(cap)
                ))
            })?),
        };
        let alibi_slopes = match alibi_slopes {
            None => None,
            Some(slopes) => Some(
                slopes
                    .extract::<numpy::PyReadonlyArray1<'_, f64>>()
                    .map_err(|_| {
                        PyTypeError::new_err(format!(
                            "alibi_slopes must be a 1-D float64 array, got {}",
                            type_name(slopes)
                        ))
                    })?
                    .as_array()
                    .to_vec(),
            ),
        };
        Ok(ScoreModArgs {
            softcap,
            alibi_slopes,
        })
    }

    fn view(&self) -> crate::ScoreMods<'_> {
        crate::ScoreMods {
            softcap: self.softcap,
            alibi_slopes: self.alibi_slopes.as_deref(),
        }
    }
}
