//! The tiled attention kernel: one block of query rows against a range of keys, with an online
//! softmax (FlashAttention-style) so the L x S score matrix never exists, and the weights path
//! that does materialise it when asked.
//!
//! Scores are kept in base 2: `Q` is pre-multiplied by `scale · log2(e)` (and additive masks by
//! `log2(e)`), so each probability is one `exp2`. Key blocks that the causal/window rules hide
//! are never visited; blocks they leave fully visible skip the per-element rule check.

pub(crate) mod backward;
pub(crate) mod decode;
mod dispatch;
pub(crate) mod microkernel;

pub use dispatch::KernelElement;

use std::ops::Range;

use self::microkernel::{
    accumulate_pv, add_linear_bias, column_exp2, column_max, row_exp2, row_max, scale_row,
    scores_by_dot, softcap_scores, transposed_scores, WeightLayout,
};
use crate::bounds::Bounds;
use crate::element::Element;
use crate::error::AttnError;
use crate::masks::{MaskExpr, MaskShape, TileClass};
use crate::simd::SimdVec;

/// Query rows per task.
pub const QUERY_BLOCK: usize = 64;
/// Keys per inner block: the block's key rows (read in place), its score tile and its value
/// rows stay in L2 between the `Q·Kᵀ` pass and the `P·V` pass that reads the scores back.
pub const KEY_BLOCK: usize = 256;

/// One head's cells of an array mask: the element for (query `i`, key `j`) lives at
/// `data[base + i * row_stride + j * col_stride]` (strides are 0 along broadcast dims).
#[derive(Clone, Copy)]
pub struct MaskCells<'a, M> {
    pub data: &'a [M],
    pub base: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<M: Copy> MaskCells<'_, M> {
    /// The element for query `row` and key `key`.
    #[inline(always)]
    pub fn at(&self, row: usize, key: usize) -> M {
        self.data[self.base + row * self.row_stride + key * self.col_stride]
    }
}

/// One head's mask: none, array cells (bool, or added to the scores), or an expression.
#[derive(Clone, Copy)]
pub enum MaskRows<'a, T> {
    None,
    Bool(MaskCells<'a, bool>),
    Additive(MaskCells<'a, T>),
    /// A mask expression, evaluated a tile at a time.
    Expr {
        expr: &'a MaskExpr,
        shape: MaskShape,
    },
}

/// One (batch, head) pair's inputs: `q` is `L x D`, `k` is `S x D`, `v` is `S x Dv`.
#[derive(Clone, Copy)]
pub struct HeadData<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub mask: MaskRows<'a, T>,
    /// This head's ALiBi slope times `log2(e)`, if any.
    pub alibi_slope: Option<T>,
}

/// What every task of one call shares.
#[derive(Clone, Copy)]
pub struct KernelParams<T> {
    pub num_keys: usize,
    pub depth: usize,
    pub value_dim: usize,
    pub bounds: Bounds,
    /// `scale · log2(e)`, folded into Q.
    pub score_scale: T,
    /// Softcapping, as `(cap · log2(e), 1 / cap)` for scores in base 2.
    pub softcap: Option<(T, T)>,
    /// `c(i) - i`: where the diagonal of the call's alignment lies (for ALiBi).
    pub diagonal_offset: i64,
}

/// `scale · log2(e)` in `T`, the factor folded into Q. A finite scale whose factor overflows `T`
/// (above about 2.4e38 for float32) would turn every score into ±inf or NaN, so it is refused.
pub(crate) fn score_scale<T: Element>(scale: f64) -> Result<T, AttnError> {
    let log2_e = std::f64::consts::LOG2_E;
    let factor = T::from_f64(scale * log2_e);
    if factor.is_finite() {
        Ok(factor)
    } else {
        Err(AttnError::value(
            "scale",
            format!(
                "{scale:e} is too large for {}: its magnitude must be at most {:.3e}",
                T::TYPE_NAME,
                T::MAX.to_f64() / log2_e
            ),
        ))
    }
}

