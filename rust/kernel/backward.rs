//! The backward pass's tiles, generic over the SIMD vector: each tile's probabilities are
//! recomputed from the forward's log-sum-exp (`P = exp(S - lse)`), and `dS = P ∘ (dP - D)`
//! feeds `dV = Pᵀ·dO`, `dK = scale · dSᵀ·Q` and `dQ = scale · dS·K`. The call that schedules
//! them is `attention::backward`.

use std::ops::Range;

use crate::element::Element;
use crate::kernel::microkernel::{
    accumulate_pv, column_exp2, row_exp2, scale_row, transposed_scores, WeightLayout,
};
use crate::kernel::{
    apply_visibility, mask_coverage, modify_score_lines, refill, resize_for_overwrite, round_up,
    HeadData, KernelParams, MaskCoverage, MaskRows, ScoreLines, TileScratch,
};
use crate::simd::SimdVec;

/// Query rows per tile of the key pass.
const KEY_PASS_QUERIES: usize = 128;
/// Keys per tile of the query pass.
const QUERY_PASS_KEYS: usize = 128;

/// What every tile of one backward call shares.
#[derive(Clone, Copy)]
pub struct GradParams<T> {
    pub kernel: KernelParams<T>,
    /// The scale of `Q·Kᵀ` itself (the kernel's is folded with `log2(e)`).
    pub scale: T,
}

/// One (batch, query head)'s inputs to the backward pass.
#[derive(Clone, Copy)]
pub struct GradHead<'a, T> {
    pub head: HeadData<'a, T>,
    /// `dO`, `L x Dv`.
    pub grad_out: &'a [T],
    /// The forward's log-sum-exp, `L`, natural log.
    pub lse: &'a [T],
    /// `rowsum(dO ∘ O)`, `L`.
    pub delta: &'a [T],
}

/// Buffers a thread reuses from one tile to the next.
#[derive(Default)]
pub struct GradScratch<T> {
    /// The packed block's `Qᵀ · scale · log2(e)` (query pass) or `Kᵀ · scale · log2(e)` (key
    /// pass), `D x width`.
    score_operand: Vec<T>,
    /// The packed block's `dOᵀ` (query pass) or `Vᵀ` (key pass), `Dv x width`.
    grad_operand: Vec<T>,
    /// Each query column's `lse` in base 2 (`+inf` for a row with no key, and for padding).
    shift: Vec<T>,
    /// Each query column's `D`.
    delta: Vec<T>,
    /// The tile's probabilities (`Pᵀ` in the query pass, `P` in the key pass).
    probs: Vec<T>,
    /// The tile's `dP`, then `dS`, laid out as `probs`.
    grad_scores: Vec<T>,
    /// With softcapping, the cap's derivative at each score of the tile, laid out as `probs`.
    cap_slopes: Vec<T>,
    /// Unused column sums of the exponentials.
    sums: Vec<T>,
    /// A mask expression's visibility of the tile.
    tile: TileScratch<T>,
}

/// Softcapping and ALiBi on the tile in `scratch.probs` (laid out as `lines`), through the
/// forward's own code so that `P = exp(S - lse)` matches the forward; with softcapping, first
/// keeps the cap's derivative at each raw score in `scratch.cap_slopes`.
#[inline(always)]
unsafe fn modify_tile<V: SimdVec>(
    params: &KernelParams<V::Elem>,
    alibi_slope: Option<V::Elem>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    lines: ScoreLines,
    scratch: &mut GradScratch<V::Elem>,
) {
    if let Some((_, inverse_cap)) = params.softcap {
        scratch.cap_slopes.clear();
        scratch.cap_slopes.extend_from_slice(&scratch.probs);
        softcap_slopes::<V>(&mut scratch.cap_slopes, inverse_cap);
    }
    let tile = &mut scratch.tile;
    modify_score_lines::<V>(
        params,
        alibi_slope,
        rows,
        keys,
        lines,
        &mut scratch.probs,
        tile,
    );
}

