//! Register-tiled micro-kernels for the two products of attention, generic over [`SimdVec`].
//!
//! Scores have two layouts. For a block of many queries they are computed transposed,
//! `Sᵀ = K·Qᵀ` (keys x queries, [`transposed_scores`]): each key element is broadcast from K as
//! it lies in memory and multiplied by a vector of queries from `Qᵀ`, which is packed once per
//! task, and the softmax runs down the key axis with one query per lane. For a few query rows
//! (decoding) they are dot products along the rows, `S = Q·Kᵀ` ([`scores_by_dot`]), and the
//! softmax runs along the keys with a key per lane. Either way K is never copied. `P·V`
//! ([`accumulate_pv`]) reads V in place (rows of `Dv` contiguous) and broadcasts the weights.
//!
//! All functions are `unsafe`: callers guarantee the extents documented on each and run them
//! only inside code compiled for `V`'s instruction set.

use crate::element::Element;
use crate::simd::SimdVec;

/// `out[r][c] = Σ_k a(r, k) · b[k][c]`, or with `ADD` `out[r][c] += Σ_k ...`, for `ROWS` rows
/// of `a` (broadcast) and `COLS` vectors of `b` columns, `k < depth`: reads `a(r, k)` at
/// `a[r * a_layout.row_stride + k * a_layout.key_stride]` and `b[k][c]` at `b[k * stride + c]`,
/// writes `out[r][c]` at `out[r * stride + c]`.
///
/// With `ADD` (`P·V`) the sum over these keys starts from zero and is added to `out` once at
/// the end: over a long run of keys the running total then takes one rounding per call (per
/// key block), not one per key, which keeps float32 accurate at hundreds of thousands of keys.
#[inline(always)]
unsafe fn product_tile<V: SimdVec, const ROWS: usize, const COLS: usize, const ADD: bool>(
    a: *const V::Elem,
    a_layout: WeightLayout,
    b: *const V::Elem,
    depth: usize,
    out: *mut V::Elem,
    stride: usize,
) {
    // Scores read `a` along its rows; a stride known to be 1 keeps their address arithmetic
    // out of the inner loop (a run-time stride there cost D64 prefill about 2.5%).
    debug_assert!(ADD || a_layout.key_stride == 1);
    let key_stride = if ADD { a_layout.key_stride } else { 1 };
    let zero = V::splat(V::Elem::ZERO);
    let mut sums = [[zero; COLS]; ROWS];
    for k in 0..depth {
        let mut columns = [zero; COLS];
        for (col, column) in columns.iter_mut().enumerate() {
            *column = V::load(b.add(k * stride + col * V::LANES));
        }
        for (row, sums_row) in sums.iter_mut().enumerate() {
            let broadcast = V::splat(*a.add(row * a_layout.row_stride + k * key_stride));
            for col in 0..COLS {
                sums_row[col] = V::mul_add(broadcast, columns[col], sums_row[col]);
            }
        }
    }
    for (row, sums_row) in sums.iter().enumerate() {
        for (col, sum) in sums_row.iter().enumerate() {
            let cell = out.add(row * stride + col * V::LANES);
            if ADD {
                V::load(cell).add(*sum).store(cell);
            } else {
                sum.store(cell);
            }
        }
    }
}

/// `Sᵀ[j][i] = Σ_d k[j][d] · qt[d][i]` for `num_keys` keys (rows of `k`, stride `depth`) and
/// `width` queries (a multiple of `V::LANES`); `qt` is `depth x width`.
#[inline(always)]
pub(crate) unsafe fn transposed_scores<V: SimdVec>(
    keys: &[V::Elem],
    num_keys: usize,
    qt: &[V::Elem],
    depth: usize,
    width: usize,
    scores: &mut [V::Elem],
) {
    debug_assert!(width.is_multiple_of(V::LANES));
    debug_assert!(keys.len() >= num_keys * depth && qt.len() >= depth * width);
    debug_assert!(scores.len() >= num_keys * width);
    let tile_width = V::TILE_VECS * V::LANES;
    let mut col = 0;
    while col < width {
        // Full register tiles of queries, then single vectors for a narrow remainder.
        let vectors = if col + tile_width <= width {
            V::TILE_VECS
        } else {
            1
        };
        scores_columns::<V>(keys, num_keys, qt, depth, width, col, vectors, scores);
        col += vectors * V::LANES;
    }
}