/// Softcapping's constants for the kernel, `(cap · log2(e), 1 / cap)`, refused (as an
/// overflowing `scale` is) where `T` cannot carry them.
pub(crate) fn softcap_params<T: Element>(cap: f64) -> Result<(T, T), AttnError> {
    let log2_e = std::f64::consts::LOG2_E;
    let (cap_base2, inverse) = (T::from_f64(cap * log2_e), T::from_f64(1.0 / cap));
    if cap_base2.is_finite() && inverse.is_finite() {
        Ok((cap_base2, inverse))
    } else {
        Err(AttnError::value(
            "softcap",
            format!(
                "{cap:e} is out of range for {}: it must lie between {:.3e} and {:.3e}",
                T::TYPE_NAME,
                1.0 / T::MAX.to_f64(),
                T::MAX.to_f64() / log2_e
            ),
        ))
    }
}

/// Refuses ALiBi slopes whose largest bias, `slope · log2(e) · max(L, S)` in the kernel's
/// base 2, `T` cannot carry (the bias of a far key would become infinite, and the diagonal's
/// `inf · 0` NaN).
pub(crate) fn check_alibi_range<T: Element>(
    slopes: &[f64],
    num_queries: usize,
    num_keys: usize,
) -> Result<(), AttnError> {
    let reach = num_queries.max(num_keys).max(1) as f64 * std::f64::consts::LOG2_E;
    match slopes
        .iter()
        .find(|slope| !T::from_f64(slope.abs() * reach).is_finite())
    {
        None => Ok(()),
        Some(slope) => Err(AttnError::value(
            "alibi_slopes",
            format!(
                "{slope:e} is too large for {} at these lengths: |slope| x max(L, S) must be at \
                 most {:.3e}",
                T::TYPE_NAME,
                T::MAX.to_f64() / std::f64::consts::LOG2_E
            ),
        )),
    }
}

/// Online-softmax state of a block of rows: running max and sum (base 2) and the unnormalised
/// output accumulator (`rows x Dv`).
pub struct SoftmaxState<T> {
    pub max: Vec<T>,
    pub sum: Vec<T>,
    pub acc: Vec<T>,
}

impl<T> Default for SoftmaxState<T> {
    fn default() -> Self {
        SoftmaxState {
            max: Vec::new(),
            sum: Vec::new(),
            acc: Vec::new(),
        }
    }
}

impl<T: Element> SoftmaxState<T> {
    /// Empties the state for `rows` new rows, keeping its allocations.
    pub(crate) fn reset(&mut self, rows: usize, value_dim: usize) {
        refill(&mut self.max, rows, T::NEG_INFINITY);
        refill(&mut self.sum, rows, T::ZERO);
        refill(&mut self.acc, rows * value_dim, T::ZERO);
    }

    /// Writes `acc / sum` into `out` (`rows x Dv`). A NaN anywhere in a row's sum or
    /// accumulator makes its output NaN. A row with no weight (no visible key, or only scores of
    /// -inf) gets zeros, unless a visible NaN or inf value met its zero weight (0 · NaN is NaN).
    pub(crate) fn finish_into(&self, out: &mut [T], value_dim: usize) {
        for (row, &sum) in self.sum.iter().enumerate() {
            let out_row = &mut out[row * value_dim..(row + 1) * value_dim];
            let acc_row = &self.acc[row * value_dim..(row + 1) * value_dim];
            let inverse = if sum == T::ZERO {
                T::ZERO
            } else {
                T::ONE / sum
            };
            for (o, a) in out_row.iter_mut().zip(acc_row) {
                *o = *a * inverse;
            }
        }
    }

    /// Writes each row's log-sum-exp of its scaled, masked scores (natural log) into `lse`:
    /// `-inf` for a row with no weight, NaN for a row that met a NaN.
    pub(crate) fn lse_into(&self, lse: &mut [T]) {
        for ((out, &max), &sum) in lse.iter_mut().zip(&self.max).zip(&self.sum) {
            *out = log_sum_exp2(max, sum);
        }
    }

