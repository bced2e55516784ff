//! The tiled attention kernel: one block of query rows against a range of keys, with an online
//! softmax (FlashAttention-style) so the L x S score matrix never exists, and the weights path
//! that does materialise it when asked.
//!
//! Scores are kept in base 2: `Q` is pre-multiplied by `scale · log2(e)` (and additive masks by
//! `log2(e)`), so each probability is one `exp2`. Key blocks that the causal/window rules hide
//! are never visited; blocks they leave fully visible skip the per-element rule check.

use std::ops::Range;

use crate::bounds::Bounds;
use crate::element::Element;
use crate::microkernel::{
    accumulate_pv, column_exp2, column_max, row_exp2, row_max, scale_row, scores_by_dot,
    transposed_scores, WeightLayout,
};
use crate::simd::SimdVec;

/// Query rows per task.
pub const QUERY_BLOCK: usize = 64;
/// Keys per inner block: the block's key rows (read in place), its score tile and its value
/// rows stay in L2 between the `Q·Kᵀ` pass and the `P·V` pass that reads the scores back.
pub const KEY_BLOCK: usize = 256;

/// Where the mask element for (query `i`, key `j`) of one head lives:
/// `data[base + i * row_stride + j * col_stride]` (strides are 0 along broadcast dims).
#[derive(Clone, Copy)]
pub enum MaskRows<'a, T> {
    None,
    Bool {
        data: &'a [bool],
        base: usize,
        row_stride: usize,
        col_stride: usize,
    },
    Additive {
        data: &'a [T],
        base: usize,
        row_stride: usize,
        col_stride: usize,
    },
}

