//! Mask expressions as Python objects: `attnscope._core.MaskExpr` holds the core's `MaskExpr`
//! tree, and `attnscope.masks.Mask` wraps it with the docstrings. Python hands each argument
//! over as a value of the engine's range (an int, an int64 array, a 2-D bool array); the rules
//! of the patterns themselves are checked once, here, when a pattern is built: the alignment's
//! name, positions >= 0, and the core's [`MaskExpr::check_pattern`] (a stride, block or
//! dilation of at least 1, a summary no wider than its block).

use std::collections::hash_map::DefaultHasher;
use std::fmt::Display;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use numpy::{IntoPyArray, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::arrays::parse_alignment;
use super::guarded;
use crate::masks::MAX_MASK_DEPTH;
use crate::{AttnError, CausalAlignment, MaskExpr, MaskShape};

/// The most patterns and operators one expression may hold (`m = m & m` doubles it). The
/// bindings refuse more when an expression is built, so every tile's evaluation stays small.
pub(super) const MAX_MASK_NODES: usize = 1 << 16;

pub(super) fn register_masks(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<PyMask>()?;
    module.add("MAX_MASK_DEPTH", MAX_MASK_DEPTH)?;
    module.add("MAX_MASK_NODES", MAX_MASK_NODES)?;
    Ok(())
}

/// An immutable mask expression. Combining two is one new node that shares its operands, so
/// `&`, `|` and `~` take the same time whatever the operands' size; the limits on depth and
/// size are checked then, from the counts each expression keeps.
#[pyclass(frozen, name = "MaskExpr", module = "attnscope._core")]
pub(super) struct PyMask {
    pub(super) expr: Arc<MaskExpr>,
    /// Levels of `&`, `|` and `~` nesting, a pattern being one.
    depth: usize,
    /// Patterns and operators in all, a shared operand counted each time it is used.
    nodes: usize,
    /// A pattern hashes its fields, a combination its operator and its operands' hashes: equal
    /// expressions hash alike, and combining never walks the operands.
    hash: u64,
}

impl PyMask {
    /// A pattern, refused if its arguments make none.
    fn pattern(expr: MaskExpr) -> PyResult<Self> {
        expr.check_pattern()?;
        let mut hasher = DefaultHasher::new();
        expr.hash(&mut hasher);
        Ok(PyMask {
            expr: Arc::new(expr),
            depth: 1,
            nodes: 1,
            hash: hasher.finish(),
        })
    }

    /// `expr`, an operator over `operands`, refused past the depth and size limits.
    fn combination(expr: MaskExpr, operands: &[&PyMask]) -> PyResult<Self> {
        let depth = 1 + operands.iter().map(|o| o.depth).max().unwrap_or(0);
        if depth > MAX_MASK_DEPTH {
            return Err(PyValueError::new_err(format!(
                "mask expression would be {depth} levels deep; at most MAX_DEPTH = \
                 {MAX_MASK_DEPTH} levels of & | ~ nesting are allowed (combine patterns as a \
                 balanced tree, e.g. pairwise, instead of a long chain)"
            )));
        }
        let nodes = 1 + operands.iter().map(|o| o.nodes).sum::<usize>();
        if nodes > MAX_MASK_NODES {
            return Err(PyValueError::new_err(format!(
                "mask expression would hold {nodes} patterns and operators; at most \
                 MAX_NODES = {MAX_MASK_NODES} are allowed"
            )));
        }
        let mut hasher = DefaultHasher::new();
        std::mem::discriminant(&expr).hash(&mut hasher);
        operands.iter().for_each(|o| o.hash.hash(&mut hasher));
        Ok(PyMask {
            expr: Arc::new(expr),
            depth,
            nodes,
            hash: hasher.finish(),
        })
    }
}

/// Whether `alignment` ("top_left" or "bottom_right") is bottom-right.
fn bottom_right(alignment: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(parse_alignment(alignment, "alignment")? == CausalAlignment::BottomRight)
}

/// `values` as indices, each >= 0 (else the smallest is named).
fn indices(values: &PyReadonlyArray1<'_, i64>, name: &'static str) -> PyResult<Vec<usize>> {
    let values = values.as_array();
    match values.iter().min() {
        Some(&low) if low < 0 => {
            Err(AttnError::value(name, format!("must be >= 0, got {low}")).into())
        }
        _ => Ok(values.iter().map(|&value| value as usize).collect()),
    }
}

fn mask_shape(num_queries: usize, num_keys: usize) -> MaskShape {
    MaskShape {
        num_queries,
        num_keys,
    }
}

#[pymethods]
impl PyMask {
    #[staticmethod]
    fn causal(alignment: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::pattern(MaskExpr::Causal {
            bottom_right: bottom_right(alignment)?,
        })
    }

    #[staticmethod]
    fn window(
        left: Option<usize>,
        right: Option<usize>,
        alignment: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        Self::pattern(MaskExpr::Window {
            left,
            right,
            bottom_right: bottom_right(alignment)?,
        })
    }

    #[staticmethod]
    fn prefix_lm(prefix_len: usize) -> PyResult<Self> {
        Self::pattern(MaskExpr::PrefixLm { prefix: prefix_len })
    }

    #[staticmethod]
    #[pyo3(signature = (ids, kv_ids=None))]
    fn document(
        ids: PyReadonlyArray1<'_, i64>,
        kv_ids: Option<PyReadonlyArray1<'_, i64>>,
    ) -> PyResult<Self> {
        Self::pattern(MaskExpr::Document {
            query_ids: ids.as_array().to_vec(),
            key_ids: kv_ids.map(|ids| ids.as_array().to_vec()),
        })
    }

    #[staticmethod]
    fn global_tokens(positions: PyReadonlyArray1<'_, i64>) -> PyResult<Self> {
        let mut unique = indices(&positions, "positions")?;
        unique.sort_unstable();
        unique.dedup();
        Self::pattern(MaskExpr::GlobalTokens { positions: unique })
    }

    #[staticmethod]
    fn sinks(n: usize) -> PyResult<Self> {
        Self::pattern(MaskExpr::Sinks { count: n })
    }

    #[staticmethod]
    fn strided(stride: usize) -> PyResult<Self> {
        Self::pattern(MaskExpr::Strided { stride })
    }

    #[staticmethod]
    fn fixed(block: usize, summary: usize) -> PyResult<Self> {
        Self::pattern(MaskExpr::Fixed { block, summary })
    }

    #[staticmethod]
    fn dilated(window: usize, dilation: usize) -> PyResult<Self> {
        Self::pattern(MaskExpr::Dilated { window, dilation })
    }

    #[staticmethod]
    fn random_blocks(block: usize, per_row: usize, seed: u64) -> PyResult<Self> {
        Self::pattern(MaskExpr::RandomBlocks {
            block,
            per_row,
            seed,
        })
    }

    #[staticmethod]
    fn from_array(mask: PyReadonlyArray2<'_, bool>) -> PyResult<Self> {
        let array = mask.as_array();
        let (rows, cols) = array.dim();
        Self::pattern(MaskExpr::Dense {
            rows,
            cols,
            data: array.iter().copied().collect(),
        })
    }

    fn __and__(&self, other: PyRef<'_, Self>) -> PyResult<Self> {
        let expr = MaskExpr::And(self.expr.clone(), other.expr.clone());
        Self::combination(expr, &[self, &*other])
    }

    fn __or__(&self, other: PyRef<'_, Self>) -> PyResult<Self> {
        let expr = MaskExpr::Or(self.expr.clone(), other.expr.clone());
        Self::combination(expr, &[self, &*other])
    }

    fn __invert__(&self) -> PyResult<Self> {
        Self::combination(MaskExpr::Not(self.expr.clone()), &[self])
    }

    fn __eq__(&self, other: PyRef<'_, Self>) -> bool {
        self.hash == other.hash && self.expr.same(&other.expr)
    }

    fn __hash__(&self) -> u64 {
        self.hash
    }

    /// Each pattern as the call that builds it, `&` and `|` in parentheses, `~` as a prefix.
    fn __repr__(&self) -> String {
        expression_text(&self.expr)
    }

    #[getter]
    fn nodes(&self) -> usize {
        self.nodes
    }

    /// The (L, S) bool matrix of visible pairs.
    fn to_dense<'py>(
        &self,
        py: Python<'py>,
        num_queries: usize,
        num_keys: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(|| {
            let expr = &*self.expr;
            let dense = py.detach(|| expr.to_dense(mask_shape(num_queries, num_keys)))?;
            let array = ndarray::Array2::from_shape_vec((num_queries, num_keys), dense)
                .expect("to_dense returns L x S values");
            Ok(array.into_pyarray(py).into_any())
        })
    }

    /// Rows `rows` of the (L, S) bool matrix: a sample of a mask too long to build.
    fn dense_rows<'py>(
        &self,
        py: Python<'py>,
        num_queries: usize,
        num_keys: usize,
        rows: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guarded(|| {
            let (expr, rows) = (&*self.expr, indices(&rows, "rows")?);
            let shape = mask_shape(num_queries, num_keys);
            let dense = py.detach(|| expr.dense_rows(shape, &rows))?;
            let array = ndarray::Array2::from_shape_vec((rows.len(), num_keys), dense)
                .expect("dense_rows returns rows x S values");
            Ok(array.into_pyarray(py).into_any())
        })
    }

    /// `(states, visible_pairs)`: the (row tiles, key tiles) uint8 states (0 empty, 1 partial,
    /// 2 full) and the exact count of visible pairs.
    fn layout<'py>(
        &self,
        py: Python<'py>,
        num_queries: usize,
        num_keys: usize,
        block: usize,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        guarded(|| {
            let expr = &*self.expr;
            let layout = py.detach(|| expr.layout(mask_shape(num_queries, num_keys), block))?;
            let states = ndarray::Array2::from_shape_vec(
                (layout.row_tiles, layout.key_tiles),
                layout.states,
            )
            .expect("one state per tile");
            Ok((states.into_pyarray(py).into_any(), layout.visible_pairs))
        })
    }
}