    /// Folds `other` (the same rows over a later range of keys) into `self`.
    pub(crate) fn merge(&mut self, other: &SoftmaxState<T>, value_dim: usize) {
        // A side that saw no finite score has sum 0 and an accumulator of zeros (or NaN, kept).
        let factor = |max: T, best: T| {
            if max == T::NEG_INFINITY {
                T::ZERO
            } else {
                (max - best).exp2()
            }
        };
        for row in 0..self.max.len() {
            let (mine, theirs) = (self.max[row], other.max[row]);
            let best = mine.max(theirs);
            let (keep, take) = (factor(mine, best), factor(theirs, best));
            self.max[row] = best;
            self.sum[row] = self.sum[row] * keep + other.sum[row] * take;
            let acc_row = &mut self.acc[row * value_dim..(row + 1) * value_dim];
            let other_row = &other.acc[row * value_dim..(row + 1) * value_dim];
            for (a, b) in acc_row.iter_mut().zip(other_row) {
                *a = *a * keep + *b * take;
            }
        }
    }
}

/// `ln(Σ 2^s)` from a row's base-2 shift and its `sum = Σ 2^(s - shift)`, computed in f64.
fn log_sum_exp2<T: Element>(shift: T, sum: T) -> T {
    if sum == T::ZERO {
        return T::NEG_INFINITY;
    }
    let (shift, sum) = (shift.to_f64(), sum.to_f64());
    T::from_f64((shift + sum.log2()) * std::f64::consts::LN_2)
}

pub(crate) fn round_up(value: usize, multiple: usize) -> usize {
    value.div_ceil(multiple) * multiple
}

/// At most this many query rows get their scores by dot products instead of the register-tiled
/// kernel, which would pad them to a full tile of queries.
const DOT_MAX_QUERIES: usize = 4;

/// Buffers a task reuses from one block to the next (and a worker from one task to the next),
/// so small problems are not dominated by allocation.
#[derive(Default)]
pub struct Scratch<T> {
    queries: Vec<T>,
    scores: Vec<T>,
    block_max: Vec<T>,
    shift: Vec<T>,
    block_sum: Vec<T>,
    /// The online-softmax state of the task being computed.
    pub state: SoftmaxState<T>,
    mask_tile: TileScratch<T>,
}

/// Where a mask expression writes the visibility of one tile's pairs, and the `0, 1, 2, ...`
/// ramp the ALiBi bias is built from.
pub(crate) struct TileScratch<T> {
    visible: Vec<bool>,
    spare: Vec<Vec<bool>>,
    ramp: Vec<T>,
}

impl<T> Default for TileScratch<T> {
    fn default() -> Self {
        TileScratch {
            visible: Vec::new(),
            spare: Vec::new(),
            ramp: Vec::new(),
        }
    }
}

/// Clears `buffer` and fills it with `len` copies of `value`, keeping its allocation.
pub(crate) fn refill<T: Copy>(buffer: &mut Vec<T>, len: usize, value: T) {
    buffer.clear();
    buffer.resize(len, value);
}

/// Gives `buffer` length `len` without clearing the elements it keeps: for a tile that is
/// written whole before it is read, where zeroing it first would cost a pass over memory.
pub(crate) fn resize_for_overwrite<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) {
    buffer.resize(len, T::default());
}

/// A block's queries, multiplied by `score_scale` and laid out for the score kernel: `Qᵀ`
/// (`depth x width`) for the tiled kernel, or the rows themselves for the dot-product one.
/// `width` is the number of query columns of the `Sᵀ` tile (the queries, padded).
struct PackedQueries<'a, T> {
    data: &'a [T],
    width: usize,
    by_dot: bool,
}

