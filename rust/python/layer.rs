//! The multi-head attention layer's forward.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::arrays::{flag, input_error, is_dtype, BorrowedMask};
use super::attention::attention_result;
use super::cache::{borrow_typed, CachedFloat, KvCacheCore};
use super::guarded;

/// The arrays of one layer call, borrowed from Python.
pub(super) struct LayerArrays<'py> {
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
pub(super) struct LayerFlags {
    is_causal: bool,
    need_weights: bool,
    num_threads: Option<usize>,
}

pub(super) fn layer_typed<'py, T: CachedFloat>(
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
pub(super) fn multi_head_attention_forward<'py>(
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