/// `values[c] = 1 - tanh²(u)`, the derivative of `c·tanh(s / c)`, at raw scores in base 2
/// (`t = s·log2(e)`, `u = s / c`; `inverse_cap` is `1 / c`). Written as `4m / (1 + m)²` with
/// `m = e^(-2|u|) = 2^(-2|t| / c)`, which keeps its relative precision where tanh saturates
/// (`1 - tanh²` would cancel to rounding noise there).
#[inline(always)]
unsafe fn softcap_slopes<V: SimdVec>(values: &mut [V::Elem], inverse_cap: V::Elem) {
    let minus_one = V::splat(V::Elem::from_f64(-1.0));
    let (one, four) = (
        V::splat(V::Elem::from_f64(1.0)),
        V::splat(V::Elem::from_f64(4.0)),
    );
    let factor = V::splat(V::Elem::from_f64(-2.0) * inverse_cap);
    let mut chunks = values.chunks_exact_mut(V::LANES);
    for chunk in &mut chunks {
        let t = V::load(chunk.as_ptr());
        let m = t.max(t.mul(minus_one)).mul(factor).exp2();
        let denominator = one.add(m);
        let slope = four.mul(m).div(denominator.mul(denominator));
        slope.store(chunk.as_mut_ptr());
    }
    for value in chunks.into_remainder() {
        let m = (-2.0 * value.to_f64().abs() * inverse_cap.to_f64()).exp2();
        *value = V::Elem::from_f64(4.0 * m / ((1.0 + m) * (1.0 + m)));
    }
}

/// `dS ∘= ` the cap's derivative, when the scores were softcapped.
fn chain_through_cap<T: Element>(params: &KernelParams<T>, scratch: &mut GradScratch<T>) {
    if params.softcap.is_some() {
        for (grad, &slope) in scratch.grad_scores.iter_mut().zip(&scratch.cap_slopes) {
            *grad *= slope;
        }
    }
}

/// Lays out `lines` of a score operand (`Qᵀ` or `Kᵀ`, scaled to base 2) and of a gradient
/// operand (`dOᵀ` or `Vᵀ`), transposed and padded to `width` columns, in `scratch.score_operand`
/// and `scratch.grad_operand`. Returns `width`.
fn pack_transposed<V: SimdVec>(
    kernel: &KernelParams<V::Elem>,
    score_source: &[V::Elem],
    grad_source: &[V::Elem],
    lines: &Range<usize>,
    scratch: &mut GradScratch<V::Elem>,
) -> usize {
    let (depth, value_dim) = (kernel.depth, kernel.value_dim);
    let width = round_up(lines.len(), V::LANES);
    refill(&mut scratch.score_operand, depth * width, V::Elem::ZERO);
    refill(&mut scratch.grad_operand, value_dim * width, V::Elem::ZERO);
    for (column, line) in lines.clone().enumerate() {
        for (d, &x) in score_source[line * depth..][..depth].iter().enumerate() {
            scratch.score_operand[d * width + column] = x * kernel.score_scale;
        }
        for (d, &x) in grad_source[line * value_dim..][..value_dim]
            .iter()
            .enumerate()
        {
            scratch.grad_operand[d * width + column] = x;
        }
    }
    width
}

/// Lays out `rows` of one head for its tiles: `Qᵀ` and `dOᵀ` ([`pack_transposed`]) with each
/// row's `lse` shift and `D`. Returns `width`.
fn pack_rows<V: SimdVec>(
    params: &GradParams<V::Elem>,
    head: &GradHead<'_, V::Elem>,
    rows: &Range<usize>,
    scratch: &mut GradScratch<V::Elem>,
) -> usize {
    let width = pack_transposed::<V>(&params.kernel, head.head.q, head.grad_out, rows, scratch);
    refill(&mut scratch.shift, width, V::Elem::from_f64(f64::INFINITY));
    refill(&mut scratch.delta, width, V::Elem::ZERO);
    let log2_e = V::Elem::from_f64(std::f64::consts::LOG2_E);
    for (column, row) in rows.clone().enumerate() {
        // A row that saw no key has no probability anywhere: 2^(s - inf) is 0.
        let lse = head.lse[row];
        if lse != V::Elem::NEG_INFINITY {
            scratch.shift[column] = lse * log2_e;
        }
        scratch.delta[column] = head.delta[row];
    }
    width
}

/// Hides the scores of `rows` against `keys` in `scratch.probs` (at `layout`) that the rules
/// or the mask exclude (the one door through which visibility enters the backward pass).
/// Returns false when the mask hides the whole block, whose scores are then left unset.
fn hide_invisible<T: Element>(
    params: &KernelParams<T>,
    mask: &MaskRows<'_, T>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    layout: WeightLayout,
    scratch: &mut GradScratch<T>,
) -> bool {
    // The whole tile is recomputed, so a partial tile's narrower key hull is not needed.
    let (coverage, _) = mask_coverage(mask, rows, keys);
    if coverage == MaskCoverage::Hidden {
        return false;
    }
    let mask = if coverage == MaskCoverage::Neutral {
        &MaskRows::None
    } else {
        mask
    };
    let (scores, tile) = (&mut scratch.probs, &mut scratch.tile);
    apply_visibility(params, mask, rows, keys, scores, layout, tile);
    true
}