/// One column strip of [`transposed_scores`]: `vectors` vectors of queries starting at `col`.
#[inline(always)]
#[expect(clippy::too_many_arguments)]
unsafe fn scores_columns<V: SimdVec>(
    keys: &[V::Elem],
    num_keys: usize,
    qt: &[V::Elem],
    depth: usize,
    width: usize,
    col: usize,
    vectors: usize,
    scores: &mut [V::Elem],
) {
    let (k, q, s) = (
        keys.as_ptr(),
        qt.as_ptr().add(col),
        scores.as_mut_ptr().add(col),
    );
    let mut key = 0;
    while key < num_keys {
        let rows = (num_keys - key).min(V::TILE_ROWS);
        let (a, out) = (k.add(key * depth), s.add(key * width));
        match vectors {
            4 => product_rows::<V, 4>(rows, a, q, depth, width, out),
            2 => product_rows::<V, 2>(rows, a, q, depth, width, out),
            _ => product_rows::<V, 1>(rows, a, q, depth, width, out),
        }
        key += rows;
    }
}

/// [`product_tile`] for `rows` rows (1 to 6), so that a remainder of rows still gets one tile
/// rather than a tile per row: rows of `a` are `depth` long, rows of `b` and `out` `width`.
#[inline(always)]
unsafe fn product_rows<V: SimdVec, const COLS: usize>(
    rows: usize,
    a: *const V::Elem,
    b: *const V::Elem,
    depth: usize,
    width: usize,
    out: *mut V::Elem,
) {
    debug_assert!((1..=6).contains(&rows));
    let a_layout = WeightLayout {
        row_stride: depth,
        key_stride: 1,
    };
    match rows {
        1 => product_tile::<V, 1, COLS, false>(a, a_layout, b, depth, out, width),
        2 => product_tile::<V, 2, COLS, false>(a, a_layout, b, depth, out, width),
        3 => product_tile::<V, 3, COLS, false>(a, a_layout, b, depth, out, width),
        4 => product_tile::<V, 4, COLS, false>(a, a_layout, b, depth, out, width),
        5 => product_tile::<V, 5, COLS, false>(a, a_layout, b, depth, out, width),
        _ => product_tile::<V, 6, COLS, false>(a, a_layout, b, depth, out, width),
    }
}

/// Dot products of one row `q` with `KEYS` consecutive rows of `k` (stride `len`). Several keys
/// at once give the FMA chains independent accumulators and reuse each load of `q`.
#[inline(always)]
unsafe fn dots<V: SimdVec, const KEYS: usize>(
    q: *const V::Elem,
    k: *const V::Elem,
    len: usize,
) -> [V::Elem; KEYS] {
    let mut sums = [V::splat(V::Elem::ZERO); KEYS];
    let mut index = 0;
    while index + V::LANES <= len {
        let query = V::load(q.add(index));
        for (key, sum) in sums.iter_mut().enumerate() {
            *sum = V::mul_add(query, V::load(k.add(key * len + index)), *sum);
        }
        index += V::LANES;
    }
    let mut totals = [V::Elem::ZERO; KEYS];
    for (key, total) in totals.iter_mut().enumerate() {
        *total = sums[key].reduce_sum();
        for tail in index..len {
            *total += *q.add(tail) * *k.add(key * len + tail);
        }
    }
    totals
}