/// The text of an expression, written with an explicit stack (no recursion, whatever the
/// depth).
fn expression_text(expr: &MaskExpr) -> String {
    enum Piece<'a> {
        Expr(&'a MaskExpr),
        Text(&'static str),
    }
    let mut text = String::new();
    let mut pending = vec![Piece::Expr(expr)];
    while let Some(piece) = pending.pop() {
        match piece {
            Piece::Text(piece) => text.push_str(piece),
            Piece::Expr(MaskExpr::Not(a)) => {
                text.push('~');
                pending.push(Piece::Expr(a));
            }
            Piece::Expr(expr @ (MaskExpr::And(a, b) | MaskExpr::Or(a, b))) => {
                let symbol = if matches!(expr, MaskExpr::And(..)) {
                    " & "
                } else {
                    " | "
                };
                text.push('(');
                pending.extend([
                    Piece::Text(")"),
                    Piece::Expr(b),
                    Piece::Text(symbol),
                    Piece::Expr(a),
                ]);
            }
            Piece::Expr(pattern) => text.push_str(&pattern_text(pattern)),
        }
    }
    text
}

/// A pattern as the `attnscope.masks` call that builds it.
fn pattern_text(pattern: &MaskExpr) -> String {
    let alignment = |bottom_right: bool| {
        if bottom_right {
            "alignment='bottom_right'"
        } else {
            ""
        }
    };
    let side = |side: Option<usize>| side.map_or("None".to_string(), |s| s.to_string());
    match pattern {
        MaskExpr::Causal { bottom_right } => format!("causal({})", alignment(*bottom_right)),
        MaskExpr::Window {
            left,
            right,
            bottom_right,
        } => format!(
            "window({}, {}{}{})",
            side(*left),
            side(*right),
            if *bottom_right { ", " } else { "" },
            alignment(*bottom_right)
        ),
        MaskExpr::PrefixLm { prefix } => format!("prefix_lm({prefix})"),
        MaskExpr::Document {
            query_ids,
            key_ids: None,
        } => format!("document({})", short(query_ids)),
        MaskExpr::Document {
            query_ids,
            key_ids: Some(key_ids),
        } => format!("document({}, kv_ids={})", short(query_ids), short(key_ids)),
        MaskExpr::GlobalTokens { positions } => format!("global_tokens({})", short(positions)),
        MaskExpr::Sinks { count } => format!("sinks({count})"),
        MaskExpr::Strided { stride } => format!("strided({stride})"),
        MaskExpr::Fixed { block, summary } => format!("fixed({block}, summary={summary})"),
        MaskExpr::Dilated { window, dilation } => format!("dilated({window}, {dilation})"),
        MaskExpr::RandomBlocks {
            block,
            per_row,
            seed,
        } => format!("random_blocks({block}, {per_row}, seed={seed})"),
        MaskExpr::Dense { rows, cols, .. } => format!("from_array(<{rows}x{cols} bool>)"),
        MaskExpr::And(..) | MaskExpr::Or(..) | MaskExpr::Not(..) => {
            unreachable!("combinations are written by expression_text")
        }
    }
}

/// A list as Python prints it, cut to its first four values when it holds more than eight.
fn short<T: Display>(values: &[T]) -> String {
    let items = |values: &[T]| {
        values
            .iter()
            .map(T::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if values.len() <= 8 {
        format!("[{}]", items(values))
    } else {
        format!("[{}, ... ({} values)]", items(&values[..4]), values.len())
    }
}
