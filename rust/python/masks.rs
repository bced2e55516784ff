//! Mask expressions from their Python spec.

use numpy::IntoPyArray;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyTuple;

use super::guarded;

// ---------------------------------------------------------------------------------------------
// Mask expressions. `attnscope.masks` checks every argument and hands the core a spec: nested
// tuples `(kind, args..., children...)`, turned here into the core's `MaskExpr` tree.

pub(super) fn register_masks(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(mask_to_dense, module)?)?;
    module.add_function(wrap_pyfunction!(mask_layout, module)?)?;
    module.add_function(wrap_pyfunction!(mask_dense_rows, module)?)?;
    Ok(())
}

/// The refusal of an `attn_mask` tuple that is not a mask expression's spec.
pub(super) fn not_a_mask_spec(spec: &Bound<'_, PyTuple>) -> PyErr {
    PyTypeError::new_err(format!(
        "attn_mask must be a numpy.ndarray or an attnscope.masks expression, got the tuple {}",
        spec.repr()
            .map_or_else(|_| "?".to_string(), |r| r.to_string())
    ))
}

/// A 1-D int64 array of a spec as a vector.
pub(super) fn spec_ids(item: &Bound<'_, PyAny>) -> Option<Vec<i64>> {
    let ids = item.extract::<numpy::PyReadonlyArray1<'_, i64>>().ok()?;
    Some(ids.as_array().to_vec())
}

/// The `MaskExpr` of a spec built by `attnscope.masks`.
pub(super) fn mask_expr(spec: &Bound<'_, PyTuple>) -> PyResult<crate::MaskExpr> {
    use crate::MaskExpr as E;
    let refuse = || not_a_mask_spec(spec);
    let item = |index: usize| spec.get_item(index).map_err(|_| refuse());
    let size = |index: usize| item(index)?.extract::<usize>().map_err(|_| refuse());
    let child = |index: usize| -> PyResult<std::sync::Arc<E>> {
        let inner = item(index)?;
        Ok(std::sync::Arc::new(mask_expr(
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

pub(super) fn mask_shape(num_queries: usize, num_keys: usize) -> crate::MaskShape {
    crate::MaskShape {
        num_queries,
        num_keys,
    }
}

/// The (L, S) bool matrix of a mask expression's spec.
#[pyfunction]
pub(super) fn mask_to_dense<'py>(
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
pub(super) fn mask_dense_rows<'py>(
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
pub(super) fn mask_layout<'py>(
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
