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

/// An attention mask borrowed from Python: bool (True = takes part) or additive floats.
enum BorrowedMask<'py, T: numpy::Element> {
    Bool(PyReadonlyArrayDyn<'py, bool>),
    Additive(PyReadonlyArrayDyn<'py, T>),
}

impl<'py, T: numpy::Element> BorrowedMask<'py, T> {
    fn borrow(mask: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(mask) = mask else {
            return Ok(None);
        };
        if let Ok(bools) = mask.extract::<PyReadonlyArrayDyn<'py, bool>>() {
            return Ok(Some(BorrowedMask::Bool(bools)));
        }
        mask.extract::<PyReadonlyArrayDyn<'py, T>>()
            .map(|floats| Some(BorrowedMask::Additive(floats)))
            .map_err(|_| {
                PyTypeError::new_err(
                    "attn_mask must be a bool array or a float array of the same dtype as query",
                )
            })
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
    let borrowed_mask = BorrowedMask::borrow(attn_mask)?;
    let (q_view, k_view, v_view) = (q.as_array(), k.as_array(), v.as_array());
    let mask = BorrowedMask::view(&borrowed_mask);
    let result =
        py.detach(|| crate::scaled_dot_product_attention(q_view, k_view, v_view, mask, &options))?;
    attention_result(py, result.output, result.weights)
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
    register_layer(module)?;
    Ok(())
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
    const NAME: &'static str;
    fn cache_in(store: &mut CacheStore) -> Option<&mut crate::KvCache<Self>>;
}

impl CachedFloat for f32 {
    const NAME: &'static str = "float32";
    fn cache_in(store: &mut CacheStore) -> Option<&mut crate::KvCache<f32>> {
        match store {
            CacheStore::F32(cache) => Some(cache),
            CacheStore::F64(_) => None,
        }
    }
}

impl CachedFloat for f64 {
    const NAME: &'static str = "float64";
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
            CacheStore::F32(_) => f32::NAME,
            CacheStore::F64(_) => f64::NAME,
        }
    }

    fn typed<T: CachedFloat>(&mut self, what: &str) -> PyResult<&mut crate::KvCache<T>> {
        let dtype = self.dtype();
        T::cache_in(self).ok_or_else(|| {
            PyTypeError::new_err(format!(
                "cache holds {dtype} keys and values but {what} is {}; create the KVCache with \
                 dtype=numpy.{}",
                T::NAME,
                T::NAME
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
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    array
        .extract::<numpy::PyReadonlyArray<'py, T, D>>()
        .map_err(|_| {
            let dims = D::NDIM.map_or(String::new(), |n| format!("{n}-D "));
            PyTypeError::new_err(format!("{name} must be a {dims}numpy.{} array", T::NAME))
        })
}

/// Keys and values of past tokens (see `attnscope.KVCache`).
#[pyclass(module = "attnscope._core")]
struct KvCacheCore {
    store: CacheStore,
}

impl KvCacheCore {
    fn append_typed<T: CachedFloat>(
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

    fn attend_typed<'py, T: CachedFloat>(
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
    }

    /// Appends `k` and `v`, each (batch, num_kv_heads, n, head_dim); unchanged on error.
    fn append(
        &mut self,
        py: Python<'_>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        match self.store {
            CacheStore::F32(_) => self.append_typed::<f32>(py, k, v),
            CacheStore::F64(_) => self.append_typed::<f64>(py, k, v),
        }
    }

    /// Bottom-right causal attention of `q` (batch, H, L, head_dim) over the cache.
    #[pyo3(signature = (q, scale, window, enable_gqa))]
    fn attend<'py>(
        &mut self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        scale: Option<f64>,
        window: Option<(Option<usize>, Option<usize>)>,
        enable_gqa: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let options = crate::CacheAttendOptions {
            scale: parse_scale(scale)?,
            window: window.map(|(left, right)| Window { left, right }),
            enable_gqa,
            return_weights: false,
        };
        match self.store {
            CacheStore::F32(_) => self.attend_typed::<f32>(py, q, options),
            CacheStore::F64(_) => self.attend_typed::<f64>(py, q, options),
        }
    }

    fn reset(&mut self) {
        with_cache!(&mut self.store, cache => cache.reset())
    }

    fn __len__(&self) -> usize {
        with_cache!(&self.store, cache => cache.len())
    }

    #[getter]
    fn nbytes(&self) -> usize {
        with_cache!(&self.store, cache => cache.nbytes())
    }

    #[getter]
    fn capacity(&self) -> usize {
        with_cache!(&self.store, cache => cache.capacity())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.store.dtype()
    }

    #[getter]
    fn batch(&self) -> usize {
        with_cache!(&self.store, cache => cache.batch())
    }

    #[getter]
    fn num_kv_heads(&self) -> usize {
        with_cache!(&self.store, cache => cache.kv_heads())
    }

    #[getter]
    fn head_dim(&self) -> usize {
        with_cache!(&self.store, cache => cache.head_dim())
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

fn layer_typed<'py, T: CachedFloat>(
    py: Python<'py>,
    arrays: &LayerArrays<'py>,
    heads: crate::MhaHeads,
    is_causal: bool,
    need_weights: bool,
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
        Some(cache) => Some(cache.try_borrow_mut().map_err(|_| {
            pyo3::exceptions::PyRuntimeError::new_err(
                "cache is in use by another call (a KVCache serves one decoding loop at a time)",
            )
        })?),
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
    let layer_inputs = crate::MhaInputs {
        query: inputs[0].as_array(),
        key: inputs[1].as_array(),
        value: inputs[2].as_array(),
        attn_mask: BorrowedMask::view(&borrowed_mask),
        key_padding_mask: padding.as_ref().map(|mask| mask.as_array()),
        is_causal,
        need_weights,
    };
    let result = py.detach(|| crate::multi_head_attention(&weights, heads, layer_inputs, cache))?;
    attention_result(py, result.output, result.weights)
}

/// The whole multi-head attention layer in one call (see `attnscope.MultiHeadAttention`):
/// (B, L, E) inputs, weights in `x·W` orientation, the GIL released throughout.
#[pyfunction]
#[pyo3(signature = (query, key, value, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, num_heads, num_kv_heads, attn_mask, key_padding_mask, is_causal, need_weights, cache))]
#[allow(clippy::too_many_arguments)]
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
    is_causal: bool,
    need_weights: bool,
    cache: Option<Bound<'py, KvCacheCore>>,
) -> PyResult<Bound<'py, PyAny>> {
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
    let cache = cache.as_ref();
    if arrays.query.cast::<PyArrayDyn<f32>>().is_ok() {
        layer_typed::<f32>(py, &arrays, heads, is_causal, need_weights, cache)
    } else if arrays.query.cast::<PyArrayDyn<f64>>().is_ok() {
        layer_typed::<f64>(py, &arrays, heads, is_causal, need_weights, cache)
    } else {
        Err(dtype_error("query", &arrays.query))
    }
}
