//! Attention over a KV cache's stored rows, read in their stored format (float32, bfloat16,
//! float16 or int8 blocks) and widened in registers: decoding reads each cached byte once and
//! writes no decompressed copy. Scores, softmax and the output accumulate in float32.
//!
//! Work is cut into tasks over (batch · kv head, block of query rows, chunk of keys): the query
//! heads that share a kv head are rows of one task, so their keys and values are read once.
//! Few rows split their keys into fixed chunks whose partial softmax states merge in key
//! order, so results are the same for every thread count.

use std::ops::Range;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::bounds::Bounds;
use crate::cache::storage::{RowBuffer, Rows, INT8_BLOCK};
use crate::error::AttnError;
use crate::kernel::microkernel::{row_exp2, row_max, scale_row};
use crate::simd::portable::{exp2_f32, PortableF32};
use crate::simd::widen::Widen;
use crate::simd::{f16c_supported, SimdLevel};
use crate::threads::{pool_for, ATTENTION_INLINE_WORK};

/// Keys scored together before their softmax update (the scores stay in registers' reach).
const KEY_BLOCK: usize = 32;
/// Keys per task when the rows are few enough to split keys; fixed by the shape alone.
const KEY_CHUNK: usize = 1024;
/// Query rows per task (and the most rows for which keys are split into chunks).
const ROW_BLOCK: usize = 16;
/// Keys scored before each softmax update of a task with one row: all their scores fit in L1,
/// so the keys and then the values stream through once, whole rows at a time.
const STREAM_BLOCK: usize = KEY_CHUNK;

/// One call: queries `(batch, Hq, L, D)` (contiguous float32) over `num_keys` stored rows per
/// (batch, kv head), starting at row `first_row` of each head's `row_capacity`.
pub(crate) struct CachedCall<'a> {
    pub query: &'a [f32],
    pub batch: usize,
    pub query_heads: usize,
    pub kv_heads: usize,
    pub num_queries: usize,
    pub num_keys: usize,
    pub depth: usize,
    pub row_capacity: usize,
    pub first_row: usize,
    /// `scale · log2(e)`.
    pub score_scale: f32,
    pub bounds: Bounds,
    pub num_threads: Option<usize>,
}

/// Stored rows of one format, read by the kernel.
trait RowFormat: Sync {
    /// Whether values carry a per-block scale.
    const SCALED: bool;
    /// Where one row lies: raw pointers, found once per row and kept in registers while its
    /// vectors are read (found per vector through the buffers, they would be reloaded after
    /// every store to an accumulator, which the compiler cannot prove does not alias them).
    type Row: Copy;
    /// Global row `row`. Only [`RowFormat::widen`] and [`RowFormat::scale`] read through it.
    fn row(&self, row: usize) -> Self::Row;
    /// `LANES` values of `row` from column `col`, as f32.
    unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V;
    /// The scale of `row`'s block holding column `col`.
    unsafe fn scale(_row: Self::Row, _col: usize) -> f32 {
        1.0
    }
    /// One value, with its scale applied.
    fn value(&self, row: usize, col: usize) -> f32;
    /// Hints the rows a little past global row `row` into the cache, ahead of their use.
    fn prefetch(&self, row: usize);
}

/// How far ahead of the row being read decoding requests rows, in bytes of one buffer.
const PREFETCH_AHEAD_BYTES: usize = 8192;

/// Hints one row's worth of cache lines [`PREFETCH_AHEAD_BYTES`] past the start of row `row`
/// of `buffer`: decoding reads its rows once and in order, so later rows are requested while
/// earlier ones compute. A hint never faults, so it may point past the buffer's end.
#[inline(always)]
fn prefetch_row<U>(buffer: &RowBuffer<U>, row: usize) {
    const LINE_BYTES: usize = 64;
    let bytes = buffer.per_row * std::mem::size_of::<U>();
    let start = (buffer.row_ptr(row) as *const i8).wrapping_add(PREFETCH_AHEAD_BYTES);
    for offset in (0..bytes).step_by(LINE_BYTES) {
        let line = start.wrapping_add(offset);
        // SAFETY: prefetching is a hint with no effect on memory; any address is allowed.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line)
        };
        // SAFETY: as above (`prfm` is Arm's prefetch hint; its intrinsic is not yet stable).
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!(
                "prfm pldl1keep, [{0}]",
                in(reg) line,
                options(nostack, readonly, preserves_flags)
            )
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let _ = line;
    }
}

