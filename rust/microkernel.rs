//! Register-tiled micro-kernels for the two products of attention, generic over [`SimdVec`].
//!
//! `scores_tile`: S = Q·Kᵀ for a tile of query rows against keys packed transposed (`Kᵀ` is
//! `D x keys`, so one vector load covers `LANES` keys and each query element is broadcast).
//! `accumulate_pv`: acc += P·V with V read in place (rows of `Dv` contiguous).
//! All functions are `unsafe`: callers guarantee the pointer extents documented on each and run
//! them only inside code compiled for `V`'s instruction set.

use crate::element::Element;
use crate::simd::SimdVec;

/// Query rows per register tile (the same for every instruction set).
pub(crate) const TILE_ROWS: usize = 4;

/// `scores[r][c] = Σ_k q[r][k] · kt[k][c]` for `TILE_ROWS` rows and `V::TILE_VECS` vectors of
/// columns. Reads `q[r * q_stride + k]` for `k < depth` and `kt[k * kt_stride + c]`.
#[inline(always)]
unsafe fn scores_tile<V: SimdVec, const COLS: usize>(
    q: *const V::Elem,
    q_stride: usize,
    kt: *const V::Elem,
    kt_stride: usize,
    depth: usize,
    scores: *mut V::Elem,
    scores_stride: usize,
) {
    let zero = V::splat(V::Elem::ZERO);
    let mut acc = [[zero; COLS]; TILE_ROWS];
    for k in 0..depth {
        let mut keys = [zero; COLS];
        for (col, key) in keys.iter_mut().enumerate() {
            *key = V::load(kt.add(k * kt_stride + col * V::LANES));
        }
        for (row, acc_row) in acc.iter_mut().enumerate() {
            let query = V::splat(*q.add(row * q_stride + k));
            for col in 0..COLS {
                acc_row[col] = V::mul_add(query, keys[col], acc_row[col]);
            }
        }
    }
    for (row, acc_row) in acc.iter().enumerate() {
        for (col, value) in acc_row.iter().enumerate() {
            value.store(scores.add(row * scores_stride + col * V::LANES));
        }
    }
}

/// Scores for `rows` (a multiple of `TILE_ROWS`) x `cols` (a multiple of
/// `V::TILE_VECS * V::LANES`) from packed, zero-padded `q` (`rows x depth`) and `kt`
/// (`depth x cols`). Writes `scores[r * cols + c]`.
#[inline(always)]
pub(crate) unsafe fn scores_block<V: SimdVec>(
    q: &[V::Elem],
    kt: &[V::Elem],
    depth: usize,
    rows: usize,
    cols: usize,
    scores: &mut [V::Elem],
) {
    debug_assert!(rows % TILE_ROWS == 0 && cols % (V::TILE_VECS * V::LANES) == 0);
    debug_assert!(q.len() >= rows * depth && kt.len() >= depth * cols);
    debug_assert!(scores.len() >= rows * cols);
    let tile_cols = V::TILE_VECS * V::LANES;
    for row in (0..rows).step_by(TILE_ROWS) {
        for col in (0..cols).step_by(tile_cols) {
            let q_tile = q.as_ptr().add(row * depth);
            let kt_tile = kt.as_ptr().add(col);
            let out = scores.as_mut_ptr().add(row * cols + col);
            if V::TILE_VECS == 4 {
                scores_tile::<V, 4>(q_tile, depth, kt_tile, cols, depth, out, cols);
            } else {
                scores_tile::<V, 2>(q_tile, depth, kt_tile, cols, depth, out, cols);
            }
        }
    }
}

/// `acc[r][c] += Σ_j p[r][j] · v[j][c]` for `ROWS` rows and `COLS` vectors of columns.
#[inline(always)]
unsafe fn pv_tile<V: SimdVec, const ROWS: usize, const COLS: usize>(
    p: *const V::Elem,
    p_stride: usize,
    num_keys: usize,
    v: *const V::Elem,
    v_stride: usize,
    acc: *mut V::Elem,
    acc_stride: usize,
) {
    let zero = V::splat(V::Elem::ZERO);
    let mut sums = [[zero; COLS]; ROWS];
    for (row, sums_row) in sums.iter_mut().enumerate() {
        for (col, sum) in sums_row.iter_mut().enumerate() {
            *sum = V::load(acc.add(row * acc_stride + col * V::LANES));
        }
    }
    for key in 0..num_keys {
        let mut values = [zero; COLS];
        for (col, value) in values.iter_mut().enumerate() {
            *value = V::load(v.add(key * v_stride + col * V::LANES));
        }
        for (row, sums_row) in sums.iter_mut().enumerate() {
            let weight = V::splat(*p.add(row * p_stride + key));
            for col in 0..COLS {
                sums_row[col] = V::mul_add(weight, values[col], sums_row[col]);
            }
        }
    }
    for (row, sums_row) in sums.iter().enumerate() {
        for (col, sum) in sums_row.iter().enumerate() {
            sum.store(acc.add(row * acc_stride + col * V::LANES));
        }
    }
}