/// One (batch, head) pair's inputs: `q` is `L x D`, `k` is `S x D`, `v` is `S x Dv`.
#[derive(Clone, Copy)]
pub struct HeadData<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub mask: MaskRows<'a, T>,
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

    /// Writes `acc / sum` into `out` (`rows x Dv`); rows that saw no key get zeros.
    pub(crate) fn finish_into(&self, out: &mut [T], value_dim: usize) {
        for (row, &sum) in self.sum.iter().enumerate() {
            let out_row = &mut out[row * value_dim..(row + 1) * value_dim];
            let acc_row = &self.acc[row * value_dim..(row + 1) * value_dim];
            if sum > T::ZERO {
                let inverse = T::ONE / sum;
                for (o, a) in out_row.iter_mut().zip(acc_row) {
                    *o = *a * inverse;
                }
            } else {
                out_row.fill(T::ZERO);
            }
        }
    }

    /// Folds `other` (the same rows over a later range of keys) into `self`.
    pub(crate) fn merge(&mut self, other: &SoftmaxState<T>, value_dim: usize) {
        for row in 0..self.max.len() {
            let (mine, theirs) = (self.max[row], other.max[row]);
            if theirs == T::NEG_INFINITY {
                continue;
            }
            let best = mine.max(theirs);
            let keep = if mine == T::NEG_INFINITY {
                T::ZERO
            } else {
                (mine - best).exp2()
            };
            let take = (theirs - best).exp2();
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

fn round_up(value: usize, multiple: usize) -> usize {
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
}

/// Clears `buffer` and fills it with `len` copies of `value`, keeping its allocation.
fn refill<T: Copy>(buffer: &mut Vec<T>, len: usize, value: T) {
    buffer.clear();
    buffer.resize(len, value);
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
enum MaskCoverage {
    /// Hides every pair: the block is skipped without computing a score.
    Hidden,
    /// Changes nothing (all True, or all 0.0): the block is computed as if unmasked.
    Neutral,
    Mixed,
}

/// Scans the mask over a block. Far cheaper than the block's scores (a byte per pair against
/// `D + Dv` multiply-adds), and it lets a mostly-false mask (a sliding window given as a dense
/// mask, say) cost what its visible pairs cost.
fn mask_coverage<T: Element>(
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
) -> MaskCoverage {
    fn classify<M: Copy>(
        data: &[M],
        (base, row_stride, col_stride): (usize, usize, usize),
        rows: &Range<usize>,
        keys: &Range<usize>,
        visible: impl Fn(M) -> bool,
        neutral: impl Fn(M) -> bool,
    ) -> MaskCoverage {
        let (mut any_visible, mut all_neutral) = (false, true);
        for row in rows.clone() {
            let row_base = base + row * row_stride;
            for key in keys.clone() {
                let value = data[row_base + key * col_stride];
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
        MaskRows::None => MaskCoverage::Neutral,
        MaskRows::Bool {
            data,
            base,
            row_stride,
            col_stride,
        } => classify(
            data,
            (base, row_stride, col_stride),
            rows,
            keys,
            |m| m,
            |m| m,
        ),
        MaskRows::Additive {
            data,
            base,
            row_stride,
            col_stride,
        } => classify(
            data,
            (base, row_stride, col_stride),
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
fn apply_visibility<T: Element>(
    params: &KernelParams<T>,
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    scores: &mut [T],
    layout: WeightLayout,
) -> bool {
    let structural = !params.bounds.fully_visible(rows, keys);
    if !structural && matches!(mask, MaskRows::None) {
        return false;
    }
    let log2_e = T::from_f64(std::f64::consts::LOG2_E);
    let mut hidden = false;
    for (offset, row) in rows.clone().enumerate() {
        let cell = |col: usize| offset * layout.row_stride + col * layout.key_stride;
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
        match *mask {
            MaskRows::None => {}
            MaskRows::Bool {
                data,
                base,
                row_stride,
                col_stride,
            } => {
                let row_base = base + row * row_stride;
                for col in 0..keys.len() {
                    if !data[row_base + (keys.start + col) * col_stride] {
                        scores[cell(col)] = T::NEG_INFINITY;
                        hidden = true;
                    }
                }
            }
            MaskRows::Additive {
                data,
                base,
                row_stride,
                col_stride,
            } => {
                let row_base = base + row * row_stride;
                for col in 0..keys.len() {
                    let bias = data[row_base + (keys.start + col) * col_stride];
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
    }
    hidden
}

fn all_finite<T: Element>(values: &[T]) -> bool {
    values.iter().all(|value| value.is_finite())
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
    let mask = if coverage == MaskCoverage::Neutral {
        &MaskRows::None
    } else {
        &head.mask
    };
    apply_visibility(params, mask, rows, keys, scores, layout)
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
        let coverage = mask_coverage(&head.mask, &rows, &block);
        if coverage == MaskCoverage::Hidden {
            continue;
        }
        let hidden = block_scores::<V>(
            params, head, &rows, &block, &queries, scores, layout, coverage,
        );

        if queries.by_dot {
            // Row layout: the softmax runs along the keys, a key per lane.
            for query in 0..rows.len() {
                let weights = &mut scores[query * layout.row_stride..][..block.len()];
                let best = state.max[query].max(row_max::<V>(weights));
                if best == V::Elem::NEG_INFINITY {
                    weights.fill(V::Elem::ZERO);
                    continue;
                }
                let block_sum = row_exp2::<V>(weights, best);
                fold_block::<V>(state, query, best, block_sum, dv);
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
                let best = running.max(max);
                // A query that has seen no key yet keeps shift 0: 2^(-inf - 0) = 0, never NaN.
                *shift = if best == V::Elem::NEG_INFINITY {
                    V::Elem::ZERO
                } else {
                    best
                };
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

        let values = &head.v[block.start * dv..block.end * dv];
        let guard_non_finite = hidden && !all_finite(values);
        accumulate_pv::<V>(
            scores,
            layout,
            rows.len(),
            block.len(),
            values,
            dv,
            &mut state.acc,
            guard_non_finite,
        );
    }
}

/// Exact softmax of `rows` over all keys, written to `weights` (`rows x S`, zero-filled by the
/// caller), and `out = weights · V` (`rows x Dv`), so output and weights agree exactly.
#[inline(always)]
pub(crate) unsafe fn weights_block<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    head: &HeadData<'_, V::Elem>,
    rows: Range<usize>,
    weights: &mut [V::Elem],
    out: &mut [V::Elem],
    scratch: &mut Scratch<V::Elem>,
) {
    let span = params.bounds.block_keys(&rows);
    if rows.is_empty() || span.is_empty() {
        return;
    }
    let num_keys = params.num_keys;
    let dv = params.value_dim;
    let queries = pack_queries::<V>(params, head.q, &rows, &mut scratch.queries);
    let key_capacity = KEY_BLOCK.min(span.len());
    let layout = queries.score_layout(key_capacity);
    let scores = &mut scratch.scores;
    refill(scores, queries.scores_len(key_capacity), V::Elem::ZERO);
    let mut hidden = false;

    let mut block_start = span.start;
    while block_start < span.end {
        let block = block_start..(block_start + KEY_BLOCK).min(span.end);
        block_start = block.end;
        let coverage = mask_coverage(&head.mask, &rows, &block);
        if coverage == MaskCoverage::Hidden {
            hidden = true;
            for query in 0..rows.len() {
                let start = query * num_keys;
                weights[start + block.start..start + block.end].fill(V::Elem::NEG_INFINITY);
            }
            continue;
        }
        hidden |= block_scores::<V>(
            params, head, &rows, &block, &queries, scores, layout, coverage,
        );
        for (col, key) in block.clone().enumerate() {
            for query in 0..rows.len() {
                weights[query * num_keys + key] =
                    scores[query * layout.row_stride + col * layout.key_stride];
            }
        }
    }

    for query in 0..rows.len() {
        let weights_row = &mut weights[query * num_keys + span.start..query * num_keys + span.end];
        let max = row_max::<V>(weights_row);
        if max == V::Elem::NEG_INFINITY {
            weights_row.fill(V::Elem::ZERO);
            continue;
        }
        let total = row_exp2::<V>(weights_row, max);
        scale_row::<V>(weights_row, V::Elem::ONE / total);
    }

    let values = &head.v[span.start * dv..span.end * dv];
    let guard_non_finite = hidden && !all_finite(values);
    let layout = WeightLayout {
        row_stride: num_keys,
        key_stride: 1,
    };
    accumulate_pv::<V>(
        &weights[span.start..],
        layout,
        rows.len(),
        span.len(),
        values,
        dv,
        out,
        guard_non_finite,
    );
}