impl RowFormat for RowBuffer<f32> {
    const SCALED: bool = false;
    type Row = *const f32;
    fn prefetch(&self, row: usize) {
        prefetch_row(self, row);
    }
    #[inline(always)]
    fn row(&self, row: usize) -> Self::Row {
        self.row_ptr(row)
    }
    #[inline(always)]
    unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V {
        V::load(row.add(col))
    }
    fn value(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.per_row + col]
    }
}

impl RowFormat for RowBuffer<bf16> {
    const SCALED: bool = false;
    type Row = *const bf16;
    fn prefetch(&self, row: usize) {
        prefetch_row(self, row);
    }
    #[inline(always)]
    fn row(&self, row: usize) -> Self::Row {
        self.row_ptr(row)
    }
    #[inline(always)]
    unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V {
        V::load_bf16(row.add(col))
    }
    fn value(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.per_row + col].to_f32()
    }
}

impl RowFormat for RowBuffer<f16> {
    const SCALED: bool = false;
    type Row = *const f16;
    fn prefetch(&self, row: usize) {
        prefetch_row(self, row);
    }
    #[inline(always)]
    fn row(&self, row: usize) -> Self::Row {
        self.row_ptr(row)
    }
    #[inline(always)]
    unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V {
        V::load_f16(row.add(col))
    }
    fn value(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.per_row + col].to_f32()
    }
}

/// int8 rows and their block scales.
struct Int8Rows<'a> {
    values: &'a RowBuffer<i8>,
    scales: &'a RowBuffer<f32>,
}

impl RowFormat for Int8Rows<'_> {
    const SCALED: bool = true;
    /// The row's values and its block scales.
    type Row = (*const i8, *const f32);
    fn prefetch(&self, row: usize) {
        // The scales (a few bytes per row) stream in order and need no hint.
        prefetch_row(self.values, row);
    }
    #[inline(always)]
    fn row(&self, row: usize) -> Self::Row {
        (self.values.row_ptr(row), self.scales.row_ptr(row))
    }
    #[inline(always)]
    unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V {
        V::load_i8(row.0.add(col))
    }
    #[inline(always)]
    unsafe fn scale(row: Self::Row, col: usize) -> f32 {
        *row.1.add(col / INT8_BLOCK)
    }
    fn value(&self, row: usize, col: usize) -> f32 {
        let scale = self.scales.data[row * self.scales.per_row + col / INT8_BLOCK];
        f32::from(self.values.data[row * self.values.per_row + col]) * scale
    }
}

/// One task: query rows `rows` (indices into the (group, L) rows of a kv head) of kv head
/// `head` (flattened with the batch), over keys `keys`.
#[derive(Clone)]
struct Task {
    head: usize,
    rows: Range<usize>,
    keys: Range<usize>,
}

impl CachedCall<'_> {
    fn group(&self) -> usize {
        self.query_heads / self.kv_heads
    }

    /// The tasks, in the order their partial results merge.
    fn tasks(&self) -> Vec<Task> {
        let rows_per_head = self.group() * self.num_queries;
        let key_chunk = if rows_per_head <= ROW_BLOCK {
            KEY_CHUNK
        } else {
            self.num_keys.max(1)
        };
        let mut tasks = Vec::new();
        for head in 0..self.batch * self.kv_heads {
            for row_start in (0..rows_per_head).step_by(ROW_BLOCK) {
                let rows = row_start..(row_start + ROW_BLOCK).min(rows_per_head);
                for key_start in (0..self.num_keys).step_by(key_chunk) {
                    let keys = key_start..(key_start + key_chunk).min(self.num_keys);
                    tasks.push(Task {
                        head,
                        rows: rows.clone(),
                        keys,
                    });
                }
            }
        }
        tasks
    }

    /// The global stored row of kv head `head`'s first key (key 0 of the call).
    fn first_stored_row(&self, head: usize) -> usize {
        head * self.row_capacity + self.first_row
    }

    /// Row `row` of kv head `head`: its query's offset in `query` and the keys it sees.
    fn row(&self, head: usize, row: usize) -> (usize, Range<usize>) {
        let (batch, kv_head) = (head / self.kv_heads, head % self.kv_heads);
        let (member, position) = (row / self.num_queries, row % self.num_queries);
        let query_head = batch * self.query_heads + kv_head * self.group() + member;
        let offset = (query_head * self.num_queries + position) * self.depth;
        (offset, self.bounds.row_keys(position))
    }
}