impl<T> PackedQueries<'_, T> {
    /// Where the score of (query row, key) of a block lives: row-major (`rows x key_capacity`)
    /// for the dot-product path, `Sᵀ` (`keys x width`) for the tiled one.
    fn score_layout(&self, key_capacity: usize) -> WeightLayout {
        if self.by_dot {
            WeightLayout {
                row_stride: key_capacity,
                key_stride: 1,
            }
        } else {
            WeightLayout {
                row_stride: 1,
                key_stride: self.width,
            }
        }
    }

    /// Score buffer length for blocks of up to `key_capacity` keys.
    fn scores_len(&self, key_capacity: usize) -> usize {
        key_capacity.max(1) * self.width
    }
}

fn pack_queries<'a, V: SimdVec>(
    params: &KernelParams<V::Elem>,
    q: &[V::Elem],
    rows: &Range<usize>,
    data: &'a mut Vec<V::Elem>,
) -> PackedQueries<'a, V::Elem> {
    let depth = params.depth;
    let queries = &q[rows.start * depth..rows.end * depth];
    if rows.len() <= DOT_MAX_QUERIES {
        data.clear();
        data.extend(queries.iter().map(|&x| x * params.score_scale));
        return PackedQueries {
            data,
            width: round_up(rows.len(), V::LANES),
            by_dot: true,
        };
    }
    let tile_width = V::TILE_VECS * V::LANES;
    let width = if rows.len() >= tile_width {
        round_up(rows.len(), tile_width)
    } else {
        round_up(rows.len(), V::LANES)
    };
    refill(data, depth * width, V::Elem::ZERO);
    for (row, query) in queries.chunks_exact(depth.max(1)).enumerate() {
        for (d, &x) in query.iter().enumerate() {
            data[d * width + row] = x * params.score_scale;
        }
    }
    PackedQueries {
        data,
        width,
        by_dot: false,
    }
}

/// What a mask does to one block of (query rows, keys).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MaskCoverage {
    /// Hides every pair: the block is skipped without computing a score.
    Hidden,
    /// Changes nothing (all True, or all 0.0): the block is computed as if unmasked.
    Neutral,
    Mixed,
}

/// Scans the mask over a block. Far cheaper than the block's scores (a byte per pair against
/// `D + Dv` multiply-adds), and it lets a mostly-false mask (a sliding window given as a dense
/// mask, say) cost what its visible pairs cost. Returns the keys of the block that need
/// computing: a mask expression may narrow a partial block to the keys it can show.
pub(crate) fn mask_coverage<T: Element>(
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
) -> (MaskCoverage, Range<usize>) {
    if let MaskRows::Expr { expr, shape } = *mask {
        return match expr.classify(shape, rows, keys) {
            TileClass::Empty => (MaskCoverage::Hidden, keys.clone()),
            TileClass::Full => (MaskCoverage::Neutral, keys.clone()),
            TileClass::Partial(hull) => (MaskCoverage::Mixed, hull),
        };
    }
    (scan_coverage(mask, rows, keys), keys.clone())
}

/// [`mask_coverage`] of an array mask, element by element.
fn scan_coverage<T: Element>(
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
) -> MaskCoverage {
    fn classify<M: Copy>(
        cells: MaskCells<'_, M>,
        rows: &Range<usize>,
        keys: &Range<usize>,
        visible: impl Fn(M) -> bool,
        neutral: impl Fn(M) -> bool,
    ) -> MaskCoverage {
        let (mut any_visible, mut all_neutral) = (false, true);
        for row in rows.clone() {
            for key in keys.clone() {
                let value = cells.at(row, key);
                any_visible |= visible(value);
                all_neutral &= neutral(value);
            }
        }
        match (any_visible, all_neutral) {
            (false, _) => MaskCoverage::Hidden,
            (true, true) => MaskCoverage::Neutral,
            (true, false) => MaskCoverage::Mixed,
        }
    }
    match *mask {
        MaskRows::None | MaskRows::Expr { .. } => MaskCoverage::Neutral,
        MaskRows::Bool(cells) => classify(cells, rows, keys, |m| m, |m| m),
        MaskRows::Additive(cells) => classify(
            cells,
            rows,
            keys,
            |m| m != T::NEG_INFINITY,
            |m| m == T::ZERO,
        ),
    }
}

