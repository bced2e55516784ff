//! The only file that knows Python: argument conversion and the checks only Python values
//! need (types, dtypes, byte order), dtype dispatch, errors, releasing the GIL around every
//! kernel call, and the last line of defence that turns a panic into a `RuntimeError`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{
    IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArray, PyReadonlyArrayDyn, PyUntypedArray,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBool, PyTuple};

use crate::element::Element;
use crate::simd::{active_level, force_level, SimdLevel};
use crate::threads::{check_thread_count, MAX_THREADS};
use crate::{AttentionOptions, AttnError, CausalAlignment, Float, Mask, Window};

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
fn native_order_copy<'py>(array: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let Ok(dtype) = array.getattr("dtype") else {
        return Ok(None);
    };
    if dtype.getattr("isnative")?.is_truthy()? {
        return Ok(None);
    }
    let native = dtype.call_method1("newbyteorder", ("=",))?;
    Ok(Some(array.call_method1("astype", (native,))?))
}

/// Borrows `array` as `T` elements (copying a byte-swapped one to native order), or `None`
/// when it holds another element type.
fn borrow_as<'py, T: numpy::Element, D: ndarray::Dimension>(
    array: &Bound<'py, PyAny>,
) -> PyResult<Option<PyReadonlyArray<'py, T, D>>> {
    if let Ok(borrowed) = array.extract::<PyReadonlyArray<'py, T, D>>() {
        return Ok(Some(borrowed));
    }
    match native_order_copy(array)? {
        Some(native) => Ok(native.extract::<PyReadonlyArray<'py, T, D>>().ok()),
        None => Ok(None),
    }
}

/// The element type an array computes in: float32 or float64, whatever its byte order.
fn is_dtype<T: numpy::Element>(array: &Bound<'_, PyAny>) -> bool {
    if array.cast::<PyArrayDyn<T>>().is_ok() {
        return true;
    }
    let Ok(native) = native_order_copy(array) else {
        return false;
    };
    native.is_some_and(|copy| copy.cast::<PyArrayDyn<T>>().is_ok())
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "object".to_string(), |name| name.to_string())
}

fn dtype_of(array: &Bound<'_, PyAny>) -> String {
    array
        .getattr("dtype")
        .map_or_else(|_| type_name(array), |dtype| dtype.to_string())
}

/// The TypeError for `name` when it is not a float32 or float64 ndarray, worded for what it is.
fn input_error(name: &str, array: &Bound<'_, PyAny>) -> PyErr {
    if array.cast::<PyUntypedArray>().is_err() {
        return PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray, got {}; wrap it with numpy.asarray({name}, \
             dtype=numpy.float32)",
            type_name(array)
        ));
    }
    PyTypeError::new_err(format!(
        "{name} has dtype {}; attnscope computes in float32 or float64: convert with \
         {name}.astype(numpy.float32)",
        dtype_of(array)
    ))
}

/// The TypeError for inputs that are each float32 or float64 but not the same one.
fn mixed_dtypes_error(arrays: [&Bound<'_, PyAny>; 3]) -> PyErr {
    let [query, key, value] = arrays.map(dtype_of);
    PyTypeError::new_err(format!(
        "query, key and value must share one dtype, got {query}, {key} and {value}; convert \
         them with .astype()"
    ))
}

/// `array` as an array of the query's element type `T` (a byte-swapped one as a native-order
/// copy), or an error that explains why it is not one.
fn input_array<'py, T: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
    all: [&Bound<'py, PyAny>; 3],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if let Ok(typed) = array.cast::<PyArrayDyn<T>>() {
        return Ok(typed.clone());
    }
    if let Some(native) = native_order_copy(array)? {
        if let Ok(typed) = native.cast_into::<PyArrayDyn<T>>() {
            return Ok(typed);
        }
    }
    if is_dtype::<f32>(array) || is_dtype::<f64>(array) {
        Err(mixed_dtypes_error(all))
    } else {
        Err(input_error(name, array))
    }
}

/// A Python bool (or `numpy.bool_`), else a TypeError naming the argument.
fn flag(value: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    value.extract::<bool>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a bool, got {}", type_name(value)))
    })
}