/// Per row: running max, running sum (base 2), then the `D` accumulators.
fn state_len(rows: usize, depth: usize) -> usize {
    rows * (depth + 2)
}

/// `q · k` for global key row `row`, four accumulators deep.
#[inline(always)]
unsafe fn dot<V: Widen, F: RowFormat>(query: &[f32], keys: &F, row: usize) -> f32 {
    if F::SCALED {
        return scaled_dot::<V, F>(query, keys, row);
    }
    let depth = query.len();
    let vectors = depth / V::LANES;
    let key = keys.row(row);
    let load = |v: usize| {
        let col = v * V::LANES;
        (V::load(query.as_ptr().add(col)), F::widen::<V>(key, col))
    };
    let (mut a, mut b, mut c, mut d) = (V::splat(0.0), V::splat(0.0), V::splat(0.0), V::splat(0.0));
    let mut v = 0;
    while v + 4 <= vectors {
        let (q0, k0) = load(v);
        let (q1, k1) = load(v + 1);
        let (q2, k2) = load(v + 2);
        let (q3, k3) = load(v + 3);
        a = V::mul_add(q0, k0, a);
        b = V::mul_add(q1, k1, b);
        c = V::mul_add(q2, k2, c);
        d = V::mul_add(q3, k3, d);
        v += 4;
    }
    while v < vectors {
        let (q0, k0) = load(v);
        a = V::mul_add(q0, k0, a);
        v += 1;
    }
    let mut sum = a.add(b).add(c.add(d)).reduce_sum();
    for (col, &q) in query.iter().enumerate().skip(vectors * V::LANES) {
        sum += q * keys.value(row, col);
    }
    sum
}

/// [`dot`] for a row stored in scaled blocks: each block's products are summed as stored and
/// multiplied by the block's scale once, rather than scaling every widened vector (decoding an
/// int8 cache is bound by these instructions, not by reading the cache).
#[inline(always)]
unsafe fn scaled_dot<V: Widen, F: RowFormat>(query: &[f32], keys: &F, row: usize) -> f32 {
    let depth = query.len();
    let vectors = depth / V::LANES;
    let per_block = INT8_BLOCK / V::LANES;
    let key = keys.row(row);
    let product = |v: usize, sum: V| {
        let col = v * V::LANES;
        V::mul_add(
            V::load(query.as_ptr().add(col)),
            F::widen::<V>(key, col),
            sum,
        )
    };
    // Two chains within a block (its length is a constant, so the loop unrolls) and two across
    // blocks, so that the sums overlap.
    let (mut total, mut other_total) = (V::splat(0.0), V::splat(0.0));
    let mut v = 0;
    while v < vectors {
        let (mut even, mut odd) = (V::splat(0.0), V::splat(0.0));
        if v + per_block <= vectors {
            for u in (0..per_block).step_by(2) {
                even = product(v + u, even);
                if u + 1 < per_block {
                    odd = product(v + u + 1, odd);
                }
            }
        } else {
            for u in v..vectors {
                even = product(u, even);
            }
        }
        let scale = V::splat(F::scale(key, v * V::LANES));
        (total, other_total) = (other_total, V::mul_add(scale, even.add(odd), total));
        v += per_block;
    }
    let mut sum = total.add(other_total).reduce_sum();
    for (col, &q) in query.iter().enumerate().skip(vectors * V::LANES) {
        sum += q * keys.value(row, col);
    }
    sum
}