/// Hides (sets to -inf) the scores the causal/window rules or the mask exclude, and adds an
/// additive mask. (query `r`, key `c`) of the block is at `layout`. Returns whether any key of
/// the block was hidden from any query.
pub(crate) fn apply_visibility<T: Element>(
    params: &KernelParams<T>,
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    scores: &mut [T],
    layout: WeightLayout,
    tile: &mut TileScratch<T>,
) -> bool {
    let structural = !params.bounds.fully_visible(rows, keys);
    if !structural && matches!(mask, MaskRows::None) {
        return false;
    }
    if let MaskRows::Expr { expr, shape } = *mask {
        refill(&mut tile.visible, rows.len() * keys.len(), false);
        expr.fill(shape, rows, keys, &mut tile.visible, &mut tile.spare);
    }
    let log2_e = T::from_f64(std::f64::consts::LOG2_E);
    let mut hidden = false;
    for (offset, row) in rows.clone().enumerate() {
        let cell = |col: usize| offset * layout.row_stride + col * layout.key_stride;
        match *mask {
            MaskRows::None => {}
            MaskRows::Expr { .. } => {
                let visible = &tile.visible[offset * keys.len()..(offset + 1) * keys.len()];
                for (col, &shown) in visible.iter().enumerate() {
                    if !shown {
                        scores[cell(col)] = T::NEG_INFINITY;
                        hidden = true;
                    }
                }
            }
            MaskRows::Bool(cells) => {
                for col in 0..keys.len() {
                    if !cells.at(row, keys.start + col) {
                        scores[cell(col)] = T::NEG_INFINITY;
                        hidden = true;
                    }
                }
            }
            MaskRows::Additive(cells) => {
                for col in 0..keys.len() {
                    let bias = cells.at(row, keys.start + col);
                    // Assigning (not adding) -inf keeps a NaN key score from surviving its mask.
                    if bias == T::NEG_INFINITY {
                        scores[cell(col)] = T::NEG_INFINITY;
                        hidden = true;
                    } else {
                        scores[cell(col)] += bias * log2_e;
                    }
                }
            }
        }
        // After the mask, so a NaN or +inf mask cell at a key these rules hide stays hidden.
        if structural {
            // The row's visible keys are one range: hide what lies before and after it.
            let visible = params.bounds.row_keys(row);
            let first = visible.start.saturating_sub(keys.start).min(keys.len());
            let end = visible
                .end
                .saturating_sub(keys.start)
                .clamp(first, keys.len());
            for col in (0..first).chain(end..keys.len()) {
                scores[cell(col)] = T::NEG_INFINITY;
            }
            hidden |= first > 0 || end < keys.len();
        }
    }
    hidden
}

fn all_finite<T: Element>(values: &[T]) -> bool {
    values.iter().all(|value| value.is_finite())
}

/// Whether query `row` may see key `key`: the causal/window rules and the mask agree. (A NaN
/// or +inf additive mask cell counts as visible: it poisons the row, it does not hide the key.)
fn is_visible<T: Element>(
    params: &KernelParams<T>,
    mask: &MaskRows<'_, T>,
    row: usize,
    key: usize,
) -> bool {
    params.bounds.row_keys(row).contains(&key)
        && match *mask {
            MaskRows::None => true,
            MaskRows::Bool(cells) => cells.at(row, key),
            MaskRows::Additive(cells) => cells.at(row, key) != T::NEG_INFINITY,
            MaskRows::Expr { expr, shape } => expr.visible(shape, row, key),
        }
}