/// A real number (not a bool) or None; the core refuses non-finite values.
fn scale_value(scale: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
    let Some(scale) = scale else {
        return Ok(None);
    };
    let refused = || {
        PyTypeError::new_err(format!(
            "scale must be a real number or None, got {}",
            type_name(scale)
        ))
    };
    if scale.cast::<PyBool>().is_ok() {
        return Err(refused());
    }
    scale.extract::<f64>().map(Some).map_err(|_| refused())
}

fn parse_alignment(alignment: &Bound<'_, PyAny>) -> PyResult<CausalAlignment> {
    match alignment.extract::<PyBackedStr>().as_deref() {
        Ok("top_left") => Ok(CausalAlignment::TopLeft),
        Ok("bottom_right") => Ok(CausalAlignment::BottomRight),
        _ => Err(PyValueError::new_err(format!(
            "causal_alignment must be 'top_left' or 'bottom_right', got {}",
            alignment.repr()?
        ))),
    }
}

/// A thread count under the one rule (`1..=MAX_THREADS`), whatever integer Python passed.
fn thread_count(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    let count = value.extract::<usize>().map_err(|_| {
        AttnError::value(
            "num_threads",
            format!("must be between 1 and {MAX_THREADS}, got {value}"),
        )
    })?;
    Ok(check_thread_count(count)?)
}

/// An attention mask borrowed from Python: bool (True = takes part) or additive floats.
enum BorrowedMask<'py, T: numpy::Element> {
    Bool(PyReadonlyArrayDyn<'py, bool>),
    Additive(PyReadonlyArrayDyn<'py, T>),
    Expr(crate::MaskExpr),
}

impl<'py, T: numpy::Element> BorrowedMask<'py, T> {
    /// A bool mask as it is; a float mask in `T` (a float mask of another precision is cast,
    /// a copy: the caller's array is never modified).
    fn borrow(mask: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(mask) = mask else {
            return Ok(None);
        };
        if let Ok(spec) = mask.cast::<PyTuple>() {
            return Ok(Some(BorrowedMask::Expr(mask_expr(spec)?)));
        }
        if let Ok(bools) = mask.extract::<PyReadonlyArrayDyn<'py, bool>>() {
            return Ok(Some(BorrowedMask::Bool(bools)));
        }
        if let Some(floats) = borrow_as::<T, ndarray::IxDyn>(mask)? {
            return Ok(Some(BorrowedMask::Additive(floats)));
        }
        if mask.cast::<PyUntypedArray>().is_err() {
            return Err(PyTypeError::new_err(format!(
                "attn_mask must be a numpy.ndarray, got {}; wrap it with numpy.asarray(attn_mask)",
                type_name(mask)
            )));
        }
        let kind: PyBackedStr = mask.getattr("dtype")?.getattr("kind")?.extract()?;
        if &*kind == "f" {
            let cast = mask.call_method1("astype", (numpy::dtype::<T>(mask.py()),))?;
            if let Some(floats) = borrow_as::<T, ndarray::IxDyn>(&cast)? {
                return Ok(Some(BorrowedMask::Additive(floats)));
            }
        }
        Err(PyTypeError::new_err(format!(
            "attn_mask has dtype {}; use a bool mask (True = may attend) or a float mask added \
             to the scores (-inf hides a key)",
            dtype_of(mask)
        )))
    }

    fn view(mask: &Option<Self>) -> Mask<'_, T> {
        match mask {
            Some(BorrowedMask::Bool(bools)) => Mask::Bool(bools.as_array()),
            Some(BorrowedMask::Additive(floats)) => Mask::Additive(floats.as_array()),
            Some(BorrowedMask::Expr(expr)) => Mask::Expr(expr),
            None => Mask::None,
        }
    }
}

/// The output as a new NumPy array, or `(output, weights)` when weights were computed.
fn attention_result<'py, T: numpy::Element>(
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
fn sdpa_typed<'py, T: Float + numpy::Element>(
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

/// scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
/// causal_alignment, window, return_weights, num_threads, softcap=None, alibi_slopes=None,
/// return_lse=None) -- every argument is checked here and in the core; the Python wrapper only
/// turns `window=w` into its two sides, a mask expression into its spec and the slopes into
/// float64.
#[pyfunction]
#[pyo3(signature = (query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, return_weights, num_threads, softcap=None, alibi_slopes=None, return_lse=None))]
#[expect(
    clippy::too_many_arguments,
    reason = "PyTorch's argument list, one by one"
)]
fn scaled_dot_product_attention<'py>(
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
        let options = AttentionOptions {
            is_causal: flag(is_causal, "is_causal")?,
            alignment: parse_alignment(causal_alignment)?,
            window: window.map(|(left, right)| Window { left, right }),
            scale: scale_value(scale)?,
            enable_gqa: flag(enable_gqa, "enable_gqa")?,
            return_weights: flag(return_weights, "return_weights")?,
            num_threads,
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
    register_backward(module)?;
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(check_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(_panic_for_tests, module)?)?;
    module.add("MAX_THREADS", MAX_THREADS)?;
    module.add_function(wrap_pyfunction!(set_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(get_weights_memory_limit, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(force_simd_level, module)?)?;
    module.add_function(wrap_pyfunction!(simd_level_supported, module)?)?;
    register_layer(module)?;
    register_masks(module)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The log-sum-exp out of the forward, and the backward pass that reads it.

fn register_backward(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(
        scaled_dot_product_attention_backward,
        module
    )?)?;
    Ok(())
}

/// The forward with its log-sum-exp: `(output, lse)` or `(output, weights, lse)`.
fn sdpa_with_lse<'py, T: Float + numpy::Element>(
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
fn same_dtype_array<'py, T: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
    query: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if let Ok(typed) = array.cast::<PyArrayDyn<T>>() {
        return Ok(typed.clone());
    }
    if let Some(native) = native_order_copy(array)? {
        if let Ok(typed) = native.cast_into::<PyArrayDyn<T>>() {
            return Ok(typed);
        }
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
struct BackwardArrays<'py> {
    grad_out: Bound<'py, PyAny>,
    query: Bound<'py, PyAny>,
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
    out: Bound<'py, PyAny>,
    lse: Bound<'py, PyAny>,
}

/// Runs the backward pass for one element type with the GIL released.
fn backward_typed<'py, T: Float + numpy::Element>(
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
fn scaled_dot_product_attention_backward<'py>(
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
        let options = AttentionOptions {
            is_causal: flag(is_causal, "is_causal")?,
            alignment: parse_alignment(causal_alignment)?,
            window: window.map(|(left, right)| Window { left, right }),
            scale: scale_value(scale)?,
            enable_gqa: flag(enable_gqa, "enable_gqa")?,
            return_weights: false,
            num_threads,
        };
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
// The multi-head attention layer and the KV cache. The Python classes in `attnscope._mha` check
// the argument types and own the weights; these functions borrow the arrays and run the layer.

fn register_layer(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<KvCacheCore>()?;
    module.add_function(wrap_pyfunction!(multi_head_attention_forward, module)?)?;
    Ok(())
}

enum CacheStore {
    F32(crate::KvCache<f32>),
    F64(crate::KvCache<f64>),
}

/// The element types a cache can hold, and how to find a cache of that type in the store.
trait CachedFloat: Float + numpy::Element {
    fn cache_in(store: &mut CacheStore) -> Option<&mut crate::KvCache<Self>>;
}

impl CachedFloat for f32 {
    fn cache_in(store: &mut CacheStore) -> Option<&mut crate::KvCache<f32>> {
        match store {
            CacheStore::F32(cache) => Some(cache),
            CacheStore::F64(_) => None,
        }
    }
}

impl CachedFloat for f64 {
    fn cache_in(store: &mut CacheStore) -> Option<&mut crate::KvCache<f64>> {
        match store {
            CacheStore::F64(cache) => Some(cache),
            CacheStore::F32(_) => None,
        }
    }
}

impl CacheStore {
    fn dtype(&self) -> &'static str {
        match self {
            CacheStore::F32(_) => <f32 as Element>::TYPE_NAME,
            CacheStore::F64(_) => <f64 as Element>::TYPE_NAME,
        }
    }

    fn typed<T: CachedFloat>(&mut self, what: &str) -> PyResult<&mut crate::KvCache<T>> {
        let dtype = self.dtype();
        T::cache_in(self).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "cache holds {dtype} keys and values but {what} is {}; create the KVCache with \
                 dtype=numpy.{}",
                T::TYPE_NAME,
                T::TYPE_NAME
            ))
        })
    }
}