/// `acc += Σ_j weights[j] · v_(first + j)` over `N` vectors of `acc` from vector `v`, kept in
/// registers across the keys.
#[inline(always)]
unsafe fn accumulate_vectors<V: Widen, F: RowFormat, const N: usize>(
    acc: &mut [f32],
    values: &F,
    first: usize,
    weights: &[f32],
    v: usize,
) {
    let at = |k: usize| (v + k) * V::LANES;
    let mut sums = [V::splat(0.0); N];
    for (k, sum) in sums.iter_mut().enumerate() {
        *sum = V::load(acc.as_ptr().add(at(k)));
    }
    for (j, &weight) in weights.iter().enumerate() {
        let (splat, row) = (V::splat(weight), values.row(first + j));
        for (k, sum) in sums.iter_mut().enumerate() {
            let w = if F::SCALED {
                V::splat(weight * F::scale(row, at(k)))
            } else {
                splat
            };
            *sum = V::mul_add(w, F::widen::<V>(row, at(k)), *sum);
        }
    }
    for (k, sum) in sums.iter().enumerate() {
        sum.store(acc.as_mut_ptr().add(at(k)));
    }
}

/// `acc += Σ_j weights[j] · v_(first + j)`, four vectors of the accumulator at a time.
#[inline(always)]
unsafe fn accumulate<V: Widen, F: RowFormat>(
    acc: &mut [f32],
    values: &F,
    first: usize,
    weights: &[f32],
) {
    let vectors = acc.len() / V::LANES;
    let mut v = 0;
    while v + 4 <= vectors {
        accumulate_vectors::<V, F, 4>(acc, values, first, weights, v);
        v += 4;
    }
    while v < vectors {
        accumulate_vectors::<V, F, 1>(acc, values, first, weights, v);
        v += 1;
    }
    for (col, slot) in acc.iter_mut().enumerate().skip(vectors * V::LANES) {
        for (j, &weight) in weights.iter().enumerate() {
            *slot += weight * values.value(first + j, col);
        }
    }
}

/// The online softmax of one task's rows over its keys, as partial states.
#[inline(always)]
unsafe fn attend_task<V: Widen, F: RowFormat>(
    call: &CachedCall<'_>,
    keys: &F,
    values: &F,
    task: &Task,
) -> Vec<f32> {
    let depth = call.depth;
    let mut states = vec![0.0f32; state_len(task.rows.len(), depth)];
    for state in states.chunks_exact_mut(depth + 2) {
        state[0] = f32::NEG_INFINITY;
    }
    let rows: Vec<_> = task
        .rows
        .clone()
        .map(|row| call.row(task.head, row))
        .collect();
    if call.num_queries == 1 && rows.len() > 1 {
        attend_shared::<V, F>(call, keys, values, task, &rows, &mut states);
        return states;
    }
    if let [row] = rows.as_slice() {
        attend_one_row::<V, F>(call, keys, values, task, row, &mut states);
        return states;
    }
    let first_row = call.first_stored_row(task.head);
    let mut scores = [0.0f32; KEY_BLOCK];
    for block_start in task.keys.clone().step_by(KEY_BLOCK) {
        let block_end = (block_start + KEY_BLOCK).min(task.keys.end);
        for (index, ((offset, visible), state)) in rows
            .iter()
            .zip(states.chunks_exact_mut(depth + 2))
            .enumerate()
        {
            let start = visible.start.max(block_start);
            let end = visible.end.min(block_end);
            if start >= end {
                continue;
            }
            let query = &call.query[*offset..offset + depth];
            let weights = &mut scores[..end - start];
            for (j, score) in weights.iter_mut().enumerate() {
                let row = first_row + start + j;
                if index == 0 {
                    keys.prefetch(row);
                    values.prefetch(row);
                }
                *score = dot::<V, F>(query, keys, row) * call.score_scale;
            }
            if softmax_update::<V>(state, weights) {
                accumulate::<V, F>(&mut state[2..], values, first_row + start, weights);
            }
        }
    }
    states
}

