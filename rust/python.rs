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
}

impl<'py, T: numpy::Element> BorrowedMask<'py, T> {
    /// A bool mask as it is; a float mask in `T` (a float mask of another precision is cast,
    /// a copy: the caller's array is never modified).
    fn borrow(mask: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(mask) = mask else {
            return Ok(None);
        };
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
fn sdpa_typed<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    key: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
    attn_mask: Option<&Bound<'py, PyAny>>,
    options: AttentionOptions,
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
    if return_lse {
        return sdpa_with_lse(py, [q_view, k_view, v_view], mask, &options);
    }
    let result =
        py.detach(|| crate::scaled_dot_product_attention(q_view, k_view, v_view, mask, &options))?;
    attention_result(py, result.output, result.weights)
}

/// scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
/// causal_alignment, window, return_weights, num_threads, return_lse) -- every argument is
/// checked here and in the core; the Python wrapper only turns `window=w` into its two sides.
#[pyfunction]
#[pyo3(signature = (query, key, value, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, return_weights, num_threads, return_lse=None))]
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
    return_lse: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
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
            sdpa_typed::<f32>(py, query, key, value, attn_mask, options, return_lse)
        } else if is_dtype::<f64>(query) {
            sdpa_typed::<f64>(py, query, key, value, attn_mask, options, return_lse)
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
) -> PyResult<Bound<'py, PyAny>> {
    let result = py.detach(|| {
        crate::scaled_dot_product_attention_with_lse(query, key, value, mask, options)
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
            "{name} has dtype {} but query has {}; the backward pass computes in the forward's              dtype: convert {name} with .astype()",
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
    let grads =
        py.detach(|| crate::scaled_dot_product_attention_backward(inputs, mask, &options))?;
    let parts = [grads.grad_query, grads.grad_key, grads.grad_value]
        .map(|grad| grad.into_pyarray(py).into_any());
    Ok(PyTuple::new(py, parts)?.into_any())
}

/// scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, attn_mask,
/// is_causal, scale, enable_gqa, causal_alignment, window, num_threads) -> (dq, dk, dv).
#[pyfunction]
#[pyo3(signature = (grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, num_threads))]
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
) -> PyResult<Bound<'py, PyAny>> {
    guarded(|| {
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
            backward_typed::<f32>(py, &arrays, attn_mask, options)
        } else if is_dtype::<f64>(&arrays.query) {
            backward_typed::<f64>(py, &arrays, attn_mask, options)
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
    ) -> PyResult<()> {
        let (k, v) = (
            borrow_typed::<T, ndarray::Ix4>(k, "k")?,
            borrow_typed::<T, ndarray::Ix4>(v, "v")?,
        );
        let cache = self.store.typed::<T>("k")?;
        let (k_view, v_view) = (k.as_array(), v.as_array());
        Ok(py.detach(|| cache.append(k_view, v_view))?)
    }

    fn cache_attend_typed<'py, T: CachedFloat>(
        &mut self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        options: crate::CacheAttendOptions,
    ) -> PyResult<Bound<'py, PyAny>> {
        let q = borrow_typed::<T, ndarray::IxDyn>(q, "q")?;
        let cache = self.store.typed::<T>("q")?;
        let q_view = q.as_array();
        let result = py.detach(|| cache.attend(q_view, Mask::None, &options))?;
        Ok(result.output.into_pyarray(py).into_any())
    }
}

#[pymethods]
impl KvCacheCore {
    #[new]
    #[pyo3(signature = (num_kv_heads, head_dim, batch, dtype, capacity))]
    fn new(
        num_kv_heads: usize,
        head_dim: usize,
        batch: usize,
        dtype: &str,
        capacity: usize,
    ) -> PyResult<Self> {
        guarded(|| {
            let store = match dtype {
                "float32" => CacheStore::F32(crate::KvCache::new(
                    num_kv_heads,
                    head_dim,
                    batch,
                    capacity,
                )?),
                "float64" => CacheStore::F64(crate::KvCache::new(
                    num_kv_heads,
                    head_dim,
                    batch,
                    capacity,
                )?),
                other => {
                    return Err(PyTypeError::new_err(format!(
                        "dtype must be float32 or float64, got {other}"
                    )))
                }
            };
            Ok(KvCacheCore { store })
        })
    }

    /// Appends `k` and `v`, each (batch, num_kv_heads, n, head_dim); unchanged on error.
    fn append(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guarded(|| {
            let mut this = Self::borrow_mut(slf)?;
            match this.store {
                CacheStore::F32(_) => this.cache_append_typed::<f32>(py, k, v),
                CacheStore::F64(_) => this.cache_append_typed::<f64>(py, k, v),
            }
        })
    }

    /// Bottom-right causal attention of `q` (batch, H, L, head_dim) over the cache.
    #[pyo3(signature = (q, scale, window, enable_gqa, num_threads))]
    fn attend<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        scale: Option<&Bound<'py, PyAny>>,
        window: Option<(Option<usize>, Option<usize>)>,
        enable_gqa: &Bound<'py, PyAny>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(|| {
            let options = crate::CacheAttendOptions {
                scale: scale_value(scale)?,
                window: window.map(|(left, right)| Window { left, right }),
                enable_gqa: flag(enable_gqa, "enable_gqa")?,
                return_weights: false,
                num_threads,
            };
            let mut this = Self::borrow_mut(slf)?;
            match this.store {
                CacheStore::F32(_) => this.cache_attend_typed::<f32>(py, q, options),
                CacheStore::F64(_) => this.cache_attend_typed::<f64>(py, q, options),
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