macro_rules! with_cache {
    ($store:expr, $cache:ident => $body:expr) => {
        match $store {
            CacheStore::F32($cache) => $body,
            CacheStore::F64($cache) => $body,
        }
    };
}

fn borrow_typed<'py, T: CachedFloat, D: ndarray::Dimension>(
    array: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    borrow_as(array)?.ok_or_else(|| {
        let dims = D::NDIM.map_or(String::new(), |n| format!("{n}-D "));
        PyTypeError::new_err(format!(
            "{name} must be a {dims}numpy.{} array",
            T::TYPE_NAME
        ))
    })
}

/// The error for a second call on a cache that a call in another thread is using.
fn cache_in_use() -> PyErr {
    PyRuntimeError::new_err(
        "KVCache is in use by a call in another thread: a cache serves one decoding loop at a \
         time; give each thread its own KVCache, or wait for the other call to return",
    )
}

/// Keys and values of past tokens (see `attnscope.KVCache`).
#[pyclass(module = "attnscope._core")]
struct KvCacheCore {
    store: CacheStore,
}

impl KvCacheCore {
    fn borrow<'py>(slf: &Bound<'py, Self>) -> PyResult<PyRef<'py, Self>> {
        slf.try_borrow().map_err(|_| cache_in_use())
    }

    fn borrow_mut<'py>(slf: &Bound<'py, Self>) -> PyResult<PyRefMut<'py, Self>> {
        slf.try_borrow_mut().map_err(|_| cache_in_use())
    }

    fn cache_append_typed<T: CachedFloat>(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let (k, v) = (
            borrow_typed::<T, ndarray::Ix4>(k, "k")?,
            borrow_typed::<T, ndarray::Ix4>(v, "v")?,
        );
        let cache = self.store.typed::<T>("k")?;
        let (k_view, v_view) = (k.as_array(), v.as_array());
        Ok(py.detach(|| cache.append(k_view, v_view, num_threads))?)
    }

    fn cache_attend_typed<'py, T: CachedFloat>(
        &mut self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        options: crate::CacheAttendOptions,
        expr: Option<&crate::MaskExpr>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let q = borrow_typed::<T, ndarray::IxDyn>(q, "q")?;
        let cache = self.store.typed::<T>("q")?;
        let q_view = q.as_array();
        let mask = expr.map_or(Mask::None, Mask::Expr);
        let result = py.detach(|| cache.attend(q_view, mask, &options))?;
        Ok(result.output.into_pyarray(py).into_any())
    }
}