/// How far ahead of the row being read the decode path touches K and V: a few pages, so the
/// hardware prefetcher, which stops at page boundaries, is already streaming the next page.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 16384;

/// One cache-line hint `PREFETCH_BYTES` past `base + offset` elements. A hint never faults, so
/// it may point past the data (hence `wrapping_add`).
#[inline(always)]
fn prefetch_ahead<T>(base: *const T, offset: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let target = (base.wrapping_add(offset) as *const i8).wrapping_add(PREFETCH_BYTES);
        // SAFETY: prefetching is a hint with no effect on memory; any address is allowed.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(target) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (base, offset);
}

/// `S[i][j] = q[i] · k[j]` by dot products, for a few query rows (`q` is `num_queries x
/// depth`), into rows of `stride`: decoding reads each key once, and its softmax runs along
/// the keys with a key per lane instead of padding one query to a whole vector. Decoding is
/// bound by reading K and V, so both (`values` has rows of `value_dim`) are hinted ahead.
#[inline(always)]
#[expect(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_by_dot<V: SimdVec>(
    keys: &[V::Elem],
    num_keys: usize,
    q: &[V::Elem],
    num_queries: usize,
    depth: usize,
    stride: usize,
    scores: &mut [V::Elem],
    values: &[V::Elem],
    value_dim: usize,
) {
    const KEYS_AT_ONCE: usize = 4;
    debug_assert!(keys.len() >= num_keys * depth && q.len() >= num_queries * depth);
    debug_assert!(num_keys <= stride && scores.len() >= num_queries * stride);
    let mut key = 0;
    while key < num_keys {
        prefetch_ahead(keys.as_ptr(), key * depth);
        prefetch_ahead(values.as_ptr(), key * value_dim);
        let key_rows = keys.as_ptr().add(key * depth);
        for query in 0..num_queries {
            let query_row = q.as_ptr().add(query * depth);
            if key + KEYS_AT_ONCE <= num_keys {
                let totals = dots::<V, KEYS_AT_ONCE>(query_row, key_rows, depth);
                for (offset, total) in totals.into_iter().enumerate() {
                    scores[query * stride + key + offset] = total;
                }
            } else {
                scores[query * stride + key] = dots::<V, 1>(query_row, key_rows, depth)[0];
            }
        }
        key += if key + KEYS_AT_ONCE <= num_keys {
            KEYS_AT_ONCE
        } else {
            1
        };
    }
}

/// Weights laid out for `P·V`: weight of (row `r`, key `j`) at `r * row_stride + j * key_stride`.
#[derive(Clone, Copy)]
pub(crate) struct WeightLayout {
    pub row_stride: usize,
    pub key_stride: usize,
}

/// `P·V` for `ROWS` rows over all `dv` columns: wide tiles, then single vectors, then scalars.
#[inline(always)]
unsafe fn pv_rows<V: SimdVec, const ROWS: usize>(
    p: *const V::Elem,
    layout: WeightLayout,
    num_keys: usize,
    v: *const V::Elem,
    dv: usize,
    acc: *mut V::Elem,
) {
    let wide = V::TILE_VECS * V::LANES;
    let mut col = 0;
    // A single row has registers to spare: eight vectors per pass read each row of V in one
    // sweep (decoding is bound by that read).
    while ROWS == 1 && col + 8 * V::LANES <= dv {
        product_tile::<V, ROWS, 8, true>(p, layout, v.add(col), num_keys, acc.add(col), dv);
        col += 8 * V::LANES;
    }
    while col + wide <= dv {
        if V::TILE_VECS == 4 {
            product_tile::<V, ROWS, 4, true>(p, layout, v.add(col), num_keys, acc.add(col), dv);
        } else {
            product_tile::<V, ROWS, 2, true>(p, layout, v.add(col), num_keys, acc.add(col), dv);
        }
        col += wide;
    }
    while col + V::LANES <= dv {
        product_tile::<V, ROWS, 1, true>(p, layout, v.add(col), num_keys, acc.add(col), dv);
        col += V::LANES;
    }
    for row in 0..ROWS {
        for c in col..dv {
            let mut sum = V::Elem::ZERO;
            for key in 0..num_keys {
                let weight = *p.add(row * layout.row_stride + key * layout.key_stride);
                sum += weight * *v.add(key * dv + c);
            }
            *acc.add(row * dv + c) += sum;
        }
    }
}