/// Which operand a backward tile packs; the other is read in place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Packed {
    /// The query pass (`dQ`): query rows packed, keys and values read in place; the tile is
    /// `Pᵀ` and `dSᵀ`, keys x `width`.
    Rows,
    /// The key pass (`dK`, `dV`): keys packed, queries and output gradients read in place; the
    /// tile is `P` and `dS`, rows x `width`.
    Keys,
}

/// `P` and `dS = P ∘ (dP − D)` of `rows` against `keys` in `scratch.probs` and
/// `scratch.grad_scores`, in the orientation `packed` gives (PyTorch's CPU backward likewise
/// runs one GEMM with transpose flags rather than two loops). Returns false when no pair of the
/// tile is visible.
#[inline(always)]
unsafe fn grad_tile<V: SimdVec>(
    params: &GradParams<V::Elem>,
    head: &GradHead<'_, V::Elem>,
    rows: &Range<usize>,
    keys: &Range<usize>,
    width: usize,
    packed: Packed,
    scratch: &mut GradScratch<V::Elem>,
) -> bool {
    let kernel = &params.kernel;
    let (depth, value_dim) = (kernel.depth, kernel.value_dim);
    let along_queries = packed == Packed::Rows;
    let (lines, score_source, grad_source) = if along_queries {
        (keys, head.head.k, head.head.v)
    } else {
        (rows, head.head.q, head.grad_out)
    };
    let tile = lines.len() * width;
    // Every element of the tile is a product's output.
    resize_for_overwrite(&mut scratch.probs, tile);
    transposed_scores::<V>(
        &score_source[lines.start * depth..lines.end * depth],
        lines.len(),
        &scratch.score_operand,
        depth,
        width,
        &mut scratch.probs,
    );
    let score_lines = ScoreLines {
        count: lines.len(),
        len: width,
        stride: width,
        along_queries,
    };
    modify_tile::<V>(
        kernel,
        head.head.alibi_slope,
        rows,
        keys,
        score_lines,
        scratch,
    );
    let layout = if along_queries {
        WeightLayout {
            row_stride: 1,
            key_stride: width,
        }
    } else {
        WeightLayout {
            row_stride: width,
            key_stride: 1,
        }
    };
    if !hide_invisible(kernel, &head.head.mask, rows, keys, layout, scratch) {
        return false;
    }
    if along_queries {
        refill(&mut scratch.sums, width, V::Elem::ZERO);
        column_exp2::<V>(
            &mut scratch.probs,
            keys.len(),
            width,
            &scratch.shift,
            &mut scratch.sums,
        );
    } else {
        let log2_e = V::Elem::from_f64(std::f64::consts::LOG2_E);
        let infinity = V::Elem::from_f64(f64::INFINITY);
        for (probs, row) in scratch.probs.chunks_exact_mut(width).zip(rows.clone()) {
            // A row that saw no key has no probability anywhere: 2^(s - inf) is 0.
            let lse = head.lse[row];
            let shift = if lse == V::Elem::NEG_INFINITY {
                infinity
            } else {
                lse * log2_e
            };
            row_exp2::<V>(&mut probs[..keys.len()], shift);
        }
    }
    // Every element of the tile is a product's output.
    resize_for_overwrite(&mut scratch.grad_scores, tile);
    transposed_scores::<V>(
        &grad_source[lines.start * value_dim..lines.end * value_dim],
        lines.len(),
        &scratch.grad_operand,
        value_dim,
        width,
        &mut scratch.grad_scores,
    );
    let pairs = scratch
        .probs
        .chunks_exact(width)
        .zip(scratch.grad_scores.chunks_exact_mut(width));
    for (line, (probs, grads)) in pairs.enumerate() {
        if along_queries {
            // A line is one key against the packed rows, each with its own D.
            for ((grad, &p), &delta) in grads.iter_mut().zip(probs).zip(&scratch.delta) {
                *grad = p * (*grad - delta);
            }
        } else {
            let delta = head.delta[rows.start + line];
            for (grad, &p) in grads[..keys.len()].iter_mut().zip(probs) {
                *grad = p * (*grad - delta);
            }
        }
    }
    chain_through_cap(kernel, scratch);
    true
}

/// Where a key block's gradients go: its own `dK` (`keys x D`) and `dV` (`keys x Dv`), and,
/// when one task owns a whole kv head, the `dQ` (`heads x L x D`, unscaled) its query heads
/// accumulate over the key blocks, in order.
pub struct KeyBlockGrads<'a, T> {
    pub grad_key: &'a mut [T],
    pub grad_value: &'a mut [T],
    pub grad_query: Option<&'a mut [T]>,
}