/// `acc += P·V` for `rows` against `keys` (weights at `layout`). When the block hides keys from
/// some rows and holds a NaN or inf value, hidden keys are left out one by one so those values
/// never reach a row that cannot see them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_block<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    head: &HeadData<'_, V::Elem>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    weights: &[V::Elem],
    layout: WeightLayout,
    any_hidden: bool,
    acc: &mut [V::Elem],
) {
    let dv = params.value_dim;
    let values = &head.v[keys.start * dv..keys.end * dv];
    let hidden = |row: usize, key: usize| {
        !is_visible(params, &head.mask, rows.start + row, keys.start + key)
    };
    let guard = any_hidden && !all_finite(values);
    accumulate_pv::<V>(
        weights,
        layout,
        rows.len(),
        keys.len(),
        values,
        dv,
        acc,
        if guard { Some(&hidden) } else { None },
    );
}

/// Scores of `rows` against `keys` into `scores` at `layout`, hidden ones at -inf. Returns
/// whether the rules or the mask hid any key.
#[inline(always)]
#[expect(clippy::too_many_arguments)]
unsafe fn block_scores<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    head: &HeadData<'_, V::Elem>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    queries: &PackedQueries<'_, V::Elem>,
    scores: &mut [V::Elem],
    layout: WeightLayout,
    coverage: MaskCoverage,
    tile: &mut TileScratch<V::Elem>,
) -> bool {
    let depth = params.depth;
    let key_rows = &head.k[keys.start * depth..keys.end * depth];
    if queries.by_dot {
        scores_by_dot::<V>(
            key_rows,
            keys.len(),
            queries.data,
            rows.len(),
            depth,
            layout.row_stride,
            scores,
            &head.v[keys.start * params.value_dim..keys.end * params.value_dim],
            params.value_dim,
        );
    } else {
        // Padding query columns hold finite values that nothing reads.
        transposed_scores::<V>(
            key_rows,
            keys.len(),
            queries.data,
            depth,
            queries.width,
            scores,
        );
    }
    // Softcapping then ALiBi, before any mask (the order of a score's life), along the score
    // lines of the block: a key's queries (Sᵀ) or a query's keys (rows).
    let lines = if queries.by_dot {
        ScoreLines {
            count: rows.len(),
            len: keys.len(),
            stride: layout.row_stride,
            along_queries: false,
        }
    } else {
        ScoreLines {
            count: keys.len(),
            len: queries.width,
            stride: layout.key_stride,
            along_queries: true,
        }
    };
    modify_score_lines::<V>(params, head.alibi_slope, rows, keys, lines, scores, tile);
    let mask = if coverage == MaskCoverage::Neutral {
        &MaskRows::None
    } else {
        &head.mask
    };
    apply_visibility(params, mask, rows, keys, scores, layout, tile)
}

/// How a block's scores lie: `count` lines of `len` values, `stride` apart, each one key's
/// queries (`along_queries`) or one query's keys.
#[derive(Clone, Copy)]
pub(crate) struct ScoreLines {
    pub count: usize,
    pub len: usize,
    pub stride: usize,
    pub along_queries: bool,
}

/// Softcapping then ALiBi (`alibi_slope` in base 2) on the scores of `rows` against `keys`,
/// laid out as `lines`: the one place scores are modified, shared by the forward and the
/// backward so both see the same scores.
#[inline(always)]
pub(crate) unsafe fn modify_score_lines<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    alibi_slope: Option<V::Elem>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    lines: ScoreLines,
    scores: &mut [V::Elem],
    tile: &mut TileScratch<V::Elem>,
) {
    if params.softcap.is_none() && alibi_slope.is_none() {
        return;
    }
    if tile.ramp.len() < lines.len {
        tile.ramp = (0..lines.len)
            .map(|c| V::Elem::from_f64(c as f64))
            .collect();
    }
    let first_diagonal = rows.start as i64 + params.diagonal_offset;
    for line in 0..lines.count {
        let values = &mut scores[line * lines.stride..][..lines.len];
        if let Some((cap, inverse_cap)) = params.softcap {
            softcap_scores::<V>(values, cap, inverse_cap);
        }
        if let Some(slope) = alibi_slope {
            let first_distance = if lines.along_queries {
                (keys.start + line) as i64 - first_diagonal
            } else {
                keys.start as i64 - (first_diagonal + line as i64)
            };
            add_linear_bias(
                values,
                slope,
                first_distance,
                &tile.ramp,
                lines.along_queries,
            );
        }
    }
}

