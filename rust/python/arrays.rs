//! Arrays and plain arguments from Python: dtype tests, borrowing, and the checks shared by
//! every entry point.

use std::sync::Arc;

use numpy::{PyArrayDyn, PyReadonlyArray, PyReadonlyArrayDyn, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyBool;

use super::masks::PyMask;
use crate::threads::{check_thread_count, MAX_THREADS};
use crate::{AttnError, CausalAlignment, Mask};

pub(super) fn native_order_copy<'py>(
    array: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
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
pub(super) fn borrow_as<'py, T: numpy::Element, D: ndarray::Dimension>(
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
pub(super) fn is_dtype<T: numpy::Element>(array: &Bound<'_, PyAny>) -> bool {
    if array.cast::<PyArrayDyn<T>>().is_ok() {
        return true;
    }
    let Ok(native) = native_order_copy(array) else {
        return false;
    };
    native.is_some_and(|copy| copy.cast::<PyArrayDyn<T>>().is_ok())
}

pub(super) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "object".to_string(), |name| name.to_string())
}

pub(super) fn dtype_of(array: &Bound<'_, PyAny>) -> String {
    array
        .getattr("dtype")
        .map_or_else(|_| type_name(array), |dtype| dtype.to_string())
}

/// The TypeError for `name` when it is not a float32 or float64 ndarray, worded for what it is.
pub(super) fn input_error(name: &str, array: &Bound<'_, PyAny>) -> PyErr {
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
pub(super) fn mixed_dtypes_error(arrays: [&Bound<'_, PyAny>; 3]) -> PyErr {
    let [query, key, value] = arrays.map(dtype_of);
    PyTypeError::new_err(format!(
        "query, key and value must share one dtype, got {query}, {key} and {value}; convert \
         them with .astype()"
    ))
}

/// `array` as an array of `T` elements (a byte-swapped one as a native-order copy), or `None`
/// when it holds another element type.
pub(super) fn typed_array<'py, T: numpy::Element>(
    array: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyArrayDyn<T>>>> {
    if let Ok(typed) = array.cast::<PyArrayDyn<T>>() {
        return Ok(Some(typed.clone()));
    }
    Ok(native_order_copy(array)?.and_then(|native| native.cast_into::<PyArrayDyn<T>>().ok()))
}

/// `array` as an array of the query's element type `T` (a byte-swapped one as a native-order
/// copy), or an error that explains why it is not one.
pub(super) fn input_array<'py, T: numpy::Element>(
    array: &Bound<'py, PyAny>,
    name: &str,
    all: [&Bound<'py, PyAny>; 3],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if let Some(typed) = typed_array::<T>(array)? {
        return Ok(typed);
    }
    if is_dtype::<f32>(array) || is_dtype::<f64>(array) {
        Err(mixed_dtypes_error(all))
    } else {
        Err(input_error(name, array))
    }
}

/// A Python bool (or `numpy.bool_`), else a TypeError naming the argument.
pub(super) fn flag(value: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    value.extract::<bool>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a bool, got {}", type_name(value)))
    })
}

/// A real number (not a bool) or None; the core refuses non-finite values.
pub(super) fn scale_value(scale: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
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

/// The diagonal's alignment named by `alignment` ("top_left" or "bottom_right"), which the
/// caller calls `name`.
pub(super) fn parse_alignment(
    alignment: &Bound<'_, PyAny>,
    name: &str,
) -> PyResult<CausalAlignment> {
    match alignment.extract::<PyBackedStr>().as_deref() {
        Ok("top_left") => Ok(CausalAlignment::TopLeft),
        Ok("bottom_right") => Ok(CausalAlignment::BottomRight),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be 'top_left' or 'bottom_right', got {}",
            alignment.repr()?
        ))),
    }
}

/// A thread count under the one rule (`1..=MAX_THREADS`), whatever integer Python passed.
pub(super) fn thread_count(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    let count = value.extract::<usize>().map_err(|_| {
        AttnError::value(
            "num_threads",
            format!("must be between 1 and {MAX_THREADS}, got {value}"),
        )
    })?;
    Ok(check_thread_count(count)?)
}

/// An attention mask borrowed from Python: bool (True = takes part) or additive floats.
pub(super) enum BorrowedMask<'py, T: numpy::Element> {
    Bool(PyReadonlyArrayDyn<'py, bool>),
    Additive(PyReadonlyArrayDyn<'py, T>),
    Expr(Arc<crate::MaskExpr>),
}

impl<'py, T: numpy::Element> BorrowedMask<'py, T> {
    /// A bool mask as it is; a float mask in `T` (a float mask of another precision is cast,
    /// a copy: the caller's array is never modified).
    pub(super) fn borrow(mask: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(mask) = mask else {
            return Ok(None);
        };
        if let Ok(expr) = mask.cast::<PyMask>() {
            return Ok(Some(BorrowedMask::Expr(expr.get().expr.clone())));
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

    pub(super) fn view(mask: &Option<Self>) -> Mask<'_, T> {
        match mask {
            Some(BorrowedMask::Bool(bools)) => Mask::Bool(bools.as_array()),
            Some(BorrowedMask::Additive(floats)) => Mask::Additive(floats.as_array()),
            Some(BorrowedMask::Expr(expr)) => Mask::Expr(expr),
            None => Mask::None,
        }
    }
}