/// `dK` and `dV` of one kv head's `keys`, summed over `heads` (the query heads that read it,
/// in order) and each head's query rows, in order; and their share of `dQ` when asked.
#[inline(always)]
pub(crate) unsafe fn key_block_grads<V: SimdVec>(
    params: &GradParams<V::Elem>,
    heads: &[GradHead<'_, V::Elem>],
    keys: Range<usize>,
    num_queries: usize,
    out: KeyBlockGrads<'_, V::Elem>,
    scratch: &mut GradScratch<V::Elem>,
) {
    let kernel = &params.kernel;
    let (depth, value_dim) = (kernel.depth, kernel.value_dim);
    let KeyBlockGrads {
        grad_key,
        grad_value,
        mut grad_query,
    } = out;
    grad_key.fill(V::Elem::ZERO);
    grad_value.fill(V::Elem::ZERO);
    let Some(first) = heads.first() else {
        return;
    };
    let width = pack_transposed::<V>(&params.kernel, first.head.k, first.head.v, &keys, scratch);
    // dV += Pᵀ·dO and dK += dSᵀ·Q: a key per row, the tile's query rows as the sum.
    let layout = WeightLayout {
        row_stride: 1,
        key_stride: width,
    };
    // Tiles start at the first row that sees a key of the block, so that a causal or window
    // block does not compute the hidden rows above it.
    let seeing = kernel.bounds.key_rows(&keys, num_queries);
    for (index, head) in heads.iter().enumerate() {
        for start in seeing.clone().step_by(KEY_PASS_QUERIES) {
            let rows = start..(start + KEY_PASS_QUERIES).min(seeing.end);
            if !grad_tile::<V>(params, head, &rows, &keys, width, Packed::Keys, scratch) {
                continue;
            }
            accumulate_pv::<V>(
                &scratch.probs,
                layout,
                keys.len(),
                rows.len(),
                &head.grad_out[rows.start * value_dim..rows.end * value_dim],
                value_dim,
                grad_value,
                None,
            );
            accumulate_pv::<V>(
                &scratch.grad_scores,
                layout,
                keys.len(),
                rows.len(),
                &head.head.q[rows.start * depth..rows.end * depth],
                depth,
                grad_key,
                None,
            );
            if let Some(grad_query) = grad_query.as_deref_mut() {
                // dQ += dS·K: a query per row, the block's keys as the sum.
                let first = index * num_queries + rows.start;
                accumulate_pv::<V>(
                    &scratch.grad_scores,
                    WeightLayout {
                        row_stride: width,
                        key_stride: 1,
                    },
                    rows.len(),
                    keys.len(),
                    &head.head.k[keys.start * depth..keys.end * depth],
                    depth,
                    &mut grad_query[first * depth..(first + rows.len()) * depth],
                    None,
                );
            }
        }
    }
    scale_row::<V>(grad_key, params.scale);
}

/// `dQ` (`rows x D`) of one head's `rows`, over the keys they see, in order.
#[inline(always)]
pub(crate) unsafe fn query_block_grads<V: SimdVec>(
    params: &GradParams<V::Elem>,
    head: &GradHead<'_, V::Elem>,
    rows: Range<usize>,
    grad_query: &mut [V::Elem],
    scratch: &mut GradScratch<V::Elem>,
) {
    let kernel = &params.kernel;
    let depth = kernel.depth;
    grad_query.fill(V::Elem::ZERO);
    let span = kernel.bounds.block_keys(&rows);
    if rows.is_empty() || span.is_empty() {
        return;
    }
    let width = pack_rows::<V>(params, head, &rows, scratch);
    let mut block_start = span.start;
    while block_start < span.end {
        let keys = block_start..(block_start + QUERY_PASS_KEYS).min(span.end);
        block_start = keys.end;
        if !grad_tile::<V>(params, head, &rows, &keys, width, Packed::Rows, scratch) {
            continue;
        }
        // dQ += dS·K: the tile's keys are the sum.
        let layout = WeightLayout {
            row_stride: 1,
            key_stride: width,
        };
        let key_rows = &head.head.k[keys.start * depth..keys.end * depth];
        accumulate_pv::<V>(
            &scratch.grad_scores,
            layout,
            rows.len(),
            keys.len(),
            key_rows,
            depth,
            grad_query,
            None,
        );
    }
    scale_row::<V>(grad_query, params.scale);
}
