//! The public entry points of attention: `scaled_dot_product_attention` over arrays, and
//! `attention_over_strided_kv` over keys and values kept in growing buffers (a KV cache), with
//! its grouped-heads decoding path. They check the call (`shapes`), return empty results at
//! once, and hand the work to `schedule`.

pub(crate) mod backward;
pub(crate) mod decode;
pub(crate) mod schedule;
pub(crate) mod shapes;
#[cfg(test)]
mod tests;

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

use crate::attention::decode::decode;
use crate::attention::schedule::{attend_checked, WithLse};
use crate::attention::shapes::{check_call, check_score_mods, Geometry};
use crate::bounds::{Bounds, CausalAlignment, Window};
use crate::error::{shape_str, AttnError};
use crate::kernel::decode::{DecodeCall, StoredRows};
use crate::kernel::{score_scale, KernelElement};
use crate::masks::MaskExpr;
use crate::memory::standard_layout;
use crate::simd::{active_level, SimdLevel};

/// Options of one attention call; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOptions {
    pub is_causal: bool,
    pub alignment: CausalAlignment,
    pub window: Option<Window>,
    /// Multiplies `Q·Kᵀ`; `None` means `1 / sqrt(D)`.
    pub scale: Option<f64>,
    pub enable_gqa: bool,
    pub return_weights: bool,
    /// Worker threads for this call; `None` uses the engine-wide count.
    pub num_threads: Option<usize>,
}

impl AttentionOptions {
    /// The scale of `Q·Kᵀ` for heads of width `depth`: the option, else `1 / sqrt(D)` (1 for an
    /// empty head, whose scores are all 0 anyway). The one home of the default.
    pub fn scale_for(&self, depth: usize) -> f64 {
        self.scale.unwrap_or(if depth == 0 {
            1.0
        } else {
            1.0 / (depth as f64).sqrt()
        })
    }
}

/// What happens to each score `s = scale·q·k` before the mask: softcapping `c·tanh(s/c)`,
/// then ALiBi's `slope[h]·(j - c(i))` on the call's diagonal.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreMods<'a> {
    pub softcap: Option<f64>,
    /// One slope per query head.
    pub alibi_slopes: Option<&'a [f64]>,
}

impl ScoreMods<'_> {
    fn any(&self) -> bool {
        self.softcap.is_some() || self.alibi_slopes.is_some()
    }
}

/// An attention mask broadcastable to `(..., Hq, L, S)`.
pub enum Mask<'a, T> {
    None,
    /// True = the key takes part.
    Bool(ArrayViewD<'a, bool>),
    /// Added to the scaled scores; `-inf` hides the key.
    Additive(ArrayViewD<'a, T>),
    /// A mask expression, the same for every batch and head, evaluated a tile at a time.
    Expr(&'a MaskExpr),
}

impl<T> Mask<'_, T> {
    /// The same mask, borrowed.
    pub fn view(&self) -> Mask<'_, T> {
        match self {
            Mask::None => Mask::None,
            Mask::Bool(view) => Mask::Bool(view.view()),
            Mask::Additive(view) => Mask::Additive(view.view()),
            Mask::Expr(expr) => Mask::Expr(expr),
        }
    }

    /// The mask's shape (`None` without a mask, or for an expression, which has none).
    pub fn shape(&self) -> Option<&[usize]> {
        match self {
            Mask::None | Mask::Expr(_) => None,
            Mask::Bool(view) => Some(view.shape()),
            Mask::Additive(view) => Some(view.shape()),
        }
    }
}

/// The output `(..., Hq, L, Dv)` and, when asked for, the weights `(..., Hq, L, S)`.
pub struct Attention<T> {
    pub output: ArrayD<T>,
    pub weights: Option<ArrayD<T>>,
}

/// An [`Attention`] result with the log-sum-exp of every query row, `(..., Hq, L)`: the natural
/// log of `Σ_j exp(s_ij)` over the row's visible scaled, masked scores, `-inf` for a row that
/// sees no key. It is what the backward pass needs to recompute the weights.
pub struct AttentionWithLse<T> {
    pub attention: Attention<T>,
    pub lse: ArrayD<T>,
}

/// [`scaled_dot_product_attention_with_mods`] that also returns each query row's log-sum-exp
/// (of the modified, masked scores: what the backward pass recomputes its weights from).
pub fn scaled_dot_product_attention_with_lse<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<AttentionWithLse<T>, AttnError> {
    let (attention, lse) =
        attend_arrays(active_level(), query, key, value, mask, options, mods, true)?;
    let lse = lse.expect("the log-sum-exp was asked for");
    Ok(AttentionWithLse { attention, lse })
}

