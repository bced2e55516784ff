//! Decoding: a few query rows against stored key and value rows read in their stored format
//! (float32, bfloat16, float16 or int8 blocks) and widened in registers, so each stored byte is
//! read once and no decompressed copy is written. Scores, softmax and the output accumulate in
//! float32, in a [`SoftmaxState`] per block of rows.
//!
//! The same kernel serves a KV cache in any storage and a float32 `scaled_dot_product_attention`
//! decoding one query row, so a decoding step gives the same bits whichever way it comes in.
//! The scheduler (`attention::decode`) cuts the work into blocks and merges their states.

use std::ops::Range;

use half::{bf16, f16};

use crate::bounds::Bounds;
use crate::kernel::dispatch::dispatched;
use crate::kernel::microkernel::{row_exp2, row_max, scale_row};
use crate::kernel::SoftmaxState;
use crate::simd::portable::{exp2_f32, PortableF32};
use crate::simd::widen::Widen;
use crate::simd::SimdLevel;

/// Values that share one scale in int8 storage (llama.cpp's q8_0 block).
pub const INT8_BLOCK: usize = 32;
/// Keys scored together before their softmax update (the scores stay in registers' reach).
const KEY_BLOCK: usize = 32;
/// Keys scored before each softmax update of a block with one row: all their scores fit in
/// L1, so the keys and then the values stream through once, whole rows at a time.
const STREAM_BLOCK: usize = 1024;

/// One call: queries `(batch, Hq, L, D)` (contiguous float32) over `num_keys` stored rows per
/// (batch, kv head), starting at row `first_row` of each head's `row_capacity`.
pub(crate) struct DecodeCall<'a> {
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
}

impl DecodeCall<'_> {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.query_heads / self.kv_heads
    }

    /// The query rows of one kv head: its query heads' rows, head after head.
    pub fn rows_per_head(&self) -> usize {
        self.group() * self.num_queries
    }

    /// The global stored row of kv head `head`'s first key (key 0 of the call).
    fn first_stored_row(&self, head: usize) -> usize {
        head * self.row_capacity + self.first_row
    }

    /// Row `row` of kv head `head` (flattened with the batch): where its query and its output
    /// row start, in rows of `(batch, Hq, L)`, and the keys it sees.
    pub fn row(&self, head: usize, row: usize) -> (usize, Range<usize>) {
        let (batch, kv_head) = (head / self.kv_heads, head % self.kv_heads);
        let (member, position) = (row / self.num_queries, row % self.num_queries);
        let query_head = batch * self.query_heads + kv_head * self.group() + member;
        (
            query_head * self.num_queries + position,
            self.bounds.row_keys(position),
        )
    }

    fn query_row(&self, index: usize) -> &[f32] {
        &self.query[index * self.depth..][..self.depth]
    }
}

/// A buffer of stored rows: row `r` is `data[r · per_row..][..per_row]`.
#[derive(Clone, Copy)]
pub(crate) struct StoredRows<'a, U> {
    pub data: &'a [U],
    pub per_row: usize,
}

impl<U> StoredRows<'_, U> {
    /// Where row `row` starts, unchecked: computing it never faults; reading through it is
    /// sound only for a row inside the buffer.
    #[inline(always)]
    fn row_ptr(&self, row: usize) -> *const U {
        self.data.as_ptr().wrapping_add(row * self.per_row)
    }
}

/// Stored rows of one format, read by the kernel.
pub(crate) trait RowFormat: Sync {
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
fn prefetch_row<U>(buffer: &StoredRows<'_, U>, row: usize) {
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

/// [`RowFormat`] for rows stored as `$elem`, widened to float32 by `V::$load`.
macro_rules! plain_rows {
    ($elem:ty, $load:ident) => {
        impl RowFormat for StoredRows<'_, $elem> {
            const SCALED: bool = false;
            type Row = *const $elem;
            fn prefetch(&self, row: usize) {
                prefetch_row(self, row);
            }
            #[inline(always)]
            fn row(&self, row: usize) -> Self::Row {
                self.row_ptr(row)
            }
            #[inline(always)]
            unsafe fn widen<V: Widen>(row: Self::Row, col: usize) -> V {
                V::$load(row.add(col))
            }
            fn value(&self, row: usize, col: usize) -> f32 {
                f32::from(self.data[row * self.per_row + col])
            }
        }
    };
}

plain_rows!(f32, load);
plain_rows!(bf16, load_bf16);
plain_rows!(f16, load_f16);

/// int8 rows and their block scales.
#[derive(Clone, Copy)]
pub(crate) struct Int8Rows<'a> {
    pub values: StoredRows<'a, i8>,
    pub scales: StoredRows<'a, f32>,
}