#[pymethods]
impl KvCacheCore {
    #[new]
    #[pyo3(signature = (num_kv_heads, head_dim, batch, dtype, capacity, storage, max_len, sinks))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_kv_heads: usize,
        head_dim: usize,
        batch: usize,
        dtype: &str,
        capacity: usize,
        storage: &str,
        max_len: Option<usize>,
        sinks: usize,
    ) -> PyResult<Self> {
        guarded(|| {
            let eviction = match max_len {
                Some(max_len) => Some(crate::Eviction::new(max_len, sinks)?),
                None if sinks > 0 => {
                    return Err(PyValueError::new_err(format!(
                        "sinks: {sinks} sink tokens need a bounded cache; set max_len too"
                    )))
                }
                None => None,
            };
            fn build<T: CachedFloat>(
                shape: (usize, usize, usize, usize),
                storage: &str,
                eviction: Option<crate::Eviction>,
            ) -> PyResult<crate::KvCache<T>> {
                let (kv_heads, head_dim, batch, capacity) = shape;
                let storage = crate::Storage::parse::<T>(storage)?;
                Ok(crate::KvCache::with_storage(
                    kv_heads, head_dim, batch, capacity, storage, eviction,
                )?)
            }
            let shape = (num_kv_heads, head_dim, batch, capacity);
            let store = match dtype {
                "float32" => CacheStore::F32(build(shape, storage, eviction)?),
                "float64" => CacheStore::F64(build(shape, storage, eviction)?),
                other => {
                    return Err(PyTypeError::new_err(format!(
                        "dtype must be float32 or float64, got {other}"
                    )))
                }
            };
            Ok(KvCacheCore { store })
        })
    }

    /// Appends `k` and `v`, each (batch, num_kv_heads, n, head_dim), converting a long chunk
    /// on `num_threads` workers; unchanged on error.
    #[pyo3(signature = (k, v, num_threads=None))]
    fn append(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        guarded(|| {
            let mut this = Self::borrow_mut(slf)?;
            match this.store {
                CacheStore::F32(_) => this.cache_append_typed::<f32>(py, k, v, num_threads),
                CacheStore::F64(_) => this.cache_append_typed::<f64>(py, k, v, num_threads),
            }
        })
    }

    /// Bottom-right causal attention of `q` (batch, H, L, head_dim) over the cache, under a
    /// mask expression's spec if one is given.
    #[pyo3(signature = (q, scale, window, enable_gqa, num_threads, attn_mask=None))]
    #[expect(
        clippy::too_many_arguments,
        reason = "the Python method's arguments, one by one"
    )]
    fn attend<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        scale: Option<&Bound<'py, PyAny>>,
        window: Option<(Option<usize>, Option<usize>)>,
        enable_gqa: &Bound<'py, PyAny>,
        num_threads: Option<usize>,
        attn_mask: Option<&Bound<'py, PyTuple>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(|| {
            let expr = attn_mask.map(mask_expr).transpose()?;
            let options = crate::CacheAttendOptions {
                scale: scale_value(scale)?,
                window: window.map(|(left, right)| Window { left, right }),
                enable_gqa: flag(enable_gqa, "enable_gqa")?,
                return_weights: false,
                num_threads,
            };
            let mut this = Self::borrow_mut(slf)?;
            match this.store {
                CacheStore::F32(_) => this.cache_attend_typed::<f32>(py, q, options, expr.as_ref()),
                CacheStore::F64(_) => this.cache_attend_typed::<f64>(py, q, options, expr.as_ref()),
            }
        })
    }

    fn reset(slf: &Bound<'_, Self>) -> PyResult<()> {
        let mut this = Self::borrow_mut(slf)?;
        with_cache!(&mut this.store, cache => cache.reset());
        Ok(())
    }

    fn __len__(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.len()))
    }

    #[getter]
    fn nbytes(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.nbytes()))
    }

    #[getter]
    fn capacity(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.capacity()))
    }

    #[getter]
    fn dtype(slf: &Bound<'_, Self>) -> PyResult<&'static str> {
        Ok(Self::borrow(slf)?.store.dtype())
    }

    #[getter]
    fn storage(slf: &Bound<'_, Self>) -> PyResult<&'static str> {
        Ok(match &Self::borrow(slf)?.store {
            CacheStore::F32(cache) => cache.storage().name::<f32>(),
            CacheStore::F64(cache) => cache.storage().name::<f64>(),
        })
    }

    #[getter]
    fn max_len(slf: &Bound<'_, Self>) -> PyResult<Option<usize>> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.eviction().map(|e| e.max_len)))
    }

    #[getter]
    fn sinks(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.eviction().map_or(0, |e| e.sinks)))
    }

    #[getter]
    fn batch(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.batch()))
    }

    #[getter]
    fn num_kv_heads(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.kv_heads()))
    }

    #[getter]
    fn head_dim(slf: &Bound<'_, Self>) -> PyResult<usize> {
        Ok(with_cache!(&Self::borrow(slf)?.store, cache => cache.head_dim()))
    }
}

