//! The KV cache's Python class.

use numpy::{IntoPyArray, PyReadonlyArray};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::arrays::{borrow_as, flag, scale_value};
use super::guarded;
use super::layer::multi_head_attention_forward;
use super::masks::PyMask;
use crate::element::Element;
use crate::{Float, Mask, Window};

// ---------------------------------------------------------------------------------------------
// The multi-head attention layer and the KV cache. The Python classes (`attnscope._layer`,
// `attnscope._kv_cache`) check the argument types and own the weights; these functions borrow
// the arrays and run the layer.

pub(super) fn register_layer(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<KvCacheCore>()?;
    module.add_function(wrap_pyfunction!(multi_head_attention_forward, module)?)?;
    Ok(())
}

pub(super) enum CacheStore {
    F32(crate::KvCache<f32>),
    F64(crate::KvCache<f64>),
}

/// The element types a cache can hold, and how to find a cache of that type in the store.
pub(super) trait CachedFloat: Float + numpy::Element {
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

    pub(super) fn typed<T: CachedFloat>(&mut self, what: &str) -> PyResult<&mut crate::KvCache<T>> {
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

pub(super) fn borrow_typed<'py, T: CachedFloat, D: ndarray::Dimension>(
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
pub(super) fn cache_in_use() -> PyErr {
    PyRuntimeError::new_err(
        "KVCache is in use by a call in another thread: a cache serves one decoding loop at a \
         time; give each thread its own KVCache, or wait for the other call to return",
    )
}

/// Keys and values of past tokens (see `attnscope.KVCache`).
#[pyclass(module = "attnscope._core")]
pub(super) struct KvCacheCore {
    pub(super) store: CacheStore,
}

impl KvCacheCore {
    fn borrow<'py>(slf: &Bound<'py, Self>) -> PyResult<PyRef<'py, Self>> {
        slf.try_borrow().map_err(|_| cache_in_use())
    }

    pub(super) fn borrow_mut<'py>(slf: &Bound<'py, Self>) -> PyResult<PyRefMut<'py, Self>> {
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
    /// mask expression if one is given.
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
        attn_mask: Option<&Bound<'py, PyMask>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(|| {
            let expr = attn_mask.map(|mask| mask.get().expr.clone());
            let options = crate::CacheAttendOptions {
                scale: scale_value(scale)?,
                window: window.map(|(left, right)| Window { left, right }),
                enable_gqa: flag(enable_gqa, "enable_gqa")?,
                return_weights: false,
                num_threads,
            };
            let mut this = Self::borrow_mut(slf)?;
            match this.store {
                CacheStore::F32(_) => {
                    this.cache_attend_typed::<f32>(py, q, options, expr.as_deref())
                }
                CacheStore::F64(_) => {
                    this.cache_attend_typed::<f64>(py, q, options, expr.as_deref())
                }
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