impl RowFormat for Int8Rows<'_> {
    const SCALED: bool = true;
    /// The row's values and its block scales.
    type Row = (*const i8, *const f32);
    fn prefetch(&self, row: usize) {
        // The scales (a few bytes per row) stream in order and need no hint.
        prefetch_row(&self.values, row);
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

/// The online softmax of kv head `head`'s rows `rows` (indices into its
/// [`DecodeCall::rows_per_head`]) over keys `keys`, into `state` (emptied first).
#[inline(always)]
unsafe fn decode_block_at<V: Widen, F: RowFormat>(
    call: &DecodeCall<'_>,
    keys: &F,
    values: &F,
    head: usize,
    rows: Range<usize>,
    key_range: Range<usize>,
    state: &mut SoftmaxState<f32>,
) {
    let depth = call.depth;
    state.reset(rows.len(), depth);
    let rows: Vec<_> = rows.map(|row| call.row(head, row)).collect();
    if call.num_queries == 1 && rows.len() > 1 {
        attend_shared::<V, F>(call, keys, values, head, &key_range, &rows, state);
        return;
    }
    if let [row] = rows.as_slice() {
        attend_one_row::<V, F>(call, keys, values, head, &key_range, row, state);
        return;
    }
    let first_row = call.first_stored_row(head);
    let mut scores = [0.0f32; KEY_BLOCK];
    for block_start in key_range.clone().step_by(KEY_BLOCK) {
        let block_end = (block_start + KEY_BLOCK).min(key_range.end);
        for (index, (query_row, visible)) in rows.iter().enumerate() {
            let start = visible.start.max(block_start);
            let end = visible.end.min(block_end);
            if start >= end {
                continue;
            }
            let query = call.query_row(*query_row);
            let weights = &mut scores[..end - start];
            for (j, score) in weights.iter_mut().enumerate() {
                let row = first_row + start + j;
                if index == 0 {
                    keys.prefetch(row);
                    values.prefetch(row);
                }
                *score = dot::<V, F>(query, keys, row) * call.score_scale;
            }
            let acc = &mut state.acc[index * depth..][..depth];
            softmax_update::<V>(&mut state.max[index], &mut state.sum[index], acc, weights);
            accumulate::<V, F>(acc, values, first_row + start, weights);
        }
    }
}

/// A block with a single row (one head decoding one token, or a head's last row left alone):
/// the scores of up to [`STREAM_BLOCK`] keys, one softmax update, then the values of those keys
/// row after row.
#[inline(always)]
unsafe fn attend_one_row<V: Widen, F: RowFormat>(
    call: &DecodeCall<'_>,
    keys: &F,
    values: &F,
    head: usize,
    key_range: &Range<usize>,
    (query_row, visible): &(usize, Range<usize>),
    state: &mut SoftmaxState<f32>,
) {
    let query = call.query_row(*query_row);
    let first_row = call.first_stored_row(head);
    let (start, end) = (
        visible.start.max(key_range.start),
        visible.end.min(key_range.end),
    );
    let mut scores = vec![0.0f32; STREAM_BLOCK.min(end.saturating_sub(start))];
    for block_start in (start..end).step_by(STREAM_BLOCK) {
        let weights = &mut scores[..(end - block_start).min(STREAM_BLOCK)];
        for (j, score) in weights.iter_mut().enumerate() {
            let row = first_row + block_start + j;
            keys.prefetch(row);
            *score = dot::<V, F>(query, keys, row) * call.score_scale;
        }
        let acc = &mut state.acc[..];
        softmax_update::<V>(&mut state.max[0], &mut state.sum[0], acc, weights);
        accumulate_rows::<V, F>(acc, values, first_row + block_start, weights);
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

/// Folds a block's scores into a row's running `max`, `sum` and accumulator `acc`: rescales
/// what was accumulated and turns `scores` into the block's weights. Scores that are all -inf
/// (so far) give zero weights, which still carry a visible NaN or inf value into the output
/// (0 · NaN is NaN), as the tiled kernel and PyTorch do.
#[inline(always)]
unsafe fn softmax_update<V: Widen>(
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
    scores: &mut [f32],
) {
    let block_max = row_max::<V>(scores);
    // A NaN score must reach the output. The vector max may return it or skip it, and where it
    // is skipped among scores that are otherwise all -inf, the row would pass for one that
    // sees nothing.
    let new_max = if block_max.is_nan()
        || (block_max == f32::NEG_INFINITY && scores.iter().any(|x| x.is_nan()))
    {
        f32::NAN
    } else {
        max.max(block_max)
    };
    if new_max == f32::NEG_INFINITY {
        scores.fill(0.0);
        return;
    }
    let correction = exp2_f32(*max - new_max);
    if correction != 1.0 {
        *sum *= correction;
        scale_row::<V>(acc, correction);
    }
    *max = new_max;
    *sum += row_exp2::<V>(scores, new_max);
}

/// Rows that all see the same keys (the query heads of one kv head, decoding one token):
/// each stored key and value vector is widened once for four rows at a time.
#[inline(always)]
unsafe fn attend_shared<V: Widen, F: RowFormat>(
    call: &DecodeCall<'_>,
    keys: &F,
    values: &F,
    head: usize,
    key_range: &Range<usize>,
    rows: &[(usize, Range<usize>)],
    state: &mut SoftmaxState<f32>,
) {
    let depth = call.depth;
    let first_row = call.first_stored_row(head);
    let visible = rows[0].1.clone();
    let mut scores = vec![0.0f32; rows.len() * KEY_BLOCK];
    for block_start in key_range.clone().step_by(KEY_BLOCK) {
        let block_end = (block_start + KEY_BLOCK).min(key_range.end);
        let (start, end) = (visible.start.max(block_start), visible.end.min(block_end));
        if start >= end {
            continue;
        }
        let count = end - start;
        for first in (0..rows.len()).step_by(4) {
            // Rows past the last are stand-ins for the last one, computed and dropped.
            let pick = |i: usize| (first + i).min(rows.len() - 1);
            let queries = [0, 1, 2, 3].map(|i| call.query_row(rows[pick(i)].0));
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
        for row in 0..rows.len() {
            let weights = &mut scores[row * KEY_BLOCK..][..count];
            let acc = &mut state.acc[row * depth..][..depth];
            softmax_update::<V>(&mut state.max[row], &mut state.sum[row], acc, weights);
        }
        accumulate_four_rows::<V, F>(
            &mut state.acc,
            depth,
            values,
            first_row + start,
            &scores,
            count,
        );
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

/// Every row's `acc += Σ_j w[row][j] · v_(first + j)` (`acc` holds rows of `depth`): rows four
/// at a time, two vectors of the accumulators in registers, each value vector widened once for
/// the four rows.
#[inline(always)]
unsafe fn accumulate_four_rows<V: Widen, F: RowFormat>(
    acc: &mut [f32],
    depth: usize,
    values: &F,
    first: usize,
    weights: &[f32],
    count: usize,
) {
    let rows = acc.len() / depth;
    let vectors = depth / V::LANES;
    for first_row in (0..rows).step_by(4) {
        let pick = |i: usize| (first_row + i).min(rows - 1);
        let real = (rows - first_row).min(4);
        let mut v = 0;
        while v + 2 <= vectors {
            let cols = [v * V::LANES, (v + 1) * V::LANES];
            let at = |i: usize, c: usize| pick(i) * depth + cols[c];
            let mut sums = [[V::splat(0.0); 2]; 4];
            for (i, pair) in sums.iter_mut().enumerate() {
                for (c, sum) in pair.iter_mut().enumerate() {
                    *sum = V::load(acc.as_ptr().add(at(i, c)));
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
                    sum.store(acc.as_mut_ptr().add(at(i, c)));
                }
            }
            v += 2;
        }
        // The columns left over (an odd vector, a tail narrower than a vector), one by one.
        for row in first_row..first_row + real {
            for col in v * V::LANES..depth {
                let slot = row * depth + col;
                for j in 0..count {
                    acc[slot] += weights[row * KEY_BLOCK + j] * values.value(first + j, col);
                }
            }
        }
    }
}

/// The weights of row `row` of kv head `head` over the keys it sees, into `weights` (one per
/// visible key): `2^(s - max) / sum` from the row's merged state, each score `s` computed as
/// the output's were.
#[inline(always)]
unsafe fn decode_weights_at<V: Widen, F: RowFormat>(
    call: &DecodeCall<'_>,
    keys: &F,
    head: usize,
    row: usize,
    max: f32,
    sum: f32,
    weights: &mut [f32],
) {
    let (query_row, visible) = call.row(head, row);
    let query = call.query_row(query_row);
    let first_row = call.first_stored_row(head) + visible.start;
    for (j, weight) in weights.iter_mut().enumerate() {
        *weight = dot::<V, F>(query, keys, first_row + j) * call.score_scale;
    }
    if sum == 0.0 {
        weights.fill(0.0);
        return;
    }
    row_exp2::<V>(weights, max);
    scale_row::<V>(weights, 1.0 / sum);
}

#[cfg(target_arch = "aarch64")]
use crate::simd::neon::NeonF32;
#[cfg(target_arch = "x86_64")]
use crate::simd::{avx2::Avx2F32, avx512::Avx512F32};

dispatched!(
    PortableF32, Avx2F32, Avx512F32, NeonF32;
    /// The online softmax of kv head `head`'s rows `rows` over keys `key_range`, at `level`,
    /// into `state` (emptied first).
    #[expect(
        clippy::too_many_arguments,
        reason = "one block's inputs and its state, passed through"
    )]
    pub(crate) decode_block<F: RowFormat> => decode_block_at(
        call: &DecodeCall<'_>, keys: &F, values: &F, head: usize, rows: Range<usize>,
        key_range: Range<usize>, state: &mut SoftmaxState<f32>,
    );
    /// [`decode_weights_at`] at `level`: row `row` of kv head `head`, from its merged `max`
    /// and `sum`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one row's inputs and its weights, passed through"
    )]
    pub(crate) decode_weights<F: RowFormat> => decode_weights_at(
        call: &DecodeCall<'_>, keys: &F, head: usize, row: usize, max: f32, sum: f32,
        weights: &mut [f32],
    )
);