/// The arrays of one layer call, borrowed from Python.
struct LayerArrays<'py> {
    query: Bound<'py, PyAny>,
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
    matrices: [Bound<'py, PyAny>; 4],
    biases: [Option<Bound<'py, PyAny>>; 4],
    attn_mask: Option<Bound<'py, PyAny>>,
    key_padding_mask: Option<Bound<'py, PyAny>>,
}

/// The flags of one layer call.
#[derive(Clone, Copy)]
struct LayerFlags {
    is_causal: bool,
    need_weights: bool,
    num_threads: Option<usize>,
}

fn layer_typed<'py, T: CachedFloat>(
    py: Python<'py>,
    arrays: &LayerArrays<'py>,
    heads: crate::MhaHeads,
    flags: LayerFlags,
    cache: Option<&Bound<'py, KvCacheCore>>,
) -> PyResult<Bound<'py, PyAny>> {
    let inputs = [
        borrow_typed::<T, ndarray::Ix3>(&arrays.query, "query")?,
        borrow_typed::<T, ndarray::Ix3>(&arrays.key, "key")?,
        borrow_typed::<T, ndarray::Ix3>(&arrays.value, "value")?,
    ];
    let mut matrices = Vec::with_capacity(4);
    for (array, name) in arrays.matrices.iter().zip(["w_q", "w_k", "w_v", "w_o"]) {
        matrices.push(borrow_typed::<T, ndarray::Ix2>(array, name)?);
    }
    let mut biases = Vec::with_capacity(4);
    for (array, name) in arrays.biases.iter().zip(["b_q", "b_k", "b_v", "b_o"]) {
        biases.push(match array {
            Some(array) => Some(borrow_typed::<T, ndarray::Ix1>(array, name)?),
            None => None,
        });
    }
    let borrowed_mask = BorrowedMask::<T>::borrow(arrays.attn_mask.as_ref())?;
    let padding = match &arrays.key_padding_mask {
        Some(mask) => Some(
            mask.extract::<numpy::PyReadonlyArray2<'py, bool>>()
                .map_err(|_| PyTypeError::new_err("key_padding_mask must be a 2-D bool array"))?,
        ),
        None => None,
    };
    let mut cache_ref = match cache {
        Some(cache) => Some(KvCacheCore::borrow_mut(cache)?),
        None => None,
    };
    let cache = match cache_ref.as_mut() {
        Some(cache) => Some(cache.store.typed::<T>("the layer")?),
        None => None,
    };
    let bias = |index: usize| biases[index].as_ref().map(|b| b.as_array());
    let weights = crate::MhaWeights {
        w_q: matrices[0].as_array(),
        w_k: matrices[1].as_array(),
        w_v: matrices[2].as_array(),
        w_o: matrices[3].as_array(),
        b_q: bias(0),
        b_k: bias(1),
        b_v: bias(2),
        b_o: bias(3),
    };
    // Self-attention passes one array three times: one borrow keeps the views identical.
    let view = |index: usize| inputs[index].as_array();
    let layer_inputs = crate::MhaInputs {
        query: view(0),
        key: view(1),
        value: view(2),
        attn_mask: BorrowedMask::view(&borrowed_mask),
        key_padding_mask: padding.as_ref().map(|mask| mask.as_array()),
        is_causal: flags.is_causal,
        need_weights: flags.need_weights,
        num_threads: flags.num_threads,
    };
    let result = py.detach(|| crate::multi_head_attention(&weights, heads, layer_inputs, cache))?;
    attention_result(py, result.output, result.weights)
}