/// A task with a single row (one head decoding one token, or a head's last row left alone):
/// the scores of up to [`STREAM_BLOCK`] keys, one softmax update, then the values of those keys
/// row after row.
#[inline(always)]
unsafe fn attend_one_row<V: Widen, F: RowFormat>(
    call: &CachedCall<'_>,
    keys: &F,
    values: &F,
    task: &Task,
    (offset, visible): &(usize, Range<usize>),
    state: &mut [f32],
) {
    let query = &call.query[*offset..offset + call.depth];
    let first_row = call.first_stored_row(task.head);
    let (start, end) = (
        visible.start.max(task.keys.start),
        visible.end.min(task.keys.end),
    );
    let mut scores = vec![0.0f32; STREAM_BLOCK.min(end.saturating_sub(start))];
    for block_start in (start..end).step_by(STREAM_BLOCK) {
        let weights = &mut scores[..(end - block_start).min(STREAM_BLOCK)];
        for (j, score) in weights.iter_mut().enumerate() {
            let row = first_row + block_start + j;
            keys.prefetch(row);
            *score = dot::<V, F>(query, keys, row) * call.score_scale;
        }
        if softmax_update::<V>(state, weights) {
            accumulate_rows::<V, F>(&mut state[2..], values, first_row + block_start, weights);
        }
    }
}

/// `acc += Σ_j weights[j] · v_(first + j)`, reading each value row whole and in order, four
/// rows per pass over the accumulator.
#[inline(always)]
unsafe fn accumulate_rows<V: Widen, F: RowFormat>(
    acc: &mut [f32],
    values: &F,
    first: usize,
    weights: &[f32],
) {
    let mut groups = weights.chunks_exact(4);
    for (chunk, group) in groups.by_ref().enumerate() {
        let group: &[f32; 4] = group.try_into().unwrap_unchecked();
        accumulate_row_group::<V, F, 4>(acc, values, first + 4 * chunk, group);
    }
    let done = weights.len() - groups.remainder().len();
    for (j, &weight) in groups.remainder().iter().enumerate() {
        accumulate_row_group::<V, F, 1>(acc, values, first + done + j, &[weight]);
    }
}

/// `acc += Σ_i weights[i] · v_(first + i)` for `N` consecutive value rows.
#[inline(always)]
unsafe fn accumulate_row_group<V: Widen, F: RowFormat, const N: usize>(
    acc: &mut [f32],
    values: &F,
    first: usize,
    weights: &[f32; N],
) {
    for i in 0..N {
        values.prefetch(first + i);
    }
    let rows: [F::Row; N] = std::array::from_fn(|i| values.row(first + i));
    let vectors = acc.len() / V::LANES;
    let mut splats = weights.map(|w| V::splat(w));
    for v in 0..vectors {
        let col = v * V::LANES;
        // A scaled format's weights change at each block of values; every vector width
        // divides the block, so blocks start at vector boundaries.
        if F::SCALED && col % INT8_BLOCK == 0 {
            for (i, splat) in splats.iter_mut().enumerate() {
                *splat = V::splat(weights[i] * F::scale(rows[i], col));
            }
        }
        let mut sum = V::load(acc.as_ptr().add(col));
        for (i, &splat) in splats.iter().enumerate() {
            sum = V::mul_add(splat, F::widen::<V>(rows[i], col), sum);
        }
        sum.store(acc.as_mut_ptr().add(col));
    }
    for (col, slot) in acc.iter_mut().enumerate().skip(vectors * V::LANES) {
        for (i, &weight) in weights.iter().enumerate() {
            *slot += weight * values.value(first + i, col);
        }
    }
}

/// Folds a block's scores into a row's state (max, sum, accumulators): rescales what was
/// accumulated and turns `scores` into the block's weights. False when every score is -inf.
#[inline(always)]
unsafe fn softmax_update<V: Widen>(state: &mut [f32], scores: &mut [f32]) -> bool {
    let block_max = row_max::<V>(scores);
    // A NaN score must reach the output. The vector max may return it or skip it, and where it
    // is skipped among scores that are otherwise all -inf, the row would pass for one that
    // sees nothing.
    let new_max = if block_max.is_nan()
        || (block_max == f32::NEG_INFINITY && scores.iter().any(|x| x.is_nan()))
    {
        f32::NAN
    } else {
        state[0].max(block_max)
    };
    if new_max == f32::NEG_INFINITY {
        return false;
    }
    let correction = exp2_f32(state[0] - new_max);
    if correction != 1.0 {
        scale_row::<V>(&mut state[1..], correction);
    }
    state[0] = new_max;
    state[1] += row_exp2::<V>(scores, new_max);
    true
}