/// Folds one block's softmax into query `query`'s running state: `best` is the new running
/// max, `block_sum` the block's `Σ 2^(s - best)`.
#[inline(always)]
unsafe fn fold_block<V: SimdVec>(
    state: &mut SoftmaxState<V::Elem>,
    query: usize,
    best: V::Elem,
    block_sum: V::Elem,
    dv: usize,
) {
    let running = state.max[query];
    if best > running && running != V::Elem::NEG_INFINITY {
        // Rescale only when the running max grows.
        let correction = (running - best).exp2();
        state.sum[query] *= correction;
        scale_row::<V>(&mut state.acc[query * dv..(query + 1) * dv], correction);
    }
    state.max[query] = best;
    state.sum[query] += block_sum;
}

/// Online softmax of `rows` over `keys`, folded into `state` (FlashAttention's inner loop).
#[inline(always)]
pub(crate) unsafe fn flash_block<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    head: &HeadData<'_, V::Elem>,
    rows: Range<usize>,
    keys: Range<usize>,
    scratch: &mut Scratch<V::Elem>,
) {
    let span = params.bounds.block_keys(&rows);
    let span = span.start.max(keys.start)..span.end.min(keys.end);
    if rows.is_empty() || span.is_empty() {
        return;
    }
    let dv = params.value_dim;
    let Scratch {
        queries,
        scores,
        block_max,
        shift,
        block_sum,
        state,
        mask_tile,
    } = scratch;
    let queries = pack_queries::<V>(params, head.q, &rows, queries);
    let width = queries.width;
    let key_capacity = KEY_BLOCK.min(span.len());
    let layout = queries.score_layout(key_capacity);
    refill(scores, queries.scores_len(key_capacity), V::Elem::ZERO);
    refill(block_max, width, V::Elem::NEG_INFINITY);
    refill(shift, width, V::Elem::ZERO);
    refill(block_sum, width, V::Elem::ZERO);

    let mut block_start = span.start;
    while block_start < span.end {
        let block = block_start..(block_start + KEY_BLOCK).min(span.end);
        block_start = block.end;
        let (coverage, block) = mask_coverage(&head.mask, &rows, &block);
        if coverage == MaskCoverage::Hidden {
            continue;
        }
        let hidden = block_scores::<V>(
            params, head, &rows, &block, &queries, scores, layout, coverage, mask_tile,
        );

        if queries.by_dot {
            // Row layout: the softmax runs along the keys, a key per lane.
            for query in 0..rows.len() {
                let weights = &mut scores[query * layout.row_stride..][..block.len()];
                let best = state.max[query].max(row_max::<V>(weights));
                let block_sum = row_exp2::<V>(weights, finite_shift(best));
                if best != V::Elem::NEG_INFINITY {
                    fold_block::<V>(state, query, best, block_sum, dv);
                }
            }
        } else {
            // Sᵀ layout: a query per lane, reduced down the keys.
            block_max.fill(V::Elem::NEG_INFINITY);
            column_max::<V>(scores, block.len(), width, block_max);
            for (query, (shift, &max)) in shift.iter_mut().zip(block_max.iter()).enumerate() {
                let running = state
                    .max
                    .get(query)
                    .copied()
                    .unwrap_or(V::Elem::NEG_INFINITY);
                *shift = finite_shift(running.max(max));
            }
            block_sum.fill(V::Elem::ZERO);
            column_exp2::<V>(scores, block.len(), width, shift, block_sum);
            for query in 0..rows.len() {
                let best = state.max[query].max(block_max[query]);
                if best != V::Elem::NEG_INFINITY {
                    fold_block::<V>(state, query, best, block_sum[query], dv);
                }
            }
        }

        accumulate_block::<V>(
            params,
            head,
            &rows,
            &block,
            scores,
            layout,
            hidden,
            &mut state.acc,
        );
    }
}

