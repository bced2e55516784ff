//! Allocations sized by the caller's arrays, made fallible: a request the machine cannot hold
//! becomes an `AttnError` the caller sees, instead of aborting the process.

use ndarray::{Array, ArrayView, ArrayViewD, CowArray, Dimension};

use crate::element::Element;
use crate::error::AttnError;

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
    filled(dims, T::ZERO, argument)
}

/// A buffer for an array of shape `dims`, every element `value`.
pub(crate) fn filled<T: Clone>(
    dims: &[usize],
    value: T,
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
    buffer.resize(len, value);
    Ok(buffer)
}

/// `len` zeros straight from the allocator, for a buffer written later: a large request comes
/// as fresh pages that read zero until first written, so nothing fills them here, one thread
/// at a time, and the threads that write them (a KV cache's workers) fault them in.
pub(crate) fn lazily_zeroed<U: bytemuck::Zeroable>(
    len: usize,
    argument: &'static str,
) -> Result<Vec<U>, AttnError> {
    bytemuck::allocation::try_zeroed_vec(len)
        .map_err(|()| too_large(argument, len as u128 * std::mem::size_of::<U>() as u128))
}

/// Asks the kernel to back `buffer`'s allocation with huge pages, before anything is
/// written to it. Large buffers read end to end (a KV cache at every decoding step) then take
/// one TLB entry per 2 MiB instead of per 4 KiB; NumPy does the same for its large arrays.
pub(crate) fn advise_huge_pages<T>(buffer: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        // SAFETY: sysconf only reads a system setting.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as usize,
            _ => return,
        };
        let start = buffer.as_mut_ptr() as usize;
        let end = start + buffer.capacity() * std::mem::size_of::<T>();
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        if last >= first + HUGE_PAGE {
            // SAFETY: the range lies inside the buffer's allocation, and the advice changes
            // only how its pages are backed, never their contents. A refusal (a kernel without
            // transparent huge pages) leaves ordinary pages, so the result is ignored.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
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

/// A view's elements as one slice and the element strides that find them in it (0 along
/// length-1 and broadcast dims).
pub(crate) struct StridedElements<'a, T> {
    borrowed: &'a [T],
    owned: Option<Vec<T>>,
    pub strides: Vec<usize>,
}

impl<T> StridedElements<'_, T> {
    pub fn data(&self) -> &[T] {
        self.owned.as_deref().unwrap_or(self.borrowed)
    }
}

/// The memory of `view` read in place through its strides when its elements fill one block
/// without gaps — any permutation of a contiguous array's axes (transposed, Fortran order) and
/// any broadcasting (`np.broadcast_to`, which costs nothing) — else a C-order copy (views with
/// negative or gapped strides, which are rare for masks).
pub(crate) fn strided_elements<'a, T: Clone>(
    view: ArrayViewD<'a, T>,
    argument: &'static str,
) -> Result<StridedElements<'a, T>, AttnError> {
    let shape = view.shape().to_vec();
    let shape = shape.as_slice();
    let broadcast_free = |dim: usize, stride: isize| dim > 1 && stride != 0;
    let mut dense: Vec<(usize, isize)> = shape
        .iter()
        .zip(view.strides())
        .filter(|&(&dim, &stride)| broadcast_free(dim, stride))
        .map(|(&dim, &stride)| (dim, stride))
        .collect();
    dense.sort_by_key(|&(_, stride)| stride);
    let mut span = 1usize;
    let fills_one_block = dense.iter().all(|&(dim, stride)| {
        let fits = stride > 0 && stride as usize == span;
        span *= dim;
        fits
    });
    if view.is_empty() || fills_one_block {
        let strides = shape
            .iter()
            .zip(view.strides())
            .map(|(&dim, &stride)| {
                if broadcast_free(dim, stride) {
                    stride as usize
                } else {
                    0
                }
            })
            .collect();
        let len = if view.is_empty() { 0 } else { span };
        // SAFETY: the view's elements sit at offsets `Σ index·stride` from its first element,
        // and with positive strides that tile without gaps those offsets are exactly
        // `0..span`: one block of the view's own, initialised elements, alive for `'a`.
        let borrowed = unsafe { std::slice::from_raw_parts(view.as_ptr(), len) };
        return Ok(StridedElements {
            borrowed,
            owned: None,
            strides,
        });
    }
    let copy = standard_layout(view, argument)?.into_owned();
    let mut strides = vec![0usize; shape.len()];
    let mut running = 1usize;
    for (slot, &dim) in strides.iter_mut().zip(shape).rev() {
        if dim > 1 {
            *slot = running;
        }
        running *= dim;
    }
    let (owned, _) = copy.into_raw_vec_and_offset();
    Ok(StridedElements {
        borrowed: &[],
        owned: Some(owned),
        strides,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, ArrayD, Axis, IxDyn, ShapeBuilder};

    /// Every element of `view` read back through the slice and strides.
    fn read_back<T: Copy>(view: &ArrayViewD<'_, T>, elements: &StridedElements<'_, T>) -> Vec<T> {
        view.indexed_iter()
            .map(|(index, _)| {
                let offset: usize = (0..view.ndim())
                    .map(|axis| index[axis] * elements.strides[axis])
                    .sum();
                elements.data()[offset]
            })
            .collect()
    }

    #[test]
    fn broadcast_and_permuted_views_are_read_in_place() {
        let base = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as f32);
        let broadcast = base.broadcast((4, 6, 3, 5)).unwrap().into_dyn();
        let transposed = base.t().into_dyn();
        let fortran =
            ArrayD::from_shape_vec(IxDyn(&[3, 5]).f(), (0..15).map(|x| x as f32).collect())
                .unwrap();
        for view in [broadcast.view(), transposed.view(), fortran.view()] {
            let elements = strided_elements(view.clone(), "mask").unwrap();
            assert!(elements.owned.is_none(), "{:?} was copied", view.strides());
            assert_eq!(elements.data().len(), 15);
            assert_eq!(
                read_back(&view, &elements),
                view.iter().copied().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn reversed_and_gapped_views_are_copied() {
        let base = Array2::from_shape_fn((4, 6), |(i, j)| (i * 6 + j) as f64);
        let mut reversed = base.view();
        reversed.invert_axis(Axis(1));
        let gapped = base.slice(ndarray::s![.., ..;2]);
        for view in [reversed.into_dyn(), gapped.into_dyn()] {
            let elements = strided_elements(view.clone(), "mask").unwrap();
            assert!(elements.owned.is_some());
            assert_eq!(
                read_back(&view, &elements),
                view.iter().copied().collect::<Vec<_>>()
            );
        }
    }
}