/// Rows that all see the same keys (the query heads of one kv head, decoding one token):
/// each stored key and value vector is widened once for four rows at a time.
#[inline(always)]
unsafe fn attend_shared<V: Widen, F: RowFormat>(
    call: &CachedCall<'_>,
    keys: &F,
    values: &F,
    task: &Task,
    rows: &[(usize, Range<usize>)],
    states: &mut [f32],
) {
    let (depth, width) = (call.depth, call.depth + 2);
    let first_row = call.first_stored_row(task.head);
    let visible = rows[0].1.clone();
    let mut scores = vec![0.0f32; rows.len() * KEY_BLOCK];
    for block_start in task.keys.clone().step_by(KEY_BLOCK) {
        let block_end = (block_start + KEY_BLOCK).min(task.keys.end);
        let (start, end) = (visible.start.max(block_start), visible.end.min(block_end));
        if start >= end {
            continue;
        }
        let count = end - start;
        for first in (0..rows.len()).step_by(4) {
            // Rows past the last are stand-ins for the last one, computed and dropped.
            let pick = |i: usize| (first + i).min(rows.len() - 1);
            let queries = [0, 1, 2, 3].map(|i| &call.query[rows[pick(i)].0..][..depth]);
            for j in 0..count {
                let row = first_row + start + j;
                if first == 0 {
                    keys.prefetch(row);
                    values.prefetch(row);
                }
                let dots = dot_four::<V, F>(queries, keys, row);
                for (i, dot) in dots.iter().enumerate().take(rows.len() - first) {
                    scores[(first + i) * KEY_BLOCK + j] = dot * call.score_scale;
                }
            }
        }
        for (row, state) in states.chunks_exact_mut(width).enumerate() {
            let weights = &mut scores[row * KEY_BLOCK..][..count];
            if !softmax_update::<V>(state, weights) {
                // A row whose scores were all -inf adds nothing; zero weights say so.
                weights.fill(0.0);
            }
        }
        accumulate_four_rows::<V, F>(states, width, values, first_row + start, &scores, count);
    }
}

/// `q_i · k` for four query rows against global key row `row`, each key vector widened once.
#[inline(always)]
unsafe fn dot_four<V: Widen, F: RowFormat>(queries: [&[f32]; 4], keys: &F, row: usize) -> [f32; 4] {
    let depth = queries[0].len();
    let vectors = depth / V::LANES;
    let mut chains = [V::splat(0.0); 4];
    let stored = keys.row(row);
    for v in 0..vectors {
        let col = v * V::LANES;
        let mut key = F::widen::<V>(stored, col);
        if F::SCALED {
            key = key.mul(V::splat(F::scale(stored, col)));
        }
        for (chain, query) in chains.iter_mut().zip(queries) {
            *chain = V::mul_add(V::load(query.as_ptr().add(col)), key, *chain);
        }
    }
    let mut dots = chains.map(|chain| chain.reduce_sum());
    for col in vectors * V::LANES..depth {
        let key = keys.value(row, col);
        for (dot, query) in dots.iter_mut().zip(queries) {
            *dot += query[col] * key;
        }
    }
    dots
}