/// `acc[r][c] += Σ_j p[r][j] · v[j][c]` over `rows` rows of `p` (stride `p_stride`), `num_keys`
/// keys and `dv` columns; `v` rows have stride `dv`, `acc` rows stride `dv`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<V: SimdVec, const ROWS: usize>(
    p: *const V::Elem,
    p_stride: usize,
    num_keys: usize,
    v: *const V::Elem,
    dv: usize,
    acc: *mut V::Elem,
) {
    let wide = V::TILE_VECS * V::LANES;
    let mut col = 0;
    while col + wide <= dv {
        if V::TILE_VECS == 4 {
            pv_tile::<V, ROWS, 4>(p, p_stride, num_keys, v.add(col), dv, acc.add(col), dv);
        } else {
            pv_tile::<V, ROWS, 2>(p, p_stride, num_keys, v.add(col), dv, acc.add(col), dv);
        }
        col += wide;
    }
    while col + V::LANES <= dv {
        pv_tile::<V, ROWS, 1>(p, p_stride, num_keys, v.add(col), dv, acc.add(col), dv);
        col += V::LANES;
    }
    if col < dv {
        for row in 0..ROWS {
            for key in 0..num_keys {
                let weight = *p.add(row * p_stride + key);
                for c in col..dv {
                    *acc.add(row * dv + c) += weight * *v.add(key * dv + c);
                }
            }
        }
    }
}

/// `acc += P·V` for `rows` rows: `p` is `rows x num_keys` with row stride `p_stride`, `v` is
/// `num_keys x dv`, `acc` is `rows x dv`.
///
/// With `skip_zero_weights`, keys of weight exactly zero are skipped instead of multiplied, so
/// a NaN or inf value at a hidden key cannot reach the sum (0 · NaN is NaN); that path is
/// scalar and used only for blocks that both hide keys and hold non-finite values.
#[inline(always)]
pub(crate) unsafe fn accumulate_pv<V: SimdVec>(
    p: &[V::Elem],
    p_stride: usize,
    rows: usize,
    num_keys: usize,
    v: &[V::Elem],
    dv: usize,
    acc: &mut [V::Elem],
    skip_zero_weights: bool,
) {
    if rows == 0 || num_keys == 0 || dv == 0 {
        return;
    }
    debug_assert!(p.len() >= (rows - 1) * p_stride + num_keys);
    debug_assert!(v.len() >= num_keys * dv && acc.len() >= rows * dv);
    if skip_zero_weights {
        for row in 0..rows {
            let acc_row = &mut acc[row * dv..(row + 1) * dv];
            for key in 0..num_keys {
                let weight = p[row * p_stride + key];
                if weight != V::Elem::ZERO {
                    for (sum, value) in acc_row.iter_mut().zip(&v[key * dv..(key + 1) * dv]) {
                        *sum += weight * *value;
                    }
                }
            }
        }
        return;
    }
    let mut row = 0;
    while row + TILE_ROWS <= rows {
        pv_rows::<V, TILE_ROWS>(
            p.as_ptr().add(row * p_stride),
            p_stride,
            num_keys,
            v.as_ptr(),
            dv,
            acc.as_mut_ptr().add(row * dv),
        );
        row += TILE_ROWS;
    }
    while row < rows {
        pv_rows::<V, 1>(
            p.as_ptr().add(row * p_stride),
            p_stride,
            num_keys,
            v.as_ptr(),
            dv,
            acc.as_mut_ptr().add(row * dv),
        );
        row += 1;
    }
}

/// Largest element of `row` (length a multiple of `V::LANES`).
#[inline(always)]
pub(crate) unsafe fn row_max<V: SimdVec>(row: &[V::Elem]) -> V::Elem {
    debug_assert!(row.len() % V::LANES == 0);
    let mut best = V::splat(V::Elem::NEG_INFINITY);
    for chunk in row.chunks_exact(V::LANES) {
        best = best.max(V::load(chunk.as_ptr()));
    }
    best.reduce_max()
}

/// `row[c] = 2^(row[c] - max)` in place, returning the sum (length a multiple of `V::LANES`).
#[inline(always)]
pub(crate) unsafe fn exp2_shifted<V: SimdVec>(row: &mut [V::Elem], max: V::Elem) -> V::Elem {
    debug_assert!(row.len() % V::LANES == 0);
    let shift = V::splat(max * V::Elem::from_f64(-1.0));
    let mut total = V::splat(V::Elem::ZERO);
    for chunk in row.chunks_exact_mut(V::LANES) {
        let weights = V::load(chunk.as_ptr()).add(shift).exp2();
        weights.store(chunk.as_mut_ptr());
        total = total.add(weights);
    }
    total.reduce_sum()
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