/// Exact scaled dot-product attention; see [`AttentionOptions`] for the options and the
/// Python docs for the full contract.
pub fn scaled_dot_product_attention<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    attention_at_level(active_level(), query, key, value, mask, options)
}

/// [`scaled_dot_product_attention`] with softcapping and/or ALiBi ([`ScoreMods`]).
pub fn scaled_dot_product_attention_with_mods<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<Attention<T>, AttnError> {
    attention_with_mods_at_level(active_level(), query, key, value, mask, options, mods)
}

/// [`scaled_dot_product_attention`] at a given instruction set (tests cover each one).
pub(crate) fn attention_at_level<T: KernelElement>(
    level: SimdLevel,
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let mods = ScoreMods::default();
    attention_with_mods_at_level(level, query, key, value, mask, options, &mods)
}

/// [`attention_at_level`] with softcapping and/or ALiBi.
pub(crate) fn attention_with_mods_at_level<T: KernelElement>(
    level: SimdLevel,
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<Attention<T>, AttnError> {
    attend_arrays(level, query, key, value, mask, options, mods, false)
        .map(|(attention, _)| attention)
}

/// Attention over arrays at `level` with the score modifiers `mods`, and the log-sum-exp
/// when `want_lse`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call's inputs, passed through"
)]
fn attend_arrays<T: KernelElement>(
    level: SimdLevel,
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
    want_lse: bool,
) -> Result<WithLse<T>, AttnError> {
    let geometry = Geometry::check(
        query.shape(),
        key.shape(),
        value.shape(),
        options.enable_gqa,
    )?;
    check_call(&geometry, &mask, options)?;
    check_score_mods(&geometry, mods)?;
    if let Some(empty) = nothing_to_compute(&geometry, options, want_lse)? {
        return Ok(empty);
    }
    // Borrow contiguous inputs as they are; copy only strided, transposed or reversed ones.
    let key = standard_layout(key, "key")?;
    let value = standard_layout(value, "value")?;
    let kv = StridedKv {
        key: key.as_slice().expect("standard layout is contiguous"),
        value: value.as_slice().expect("standard layout is contiguous"),
        kv_heads: geometry.kv_heads,
        num_keys: geometry.num_keys,
        row_capacity: geometry.num_keys,
        depth: geometry.depth,
        value_dim: geometry.value_dim,
    };
    attend_kv(level, &geometry, query, &kv, &mask, options, mods, want_lse)
}

/// A checked call over keys and values in [`StridedKv`] buffers, to the kernel that fits it.
#[expect(
    clippy::too_many_arguments,
    reason = "one call's inputs, passed through"
)]
fn attend_kv<T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'_, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
    want_lse: bool,
) -> Result<WithLse<T>, AttnError> {
    let plain = matches!(mask, Mask::None) && !mods.any();
    if plain && geometry.num_queries == 1 && geometry.value_dim == geometry.depth {
        if let Some(result) = decode_float32(level, geometry, query.view(), kv, options)? {
            return Ok(result);
        }
    }
    // Regrouped heads would share one head's slope, so ALiBi keeps the plain path.
    if decodes_by_group(geometry, mask, options) && !mods.any() {
        return attend_query_groups(level, geometry, query, kv, mask, options, want_lse);
    }
    attend_checked(level, geometry, query, kv, mask, options, mods, want_lse)
}

/// One float32 query row per head with no mask: the decoding kernel, the one a KV cache runs,
/// so a decoding step gives the same bits through a cache and through arrays. `None` for
/// float64, which the general kernel computes in its own precision.
fn decode_float32<T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'_, T>,
    options: &AttentionOptions,
) -> Result<Option<WithLse<T>>, AttnError> {
    let (Some(key), Some(value)) = (T::as_f32(kv.key), T::as_f32(kv.value)) else {
        return Ok(None);
    };
    let query = standard_layout(query, "query")?;
    let query = T::as_f32(query.as_slice().expect("standard layout is contiguous"))
        .expect("the query has the keys' dtype");
    let depth = geometry.depth;
    let call = DecodeCall {
        query,
        batch: geometry.batch,
        query_heads: geometry.query_heads,
        kv_heads: geometry.kv_heads,
        num_queries: geometry.num_queries,
        num_keys: geometry.num_keys,
        depth,
        row_capacity: kv.row_capacity,
        first_row: 0,
        score_scale: score_scale::<f32>(options.scale_for(depth))?,
        bounds: Bounds::new(
            geometry.num_queries,
            geometry.num_keys,
            options.is_causal,
            options.alignment,
            options.window,
        ),
    };
    let rows = |data| StoredRows {
        data,
        per_row: depth,
    };
    let decoded = decode(
        level,
        &call,
        &rows(key),
        &rows(value),
        options.num_threads,
        options.return_weights,
    )?;
    let (attention, lse) = decoded.into_arrays(&geometry.output_shape());
    Ok(Some((attention, Some(lse))))
}