/// `acc += P·V`: `rows` rows of weights (at `layout`) over `num_keys` keys, `v` is
/// `num_keys x dv`, `acc` is `rows x dv`.
///
/// With `hidden`, keys that `hidden(row, key)` says the row cannot see are left out instead of
/// multiplied by their zero weight, so a NaN or inf value there cannot reach the sum (0 · NaN is
/// NaN), while a visible one still does, as in PyTorch. That path is scalar and used only for
/// blocks that both hide keys and hold non-finite values.
#[inline(always)]
#[expect(clippy::too_many_arguments)]
pub(crate) unsafe fn accumulate_pv<V: SimdVec>(
    p: &[V::Elem],
    layout: WeightLayout,
    rows: usize,
    num_keys: usize,
    v: &[V::Elem],
    dv: usize,
    acc: &mut [V::Elem],
    hidden: Option<&dyn Fn(usize, usize) -> bool>,
) {
    if rows == 0 || num_keys == 0 || dv == 0 {
        return;
    }
    debug_assert!(p.len() > (rows - 1) * layout.row_stride + (num_keys - 1) * layout.key_stride);
    debug_assert!(v.len() >= num_keys * dv && acc.len() >= rows * dv);
    if let Some(hidden) = hidden {
        for row in 0..rows {
            let acc_row = &mut acc[row * dv..(row + 1) * dv];
            for key in 0..num_keys {
                let weight = p[row * layout.row_stride + key * layout.key_stride];
                if weight == V::Elem::ZERO && hidden(row, key) {
                    continue;
                }
                for (sum, value) in acc_row.iter_mut().zip(&v[key * dv..(key + 1) * dv]) {
                    *sum += weight * *value;
                }
            }
        }
        return;
    }
    // Keys in slices whose values fit in L1 beside the weights: every tile of rows then reads
    // them from L1, where a whole key block's values (64 KiB and more) would come from L2 once
    // per tile of rows.
    let slice = (PV_SLICE_BYTES / (dv * std::mem::size_of::<V::Elem>())).max(V::LANES);
    let mut first_key = 0;
    while first_key < num_keys {
        let keys = (num_keys - first_key).min(slice);
        let mut row = 0;
        while row < rows {
            let block = (rows - row).min(V::TILE_ROWS);
            let (p, v, acc) = (
                p.as_ptr()
                    .add(row * layout.row_stride + first_key * layout.key_stride),
                v.as_ptr().add(first_key * dv),
                acc.as_mut_ptr().add(row * dv),
            );
            match block {
                1 => pv_rows::<V, 1>(p, layout, keys, v, dv, acc),
                2 => pv_rows::<V, 2>(p, layout, keys, v, dv, acc),
                3 => pv_rows::<V, 3>(p, layout, keys, v, dv, acc),
                4 => pv_rows::<V, 4>(p, layout, keys, v, dv, acc),
                5 => pv_rows::<V, 5>(p, layout, keys, v, dv, acc),
                _ => pv_rows::<V, 6>(p, layout, keys, v, dv, acc),
            }
            row += block;
        }
        first_key += keys;
    }
}

/// Bytes of values one slice of [`accumulate_pv`] reads: a third of a 48 KiB L1.
const PV_SLICE_BYTES: usize = 16 * 1024;

