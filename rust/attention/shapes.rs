//! The shape of a call: sizes and their checks, where a broadcast mask's elements live, and the
//! memory limit on returned weights. Everything here runs before any work is done.

use crate::attention::{AttentionOptions, Mask, ScoreMods};
use crate::element::Element;
use crate::error::{shape_str, AttnError};
use crate::kernel::{score_scale, MaskCells};
use crate::limits::weights_memory_limit;
use crate::masks::MaskShape;

/// Sizes of one call, with leading dims flattened into `batch` (2-D inputs are one head).
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub query_heads: usize,
    pub kv_heads: usize,
    pub batch: usize,
    pub num_queries: usize,
    pub num_keys: usize,
    pub depth: usize,
    pub value_dim: usize,
    /// The leading (batch) dims, then the head dim if the inputs have one.
    pub outer_shape: Vec<usize>,
    pub batch_shape: Vec<usize>,
}

/// The three shapes of a call, for checks and their messages.
struct Shapes<'a> {
    query: &'a [usize],
    key: &'a [usize],
    value: &'a [usize],
}

impl Shapes<'_> {
    /// `(query (..), key (..), value (..))`, appended to every message.
    fn all(&self) -> String {
        format!(
            "(query {}, key {}, value {})",
            shape_str(self.query),
            shape_str(self.key),
            shape_str(self.value)
        )
    }

    /// Ranks and leading dims: key and value have the query's rank and batch dims.
    fn check_ranks(&self) -> Result<(), AttnError> {
        let rank = self.query.len();
        if rank < 2 {
            return Err(AttnError::shape(
                "query",
                format!(
                    "expected at least 2 dims (L, D), got shape {}",
                    shape_str(self.query)
                ),
            ));
        }
        let lead = rank.saturating_sub(3);
        for (name, shape) in [("key", self.key), ("value", self.value)] {
            if shape.len() != rank {
                return Err(AttnError::shape(
                    name,
                    format!(
                        "expected {rank} dims like query, got {} dims {}",
                        shape.len(),
                        self.all()
                    ),
                ));
            }
            if shape[..lead] != self.query[..lead] {
                return Err(AttnError::shape(
                    name,
                    format!(
                        "leading (batch) dims {} do not match query's {} {}",
                        shape_str(&shape[..lead]),
                        shape_str(&self.query[..lead]),
                        self.all()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The query's `D` is the key's, the key's `S` the value's, the value's heads the key's.
    fn check_sizes(&self) -> Result<(), AttnError> {
        let rank = self.query.len();
        let (query, key, value) = (self.query, self.key, self.value);
        let checks = [
            ("key", key, "head dim D (last axis)", "query's", query, 1),
            ("value", value, "length S (axis -2)", "key's", key, 2),
        ];
        for (name, shape, what, other, expected, axis) in checks {
            let (got, expected) = (shape[rank - axis], expected[rank - axis]);
            if got != expected {
                return Err(AttnError::shape(
                    name,
                    format!("{what} is {got} but {other} is {expected} {}", self.all()),
                ));
            }
        }
        if rank >= 3 && value[rank - 3] != key[rank - 3] {
            return Err(AttnError::shape(
                "value",
                format!(
                    "has {} heads but key has {} {}",
                    value[rank - 3],
                    key[rank - 3],
                    self.all()
                ),
            ));
        }
        Ok(())
    }

    /// Query heads equal the kv heads, or are a multiple of them with `enable_gqa`.
    fn check_groups(&self, enable_gqa: bool) -> Result<(usize, usize), AttnError> {
        let rank = self.query.len();
        if rank < 3 {
            return Ok((1, 1));
        }
        let (query_heads, kv_heads) = (self.query[rank - 3], self.key[rank - 3]);
        if query_heads == kv_heads {
            return Ok((query_heads, kv_heads));
        }
        if !enable_gqa {
            return Err(AttnError::shape(
                "key",
                format!(
                    "query has {query_heads} heads but key/value have {kv_heads}; pass \
                     enable_gqa=True for grouped-query attention {}",
                    self.all()
                ),
            ));
        }
        if kv_heads == 0 || query_heads % kv_heads != 0 {
            return Err(AttnError::shape(
                "enable_gqa",
                format!(
                    "query heads ({query_heads}) must be a multiple of key/value heads \
                     ({kv_heads}) {}",
                    self.all()
                ),
            ));
        }
        Ok((query_heads, kv_heads))
    }
}

impl Geometry {
    /// The sizes of a call with these shapes, or an error naming the argument at fault.
    pub(crate) fn check(
        query: &[usize],
        key: &[usize],
        value: &[usize],
        enable_gqa: bool,
    ) -> Result<Self, AttnError> {
        let shapes = Shapes { query, key, value };
        shapes.check_ranks()?;
        shapes.check_sizes()?;
        let (query_heads, kv_heads) = shapes.check_groups(enable_gqa)?;
        let rank = query.len();
        let batch_shape = query[..rank.saturating_sub(3)].to_vec();
        Ok(Geometry {
            query_heads,
            kv_heads,
            batch: batch_shape.iter().product(),
            num_queries: query[rank - 2],
            num_keys: key[rank - 2],
            depth: query[rank - 1],
            value_dim: value[rank - 1],
            outer_shape: query[..rank - 2].to_vec(),
            batch_shape,
        })
    }

    pub(crate) fn output_shape(&self) -> Vec<usize> {
        let mut shape = self.outer_shape.clone();
        shape.extend([self.num_queries, self.value_dim]);
        shape
    }

    pub(crate) fn weights_shape(&self) -> Vec<usize> {
        let mut shape = self.outer_shape.clone();
        shape.extend([self.num_queries, self.num_keys]);
        shape
    }

    /// The log-sum-exp of every query row: `(..., Hq, L)`.
    pub(crate) fn lse_shape(&self) -> Vec<usize> {
        let mut shape = self.outer_shape.clone();
        shape.push(self.num_queries);
        shape
    }

    /// (batch, query head) pairs.
    pub(crate) fn heads(&self) -> usize {
        self.batch * self.query_heads
    }

    /// Query heads per kv head.
    pub(crate) fn group(&self) -> usize {
        self.query_heads / self.kv_heads.max(1)
    }
}

/// Where a mask's elements live, as element strides that broadcast it to
/// `(batch..., Hq, L, S)` (0 along broadcast dims).
pub(crate) struct MaskPlan {
    batch_strides: Vec<usize>,
    pub head_stride: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Whether a mask of `mask_shape` broadcasts to `target` (NumPy rules, right-aligned).
pub(crate) fn broadcasts(mask_shape: &[usize], target: &[usize]) -> bool {
    mask_shape.len() <= target.len()
        && mask_shape
            .iter()
            .rev()
            .zip(target.iter().rev())
            .all(|(&m, &t)| m == t || m == 1)
}

/// Refuses a mask that does not broadcast to the weights shape.
fn check_mask_shape(mask_shape: &[usize], geometry: &Geometry) -> Result<(), AttnError> {
    let target = geometry.weights_shape();
    if broadcasts(mask_shape, &target) {
        return Ok(());
    }
    Err(AttnError::shape(
        "attn_mask",
        format!(
            "shape {} does not broadcast to the weights shape {} (..., Hq, L, S)",
            shape_str(mask_shape),
            shape_str(&target)
        ),
    ))
}

impl MaskPlan {
    /// `strides` are the mask's element strides, one per dim of `mask_shape` (which
    /// [`check_mask_shape`] accepted).
    pub(crate) fn new(mask_shape: &[usize], strides: &[usize], geometry: &Geometry) -> Self {
        // Right-aligned onto (batch..., Hq, L, S); a length-1 dim is broadcast: stride 0.
        let full_rank = geometry.batch_shape.len() + 3;
        let mut aligned = vec![0usize; full_rank];
        for (offset, (&dim, &stride)) in mask_shape.iter().zip(strides).rev().enumerate() {
            if dim != 1 {
                aligned[full_rank - 1 - offset] = stride;
            }
        }
        MaskPlan {
            batch_strides: aligned[..full_rank - 3].to_vec(),
            head_stride: aligned[full_rank - 3],
            row_stride: aligned[full_rank - 2],
            col_stride: aligned[full_rank - 1],
        }
    }

    /// Offset of element (query 0, key 0) for flattened batch index `batch` and head `head`.
    pub(crate) fn base(&self, geometry: &Geometry, batch: usize, head: usize) -> usize {
        let mut remaining = batch;
        let mut offset = head * self.head_stride;
        for (dim, stride) in geometry.batch_shape.iter().zip(&self.batch_strides).rev() {
            offset += (remaining % dim) * stride;
            remaining /= dim;
        }
        offset
    }

    /// The cells of `data` for the head whose element (query 0, key 0) is at `base`.
    pub(crate) fn cells<'a, M>(&self, data: &'a [M], base: usize) -> MaskCells<'a, M> {
        MaskCells {
            data,
            base,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// The checks shared by every entry point once the shapes fit: scale, mask shape, weights size.
pub(crate) fn check_call<T: Element>(
    geometry: &Geometry,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<(), AttnError> {
    if let Some(scale) = options.scale {
        if !scale.is_finite() {
            return Err(AttnError::value(
                "scale",
                format!("must be finite, got {scale}"),
            ));
        }
        score_scale::<T>(scale)?;
    }
    if let Some(shape) = mask.shape() {
        check_mask_shape(shape, geometry)?;
    }
    if let Mask::Expr(expr) = mask {
        expr.check(MaskShape {
            num_queries: geometry.num_queries,
            num_keys: geometry.num_keys,
        })?;
    }
    if options.return_weights {
        check_weights_fit::<T>(&geometry.weights_shape())?;
    }
    Ok(())
}

/// Softcapping needs a positive finite cap; ALiBi one finite slope per query head.
pub(crate) fn check_score_mods(geometry: &Geometry, mods: &ScoreMods<'_>) -> Result<(), AttnError> {
    if let Some(cap) = mods.softcap {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(AttnError::value(
                "softcap",
                format!("must be a finite number > 0, got {cap}"),
            ));
        }
    }
    if let Some(slopes) = mods.alibi_slopes {
        if slopes.len() != geometry.query_heads {
            return Err(AttnError::shape(
                "alibi_slopes",
                format!(
                    "needs one slope per query head: shape ({},) for {} heads, got ({},)",
                    geometry.query_heads,
                    geometry.query_heads,
                    slopes.len()
                ),
            ));
        }
        if let Some(bad) = slopes.iter().find(|slope| !slope.is_finite()) {
            return Err(AttnError::value(
                "alibi_slopes",
                format!("must be finite, got {bad}"),
            ));
        }
    }
    Ok(())
}

/// Refuses, before anything is allocated, weights of `shape` larger than the memory limit.
pub(crate) fn check_weights_fit<T>(shape: &[usize]) -> Result<(), AttnError> {
    let bytes = shape
        .iter()
        .fold(std::mem::size_of::<T>() as u128, |product, &dim| {
            product.saturating_mul(dim as u128)
        });
    let limit = weights_memory_limit()?;
    if bytes > limit as u128 {
        return Err(AttnError::WeightsTooLarge {
            shape: shape.to_vec(),
            bytes,
            limit,
        });
    }
    Ok(())
}