/// Every row's `acc += Σ_j w[row][j] · v_(first + j)`: rows four at a time, two vectors of
/// the accumulators in registers, each value vector widened once for the four rows.
#[inline(always)]
unsafe fn accumulate_four_rows<V: Widen, F: RowFormat>(
    states: &mut [f32],
    width: usize,
    values: &F,
    first: usize,
    weights: &[f32],
    count: usize,
) {
    let rows = states.len() / width;
    let depth = width - 2;
    let vectors = depth / V::LANES;
    for first_row in (0..rows).step_by(4) {
        let pick = |i: usize| (first_row + i).min(rows - 1);
        let real = (rows - first_row).min(4);
        let mut v = 0;
        while v + 2 <= vectors {
            let cols = [v * V::LANES, (v + 1) * V::LANES];
            let at = |i: usize, c: usize| pick(i) * width + 2 + cols[c];
            let mut sums = [[V::splat(0.0); 2]; 4];
            for (i, pair) in sums.iter_mut().enumerate() {
                for (c, sum) in pair.iter_mut().enumerate() {
                    *sum = V::load(states.as_ptr().add(at(i, c)));
                }
            }
            for j in 0..count {
                let row = values.row(first + j);
                let mut x = [F::widen::<V>(row, cols[0]), F::widen::<V>(row, cols[1])];
                if F::SCALED {
                    // Scaled once here for the four rows, not folded into each row's weight.
                    for (vector, &col) in x.iter_mut().zip(&cols) {
                        *vector = vector.mul(V::splat(F::scale(row, col)));
                    }
                }
                for (i, pair) in sums.iter_mut().enumerate() {
                    let weight = V::splat(*weights.get_unchecked(pick(i) * KEY_BLOCK + j));
                    for (c, sum) in pair.iter_mut().enumerate() {
                        *sum = V::mul_add(weight, x[c], *sum);
                    }
                }
            }
            for (i, pair) in sums.iter().enumerate().take(real) {
                for (c, sum) in pair.iter().enumerate() {
                    sum.store(states.as_mut_ptr().add(at(i, c)));
                }
            }
            v += 2;
        }
        // The columns left over (an odd vector, a tail narrower than a vector), one by one.
        for row in first_row..first_row + real {
            for col in v * V::LANES..depth {
                let slot = row * width + 2 + col;
                for j in 0..count {
                    states[slot] += weights[row * KEY_BLOCK + j] * values.value(first + j, col);
                }
            }
        }
    }
}

/// The stored rows of keys and values in one format.
enum Formats<'a> {
    F32(&'a RowBuffer<f32>, &'a RowBuffer<f32>),
    BFloat16(&'a RowBuffer<bf16>, &'a RowBuffer<bf16>),
    Float16(&'a RowBuffer<f16>, &'a RowBuffer<f16>),
    Int8(Int8Rows<'a>, Int8Rows<'a>),
}

/// Runs `attend_task::<V, F>` inside a function compiled for the level's instructions.
macro_rules! task_at_level {
    ($level:expr, $call:expr, $keys:expr, $values:expr, $task:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            use crate::simd::avx2::Avx2F32;
            use crate::simd::avx512::Avx512F32;
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<F: RowFormat>(
                call: &CachedCall<'_>,
                keys: &F,
                values: &F,
                task: &Task,
            ) -> Vec<f32> {
                attend_task::<Avx512F32, F>(call, keys, values, task)
            }
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<F: RowFormat>(
                call: &CachedCall<'_>,
                keys: &F,
                values: &F,
                task: &Task,
            ) -> Vec<f32> {
                attend_task::<Avx2F32, F>(call, keys, values, task)
            }
            // SAFETY: `cached_level` returns only levels this CPU supports.
            match $level {
                SimdLevel::Avx512 => return unsafe { avx512($call, $keys, $values, $task) },
                SimdLevel::Avx2 => return unsafe { avx2($call, $keys, $values, $task) },
                _ => {}
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            use crate::simd::neon::NeonF32;
            #[target_feature(enable = "neon")]
            unsafe fn neon<F: RowFormat>(
                call: &CachedCall<'_>,
                keys: &F,
                values: &F,
                task: &Task,
            ) -> Vec<f32> {
                attend_task::<NeonF32, F>(call, keys, values, task)
            }
            if $level == SimdLevel::Neon {
                // SAFETY: NEON is part of every aarch64 CPU.
                return unsafe { neon($call, $keys, $values, $task) };
            }
        }
        // SAFETY: portable vectors need no CPU feature.
        unsafe { attend_task::<PortableF32, _>($call, $keys, $values, $task) }
    }};
}