/// `best[c] = max(best[c], rows[j][c])` over `num_rows` rows of `width` (a multiple of LANES).
#[inline(always)]
pub(crate) unsafe fn column_max<V: SimdVec>(
    rows: &[V::Elem],
    num_rows: usize,
    width: usize,
    best: &mut [V::Elem],
) {
    debug_assert!(width.is_multiple_of(V::LANES) && rows.len() >= num_rows * width);
    for col in (0..width).step_by(V::LANES) {
        let mut max = V::load(best.as_ptr().add(col));
        for row in 0..num_rows {
            max = max.max(V::load(rows.as_ptr().add(row * width + col)));
        }
        max.store(best.as_mut_ptr().add(col));
    }
}

/// `rows[j][c] = 2^(rows[j][c] - shift[c])` in place; adds each column's sum to `sums[c]`.
#[inline(always)]
pub(crate) unsafe fn column_exp2<V: SimdVec>(
    rows: &mut [V::Elem],
    num_rows: usize,
    width: usize,
    shift: &[V::Elem],
    sums: &mut [V::Elem],
) {
    debug_assert!(width.is_multiple_of(V::LANES) && rows.len() >= num_rows * width);
    let minus_one = V::splat(V::Elem::from_f64(-1.0));
    for col in (0..width).step_by(V::LANES) {
        let negated_shift = V::load(shift.as_ptr().add(col)).mul(minus_one);
        let mut sum = V::load(sums.as_ptr().add(col));
        for row in 0..num_rows {
            let cell = rows.as_mut_ptr().add(row * width + col);
            let weight = V::load(cell).add(negated_shift).exp2();
            weight.store(cell);
            sum = sum.add(weight);
        }
        sum.store(sums.as_mut_ptr().add(col));
    }
}

/// `row[c] = 2^(row[c] - max)` in place (any length), returning the sum.
#[inline(always)]
pub(crate) unsafe fn row_exp2<V: SimdVec>(row: &mut [V::Elem], max: V::Elem) -> V::Elem {
    let negated_max = V::splat(max * V::Elem::from_f64(-1.0));
    let mut sum = V::splat(V::Elem::ZERO);
    let mut chunks = row.chunks_exact_mut(V::LANES);
    for chunk in &mut chunks {
        let weight = V::load(chunk.as_ptr()).add(negated_max).exp2();
        weight.store(chunk.as_mut_ptr());
        sum = sum.add(weight);
    }
    let mut total = sum.reduce_sum();
    for weight in chunks.into_remainder() {
        *weight = (*weight - max).exp2();
        total += *weight;
    }
    total
}

/// Largest element of `row` (any length).
#[inline(always)]
pub(crate) unsafe fn row_max<V: SimdVec>(row: &[V::Elem]) -> V::Elem {
    let mut best = V::splat(V::Elem::NEG_INFINITY);
    let mut chunks = row.chunks_exact(V::LANES);
    for chunk in &mut chunks {
        best = best.max(V::load(chunk.as_ptr()));
    }
    chunks
        .remainder()
        .iter()
        .fold(best.reduce_max(), |max, &value| max.max(value))
}

/// `row[c] *= factor` (any length).
#[inline(always)]
pub(crate) unsafe fn scale_row<V: SimdVec>(row: &mut [V::Elem], factor: V::Elem) {
    let splat = V::splat(factor);
    let mut chunks = row.chunks_exact_mut(V::LANES);
    for chunk in &mut chunks {
        V::load(chunk.as_ptr()).mul(splat).store(chunk.as_mut_ptr());
    }
    for value in chunks.into_remainder() {
        *value *= factor;
    }
}