/// The result at once when the output, weights and log-sum-exp hold no element: the work
/// must follow the data, not leading dims that multiply to billions of empty heads.
fn nothing_to_compute<T: KernelElement>(
    geometry: &Geometry,
    options: &AttentionOptions,
    want_lse: bool,
) -> Result<Option<WithLse<T>>, AttnError> {
    let no_heads = geometry.outer_shape.contains(&0) || geometry.num_queries == 0;
    let output_empty = no_heads || geometry.value_dim == 0;
    let weights_empty = no_heads || geometry.num_keys == 0;
    if !output_empty || (options.return_weights && !weights_empty) || (want_lse && !no_heads) {
        return Ok(None);
    }
    let (output_shape, weights_shape) = (geometry.output_shape(), geometry.weights_shape());
    let output = ArrayD::from_shape_vec(IxDyn(&output_shape), Vec::new())
        .expect("an empty shape holds no element");
    let weights = options.return_weights.then(|| {
        ArrayD::from_shape_vec(IxDyn(&weights_shape), Vec::new())
            .expect("an empty shape holds no element")
    });
    let lse = want_lse.then(|| {
        ArrayD::from_shape_vec(IxDyn(&geometry.lse_shape()), Vec::new())
            .expect("an empty shape holds no element")
    });
    Ok(Some((Attention { output, weights }, lse)))
}

/// Keys and values kept in buffers with room to grow, as in a KV cache: `key` holds
/// `(..., Hkv, row_capacity, D)` and `value` `(..., Hkv, row_capacity, Dv)` (leading dims
/// those of the query), and the first `num_keys` rows of every head take part.
#[derive(Debug, Clone, Copy)]
pub struct StridedKv<'a, T> {
    pub key: &'a [T],
    pub value: &'a [T],
    pub kv_heads: usize,
    pub num_keys: usize,
    pub row_capacity: usize,
    pub depth: usize,
    pub value_dim: usize,
}

/// Whether one query row with grouped heads can run each kv group's query heads as one block
/// (the mask, if any, must be the same for every head and row).
fn decodes_by_group<T>(
    geometry: &Geometry,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> bool {
    let group = geometry.group();
    // The head dim is third from the right; a mask of lower rank broadcasts over it.
    let same_mask_for_every_head = mask
        .shape()
        .is_none_or(|shape| shape.len() < 3 || shape[shape.len() - 3] == 1);
    // An expression reads query positions, which regrouping heads into rows would change.
    let expression = matches!(mask, Mask::Expr(_));
    geometry.num_queries == 1
        && group > 1
        && !options.return_weights
        && same_mask_for_every_head
        && !expression
}

/// [`scaled_dot_product_attention`] with `query` `(..., Hq, L, D)` against keys and values
/// read in place from [`StridedKv`] buffers (no copy of the cache per call).
///
/// Decoding one query row with grouped heads runs the query heads that share a kv head as one
/// block of rows, so each kv head's keys and values are read from memory once, not once per
/// query head (when the mask, if any, is the same for every head).
pub fn attention_over_strided_kv<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let level = active_level();
    let rank = query.ndim();
    if rank < 3 {
        return Err(AttnError::shape(
            "query",
            format!(
                "expected (..., Hq, L, D) to attend over cached keys, got shape {}",
                shape_str(query.shape())
            ),
        ));
    }
    let lead = &query.shape()[..rank - 3];
    let key_shape = [lead, &[kv.kv_heads, kv.num_keys, kv.depth]].concat();
    let value_shape = [lead, &[kv.kv_heads, kv.num_keys, kv.value_dim]].concat();
    let geometry = Geometry::check(query.shape(), &key_shape, &value_shape, options.enable_gqa)?;
    // The last head's rows in use must be in the buffers; rows after them need not be.
    let heads = geometry.batch * kv.kv_heads;
    let kv_rows = match heads {
        0 => 0,
        _ => (heads - 1) * kv.row_capacity + kv.num_keys,
    };
    if kv.num_keys > kv.row_capacity
        || kv.key.len() < kv_rows * kv.depth
        || kv.value.len() < kv_rows * kv.value_dim
    {
        return Err(AttnError::value(
            "key",
            format!(
                "buffers of {} key and {} value elements do not hold {kv_rows} rows of depth {} \
                 and {} with {} keys in use",
                kv.key.len(),
                kv.value.len(),
                kv.depth,
                kv.value_dim,
                kv.num_keys
            ),
        ));
    }
    check_call(&geometry, &mask, options)?;
    if let Some((empty, _)) = nothing_to_compute(&geometry, options, false)? {
        return Ok(empty);
    }
    let plain = ScoreMods::default();
    attend_kv(level, &geometry, query, kv, &mask, options, &plain, false)
        .map(|(attention, _)| attention)
}