/// The shift of a row's exponentials: its max, or 0 for a row that has seen no finite score,
/// whose `2^(-inf - 0)` are zeros while a NaN score stays NaN (its max may have skipped it).
fn finite_shift<T: Element>(max: T) -> T {
    if max == T::NEG_INFINITY {
        T::ZERO
    } else {
        max
    }
}

/// Exact softmax of `rows` over all keys, written to `weights` (`rows x S`, zero-filled by the
/// caller), and `out = weights · V` (`rows x Dv`), so output and weights agree exactly. Each
/// row's log-sum-exp goes to `lse` (`rows`).
#[inline(always)]
pub(crate) unsafe fn weights_block<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    head: &HeadData<'_, V::Elem>,
    rows: Range<usize>,
    weights: &mut [V::Elem],
    out: &mut [V::Elem],
    lse: &mut [V::Elem],
    scratch: &mut Scratch<V::Elem>,
) {
    let span = params.bounds.block_keys(&rows);
    lse.fill(V::Elem::NEG_INFINITY);
    if rows.is_empty() || span.is_empty() {
        return;
    }
    let num_keys = params.num_keys;
    let queries = pack_queries::<V>(params, head.q, &rows, &mut scratch.queries);
    let key_capacity = KEY_BLOCK.min(span.len());
    let layout = queries.score_layout(key_capacity);
    let scores = &mut scratch.scores;
    refill(scores, queries.scores_len(key_capacity), V::Elem::ZERO);
    let mut hidden = false;

    let mut block_start = span.start;
    while block_start < span.end {
        let whole_block = block_start..(block_start + KEY_BLOCK).min(span.end);
        block_start = whole_block.end;
        let (coverage, block) = mask_coverage(&head.mask, &rows, &whole_block);
        if coverage == MaskCoverage::Hidden || block != whole_block {
            // Keys of the block left out of the computation are hidden.
            hidden = true;
            for query in 0..rows.len() {
                let start = query * num_keys;
                weights[start + whole_block.start..start + whole_block.end]
                    .fill(V::Elem::NEG_INFINITY);
            }
        }
        if coverage == MaskCoverage::Hidden {
            continue;
        }
        hidden |= block_scores::<V>(
            params,
            head,
            &rows,
            &block,
            &queries,
            scores,
            layout,
            coverage,
            &mut scratch.mask_tile,
        );
        for (col, key) in block.clone().enumerate() {
            for query in 0..rows.len() {
                weights[query * num_keys + key] =
                    scores[query * layout.row_stride + col * layout.key_stride];
            }
        }
    }

    for query in 0..rows.len() {
        let full_row = &mut weights[query * num_keys..(query + 1) * num_keys];
        let weights_row = &mut full_row[span.clone()];
        let shift = finite_shift(row_max::<V>(weights_row));
        // Summed a key block at a time, so the total's rounding does not grow with S.
        let total = weights_row
            .chunks_mut(KEY_BLOCK)
            .fold(V::Elem::ZERO, |total, chunk| {
                total + row_exp2::<V>(chunk, shift)
            });
        lse[query] = log_sum_exp2(shift, total);
        if !total.is_finite() {
            // A NaN score (the only way the total is not finite) makes the whole row NaN,
            // hidden keys included, as in PyTorch.
            full_row.fill(V::Elem::from_f64(f64::NAN));
        } else if total != V::Elem::ZERO {
            scale_row::<V>(weights_row, V::Elem::ONE / total);
        }
    }

    let layout = WeightLayout {
        row_stride: num_keys,
        key_stride: 1,
    };
    let mut block_start = span.start;
    while block_start < span.end {
        let block = block_start..(block_start + KEY_BLOCK).min(span.end);
        block_start = block.end;
        accumulate_block::<V>(
            params,
            head,
            &rows,
            &block,
            &weights[block.start..],
            layout,
            hidden,
            out,
        );
    }
}