fn run_task(
    level: SimdLevel,
    call: &CachedCall<'_>,
    formats: &Formats<'_>,
    task: &Task,
) -> Vec<f32> {
    match formats {
        Formats::F32(keys, values) => task_at_level!(level, call, *keys, *values, task),
        Formats::BFloat16(keys, values) => task_at_level!(level, call, *keys, *values, task),
        Formats::Float16(keys, values) => task_at_level!(level, call, *keys, *values, task),
        Formats::Int8(keys, values) => task_at_level!(level, call, keys, values, task),
    }
}

/// The instruction set for the cache kernel: the active level, except that the AVX2 widening
/// loads also need F16C.
fn cached_level(level: SimdLevel) -> SimdLevel {
    match level {
        SimdLevel::Avx2 if !f16c_supported() => SimdLevel::Portable,
        other => other,
    }
}

/// Attention of `call`'s queries over stored `keys` and `values` (float32 rows or a compressed
/// storage): the output `(batch, Hq, L, D)` as float32.
pub(crate) fn attend_stored<T: crate::element::Element>(
    level: SimdLevel,
    call: &CachedCall<'_>,
    keys: &Rows<T>,
    values: &Rows<T>,
    native_f32: Option<(&RowBuffer<f32>, &RowBuffer<f32>)>,
) -> Result<Vec<f32>, AttnError> {
    let formats = match (keys, values, native_f32) {
        (_, _, Some((k, v))) => Formats::F32(k, v),
        (Rows::BFloat16(k), Rows::BFloat16(v), None) => Formats::BFloat16(k, v),
        (Rows::Float16(k), Rows::Float16(v), None) => Formats::Float16(k, v),
        (
            Rows::Int8 {
                values: kv,
                scales: ks,
            },
            Rows::Int8 {
                values: vv,
                scales: vs,
            },
            None,
        ) => Formats::Int8(
            Int8Rows {
                values: kv,
                scales: ks,
            },
            Int8Rows {
                values: vv,
                scales: vs,
            },
        ),
        _ => unreachable!("keys and values share one storage"),
    };
    let level = cached_level(level);
    let tasks = call.tasks();
    let pool = pool_for(call.num_threads)?;
    let work = call.batch * call.query_heads * call.num_queries * call.num_keys * call.depth;
    let run = |task: &Task| run_task(level, call, &formats, task);
    let partials: Vec<Vec<f32>> =
        if work <= ATTENTION_INLINE_WORK || pool.current_num_threads() == 1 {
            tasks.iter().map(run).collect()
        } else {
            pool.install(|| tasks.par_iter().with_max_len(1).map(run).collect())
        };
    Ok(merge(call, &tasks, &partials))
}

/// The output rows from the tasks' partial states, merged in key order.
fn merge(call: &CachedCall<'_>, tasks: &[Task], partials: &[Vec<f32>]) -> Vec<f32> {
    let depth = call.depth;
    let mut output = vec![0.0f32; call.batch * call.query_heads * call.num_queries * depth];
    let mut index = 0;
    while index < tasks.len() {
        let (head, rows) = (tasks[index].head, tasks[index].rows.clone());
        let mut merged = partials[index].clone();
        index += 1;
        while index < tasks.len() && tasks[index].head == head && tasks[index].rows == rows {
            for (into, from) in merged
                .chunks_exact_mut(depth + 2)
                .zip(partials[index].chunks_exact(depth + 2))
            {
                merge_state(into, from);
            }
            index += 1;
        }
        for (row, state) in rows.zip(merged.chunks_exact(depth + 2)) {
            let (offset, _) = call.row(head, row);
            let sum = state[1];
            let scale = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for (out, &acc) in output[offset..offset + depth].iter_mut().zip(&state[2..]) {
                *out = acc * scale;
            }
        }
    }
    output
}

/// Folds the partial state `from` (later keys) into `into`.
fn merge_state(into: &mut [f32], from: &[f32]) {
    let max = into[0].max(from[0]);
    if max == f32::NEG_INFINITY {
        return;
    }
    let (keep, take) = (exp2_f32(into[0] - max), exp2_f32(from[0] - max));
    into[0] = max;
    for (a, &b) in into[1..].iter_mut().zip(&from[1..]) {
        *a = *a * keep + b * take;
    }
}