/// The whole multi-head attention layer in one call (see `attnscope.MultiHeadAttention`):
/// (B, L, E) inputs, weights in `x·W` orientation, the GIL released throughout.
#[pyfunction]
#[pyo3(signature = (query, key, value, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, num_heads, num_kv_heads, attn_mask, key_padding_mask, is_causal, need_weights, cache, num_threads))]
#[expect(
    clippy::too_many_arguments,
    reason = "every array of the layer, one by one"
)]
fn multi_head_attention_forward<'py>(
    py: Python<'py>,
    query: Bound<'py, PyAny>,
    key: Bound<'py, PyAny>,
    value: Bound<'py, PyAny>,
    w_q: Bound<'py, PyAny>,
    w_k: Bound<'py, PyAny>,
    w_v: Bound<'py, PyAny>,
    w_o: Bound<'py, PyAny>,
    b_q: Option<Bound<'py, PyAny>>,
    b_k: Option<Bound<'py, PyAny>>,
    b_v: Option<Bound<'py, PyAny>>,
    b_o: Option<Bound<'py, PyAny>>,
    num_heads: usize,
    num_kv_heads: usize,
    attn_mask: Option<Bound<'py, PyAny>>,
    key_padding_mask: Option<Bound<'py, PyAny>>,
    is_causal: Bound<'py, PyAny>,
    need_weights: Bound<'py, PyAny>,
    cache: Option<Bound<'py, KvCacheCore>>,
    num_threads: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
        let heads = crate::MhaHeads {
            num_heads,
            num_kv_heads,
        };
        let arrays = LayerArrays {
            query,
            key,
            value,
            matrices: [w_q, w_k, w_v, w_o],
            biases: [b_q, b_k, b_v, b_o],
            attn_mask,
            key_padding_mask,
        };
        let flags = LayerFlags {
            is_causal: flag(&is_causal, "is_causal")?,
            need_weights: flag(&need_weights, "need_weights")?,
            num_threads,
        };
        let cache = cache.as_ref();
        if is_dtype::<f32>(&arrays.query) {
            layer_typed::<f32>(py, &arrays, heads, flags, cache)
        } else if is_dtype::<f64>(&arrays.query) {
            layer_typed::<f64>(py, &arrays, heads, flags, cache)
        } else {
            Err(input_error("query", &arrays.query))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Mask expressions. `attnscope.masks` checks every argument and hands the core a spec: nested
// tuples `(kind, args..., children...)`, turned here into the core's `MaskExpr` tree.

fn register_masks(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(mask_to_dense, module)?)?;
    module.add_function(wrap_pyfunction!(mask_layout, module)?)?;
    module.add_function(wrap_pyfunction!(mask_dense_rows, module)?)?;
    Ok(())
}

/// The refusal of an `attn_mask` tuple that is not a mask expression's spec.
fn not_a_mask_spec(spec: &Bound<'_, PyTuple>) -> PyErr {
    PyTypeError::new_err(format!(
        "attn_mask must be a numpy.ndarray or an attnscope.masks expression, got the tuple {}",
        spec.repr()
            .map_or_else(|_| "?".to_string(), |r| r.to_string())
    ))
}

/// A 1-D int64 array of a spec as a vector.
fn spec_ids(item: &Bound<'_, PyAny>) -> Option<Vec<i64>> {
    let ids = item.extract::<numpy::PyReadonlyArray1<'_, i64>>().ok()?;
    Some(ids.as_array().to_vec())
}

/// The `MaskExpr` of a spec built by `attnscope.masks`.
fn mask_expr(spec: &Bound<'_, PyTuple>) -> PyResult<crate::MaskExpr> {
    use crate::MaskExpr as E;
    let refuse = || not_a_mask_spec(spec);
    let item = |index: usize| spec.get_item(index).map_err(|_| refuse());
    let size = |index: usize| item(index)?.extract::<usize>().map_err(|_| refuse());
    let child = |index: usize| -> PyResult<Box<E>> {
        let inner = item(index)?;
        Ok(Box::new(mask_expr(
            inner.cast::<PyTuple>().map_err(|_| refuse())?,
        )?))
    };
    let kind: PyBackedStr = item(0)?.extract().map_err(|_| refuse())?;
    let arity = match &*kind {
        "causal" | "prefix_lm" | "global_tokens" | "sinks" | "strided" | "array" | "not" => 2,
        "document" | "fixed" | "dilated" | "and" | "or" => 3,
        "window" | "random_blocks" => 4,
        _ => return Err(refuse()),
    };
    if spec.len() != arity {
        return Err(refuse());
    }
    let flag_at = |index: usize| item(index)?.extract::<bool>().map_err(|_| refuse());
    let side = |index: usize| {
        item(index)?
            .extract::<Option<usize>>()
            .map_err(|_| refuse())
    };
    let ids = |index: usize| spec_ids(&item(index)?).ok_or_else(refuse);
    Ok(match &*kind {
        "causal" => E::Causal {
            bottom_right: flag_at(1)?,
        },
        "window" => E::Window {
            left: side(1)?,
            right: side(2)?,
            bottom_right: flag_at(3)?,
        },
        "prefix_lm" => E::PrefixLm { prefix: size(1)? },
        "document" => E::Document {
            query_ids: ids(1)?,
            key_ids: if item(2)?.is_none() {
                None
            } else {
                Some(ids(2)?)
            },
        },
        "global_tokens" => E::GlobalTokens {
            positions: ids(1)?
                .into_iter()
                .map(|p| usize::try_from(p).map_err(|_| refuse()))
                .collect::<PyResult<_>>()?,
        },
        "sinks" => E::Sinks { count: size(1)? },
        "strided" => E::Strided { stride: size(1)? },
        "fixed" => E::Fixed {
            block: size(1)?,
            summary: size(2)?,
        },
        "dilated" => E::Dilated {
            window: size(1)?,
            dilation: size(2)?,
        },
        "random_blocks" => E::RandomBlocks {
            block: size(1)?,
            per_row: size(2)?,
            seed: item(3)?.extract::<u64>().map_err(|_| refuse())?,
        },
        "array" => {
            let array = item(1)?
                .extract::<numpy::PyReadonlyArray2<'_, bool>>()
                .map_err(|_| refuse())?;
            let (rows, cols) = array.as_array().dim();
            E::Dense {
                rows,
                cols,
                data: array.as_array().iter().copied().collect(),
            }
        }
        "and" => E::And(child(1)?, child(2)?),
        "or" => E::Or(child(1)?, child(2)?),
        "not" => E::Not(child(1)?),
        _ => return Err(refuse()),
    })
}