/// One query row per head, `group` query heads per kv head: the group's heads become the rows
/// of one block against their shared keys. With a single query row the causal and window rules
/// reduce to one range of keys, which is sliced out so the block needs no per-row rule.
fn attend_query_groups<'a, T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'a, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
    want_lse: bool,
) -> Result<WithLse<T>, AttnError> {
    let group = geometry.group();
    let visible = Bounds::new(
        1,
        geometry.num_keys,
        options.is_causal,
        options.alignment,
        options.window,
    )
    .row_keys(0);
    let query = standard_layout(query, "query")?;
    let mut grouped_shape = geometry.batch_shape.clone();
    grouped_shape.extend([geometry.kv_heads, group, geometry.depth]);
    let grouped_query = query
        .view()
        .into_shape_with_order(IxDyn(&grouped_shape))
        .expect("a contiguous (..., Hq, 1, D) query regroups as (..., Hkv, group, D)");
    // A mask broadcast along the keys (last dim 1) has nothing to slice.
    let per_key = |shape: &[usize]| shape.last() != Some(&1);
    let grouped_mask = match mask {
        Mask::None => Mask::None,
        Mask::Bool(view) => Mask::Bool(if per_key(view.shape()) {
            view.slice_axis(Axis(view.ndim() - 1), Slice::from(visible.clone()))
        } else {
            view.view()
        }),
        Mask::Additive(view) => Mask::Additive(if per_key(view.shape()) {
            view.slice_axis(Axis(view.ndim() - 1), Slice::from(visible.clone()))
        } else {
            view.view()
        }),
        Mask::Expr(expr) => Mask::Expr(expr),
    };
    let grouped_options = AttentionOptions {
        is_causal: false,
        window: None,
        enable_gqa: false,
        return_weights: false,
        ..*options
    };
    let mut key_shape = grouped_shape.clone();
    key_shape[geometry.batch_shape.len() + 1] = visible.len();
    let mut value_shape = key_shape.clone();
    *value_shape.last_mut().expect("rank >= 3") = geometry.value_dim;
    let grouped = Geometry::check(&grouped_shape, &key_shape, &value_shape, false)?;
    check_call(&grouped, &grouped_mask, &grouped_options)?;
    // Every (batch, kv head) starts its rows at `visible.start`; an empty batch has no rows.
    let from = |buffer: &'a [T], width: usize| buffer.get(visible.start * width..).unwrap_or(&[]);
    let rows = StridedKv {
        key: from(kv.key, kv.depth),
        value: from(kv.value, kv.value_dim),
        num_keys: visible.len(),
        ..*kv
    };
    let (result, lse) = attend_checked(
        level,
        &grouped,
        grouped_query,
        &rows,
        &grouped_mask,
        &grouped_options,
        &ScoreMods::default(),
        want_lse,
    )?;
    let output = result
        .output
        .into_shape_with_order(IxDyn(&geometry.output_shape()))
        .expect("(..., Hkv, group, Dv) output regroups as (..., Hq, 1, Dv)");
    let lse = lse.map(|lse| {
        lse.into_shape_with_order(IxDyn(&geometry.lse_shape()))
            .expect("(..., Hkv, group) log-sum-exp regroups as (..., Hq, 1)")
    });
    Ok((
        Attention {
            output,
            weights: None,
        },
        lse,
    ))
}