/// `values[c] = C·tanh(values[c] / C)` in place, for scores in base 2 (`C = cap·log2(e)`).
/// Where `|u| = |s / cap|` is at least 1/8, `tanh(u) = ±(1 - m) / (1 + m)` with
/// `m = e^(-2|u|) = 2^(-2|t| / cap)` (`inverse_cap` is `1 / cap`): one `exp2` of the kernel's own,
/// whose exponent is never positive. Below 1/8 that difference cancels (at `|u|` = 1e-8 it is
/// exactly 0 in float32, as if every score were 0), so there `C·tanh(u) = t·(1 + u²·Q(u²))`,
/// from tanh's series: accurate to the last bit, and exactly `t` where `u²` underflows, whatever
/// the cap.
#[inline(always)]
pub(crate) unsafe fn softcap_scores<V: SimdVec>(
    values: &mut [V::Elem],
    cap_base2: V::Elem,
    inverse_cap: V::Elem,
) {
    let (zero, one) = (V::splat(V::Elem::ZERO), V::splat(V::Elem::ONE));
    let minus_one = V::splat(V::Elem::from_f64(-1.0));
    let cap = V::splat(cap_base2);
    let minus_twice = V::splat(V::Elem::from_f64(-2.0) * inverse_cap);
    // u = s / cap = t / (cap·log2(e)) = t · ln(2) / cap.
    let to_u = V::splat(inverse_cap * V::Elem::from_f64(std::f64::consts::LN_2));
    let series_bound = V::splat(V::Elem::from_f64(TANH_SERIES_BOUND * TANH_SERIES_BOUND));
    // Three terms already reach float32's last bit below the bound; float64 needs eight.
    let terms = if std::mem::size_of::<V::Elem>() == 4 {
        3
    } else {
        TANH_SERIES.len()
    };
    let series_coeffs = TANH_SERIES.map(|c| V::splat(V::Elem::from_f64(c)));
    let mut chunks = values.chunks_exact_mut(V::LANES);
    for chunk in &mut chunks {
        let t = V::load(chunk.as_ptr());
        let abs = t.max(t.mul(minus_one));
        let m = abs.mul(minus_twice).exp2();
        let magnitude = one.add(m.mul(minus_one)).div(one.add(m)).mul(cap);
        let by_exponents = t.select_less(zero, magnitude.mul(minus_one), magnitude);
        let u = t.mul(to_u);
        let u2 = u.mul(u);
        let mut series = series_coeffs[terms - 1];
        for coeff in series_coeffs[..terms - 1].iter().rev() {
            series = V::mul_add(series, u2, *coeff);
        }
        let by_series = V::mul_add(t.mul(u2), series, t);
        u2.select_less(series_bound, by_series, by_exponents)
            .store(chunk.as_mut_ptr());
    }
    for value in chunks.into_remainder() {
        let t = value.to_f64();
        let cap = cap_base2.to_f64();
        *value = V::Elem::from_f64(cap * (t / cap).tanh());
    }
}

/// Below this `|u|`, softcapping uses tanh's series instead of exponentials.
const TANH_SERIES_BOUND: f64 = 0.125;
/// `tanh(u) / u - 1 = u²·Q(u²)`: the coefficients of `Q`, lowest first (tanh's Taylor series,
/// `2^(2n)(2^(2n) - 1)B_2n / (2n)!`). At `|u| < 1/8` the first term left out is below 1e-9
/// relative after three (float32's) and below 1e-19 after all eight (float64's).
const TANH_SERIES: [f64; 8] = [
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155925.0,
    21844.0 / 6081075.0,
    -929569.0 / 638512875.0,
    6404582.0 / 10854718875.0,
];

/// `row[c] += slope · (first_distance ± ramp[c])` (`ramp[c] = c`): ALiBi's bias along one
/// row of keys (distances grow), or across one key's queries (`descending`: they fall).
#[inline(always)]
pub(crate) fn add_linear_bias<T: Element>(
    row: &mut [T],
    slope: T,
    first_distance: i64,
    ramp: &[T],
    descending: bool,
) {
    let first = T::from_f64(first_distance as f64);
    if descending {
        for (value, &step) in row.iter_mut().zip(ramp) {
            *value += slope * (first - step);
        }
    } else {
        for (value, &step) in row.iter_mut().zip(ramp) {
            *value += slope * (first + step);
        }
    }
}