fn mask_shape(num_queries: usize, num_keys: usize) -> crate::MaskShape {
    crate::MaskShape {
        num_queries,
        num_keys,
    }
}

/// The (L, S) bool matrix of a mask expression's spec.
#[pyfunction]
fn mask_to_dense<'py>(
    py: Python<'py>,
    spec: &Bound<'py, PyTuple>,
    num_queries: usize,
    num_keys: usize,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
        let expr = mask_expr(spec)?;
        let dense = py.detach(|| expr.to_dense(mask_shape(num_queries, num_keys)))?;
        let array = ndarray::Array2::from_shape_vec((num_queries, num_keys), dense)
            .expect("to_dense returns L x S values");
        Ok(array.into_pyarray(py).into_any())
    })
}

/// Rows `rows` of the (L, S) bool matrix of a spec: a sample of a mask too long to build.
#[pyfunction]
fn mask_dense_rows<'py>(
    py: Python<'py>,
    spec: &Bound<'py, PyTuple>,
    num_queries: usize,
    num_keys: usize,
    rows: Vec<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
        let expr = mask_expr(spec)?;
        let dense = py.detach(|| expr.dense_rows(mask_shape(num_queries, num_keys), &rows))?;
        let array = ndarray::Array2::from_shape_vec((rows.len(), num_keys), dense)
            .expect("dense_rows returns rows x S values");
        Ok(array.into_pyarray(py).into_any())
    })
}

/// `(states, visible_pairs)`: the (row tiles, key tiles) uint8 states of a spec's layout
/// (0 empty, 1 partial, 2 full) and its exact count of visible pairs.
#[pyfunction]
fn mask_layout<'py>(
    py: Python<'py>,
    spec: &Bound<'py, PyTuple>,
    num_queries: usize,
    num_keys: usize,
    block: usize,
) -> PyResult<(Bound<'py, PyAny>, u64)> {
    guarded(|| {
        let expr = mask_expr(spec)?;
        let layout = py.detach(|| expr.layout(mask_shape(num_queries, num_keys), block))?;
        let states =
            ndarray::Array2::from_shape_vec((layout.row_tiles, layout.key_tiles), layout.states)
                .expect("one state per tile");
        Ok((states.into_pyarray(py).into_any(), layout.visible_pairs))
    })
}

// ---------------------------------------------------------------------------------------------
// Score modifiers: softcapping and ALiBi slopes (the Python wrapper passes float64 slopes).

/// `softcap=` and `alibi_slopes=` of a call, owned while the GIL is released.
struct ScoreModArgs {
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
