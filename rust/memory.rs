//! Allocations sized by the caller's arrays, made fallible: a request the machine cannot hold
//! becomes an `AttnError` the caller sees, instead of aborting the process.

use ndarray::{Array, ArrayView, CowArray, Dimension};

use crate::element::Element;
use crate::AttnError;

fn too_large(argument: &'static str, bytes: u128) -> AttnError {
    AttnError::value(
        argument,
        format!("needs {bytes} bytes, more than this machine can allocate"),
    )
}

/// A zero-filled buffer for an array of shape `dims`.
pub(crate) fn zeroed<T: Element>(
    dims: &[usize],
    argument: &'static str,
) -> Result<Vec<T>, AttnError> {
    let elements = dims
        .iter()
        .try_fold(1u128, |product, &dim| product.checked_mul(dim as u128));
    let bytes = elements.map_or(u128::MAX, |n| {
        n.saturating_mul(std::mem::size_of::<T>() as u128)
    });
    // Broadcast inputs can describe results whose size does not even fit in a usize.
    let len = elements
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| too_large(argument, bytes))?;
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| too_large(argument, bytes))?;
    buffer.resize(len, T::ZERO);
    Ok(buffer)
}

/// `view` itself when it is already C-contiguous, else a C-contiguous copy. Broadcast inputs
/// can describe far more elements than they store, so the copy's size is checked first.
pub(crate) fn standard_layout<'a, T: Clone, D: Dimension>(
    view: ArrayView<'a, T, D>,
    argument: &'static str,
) -> Result<CowArray<'a, T, D>, AttnError> {
    if view.is_standard_layout() {
        return Ok(CowArray::from(view));
    }
    let len = view.len();
    let Some(first) = view.first().cloned() else {
        return Ok(CowArray::from(view.to_owned()));
    };
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| too_large(argument, len as u128 * std::mem::size_of::<T>() as u128))?;
    buffer.resize(len, first);
    let mut owned = Array::from_shape_vec(view.raw_dim(), buffer)
        .expect("a buffer of the view's length fits the view's shape");
    // `assign` walks both arrays in their best common order; an element iterator over a
    // permuted view would be several times slower.
    owned.assign(&view);
    Ok(CowArray::from(owned))
}
