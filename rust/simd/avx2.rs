//! AVX2 + FMA vectors (8 x f32, 4 x f64). Only used from code compiled with those features.

use std::arch::x86_64::*;

use super::{SimdVec, EXP2_COEFFS};

#[derive(Clone, Copy)]
pub(crate) struct Avx2F32(pub(super) __m256);

impl SimdVec for Avx2F32 {
    type Elem = f32;
    const LANES: usize = 8;
    const TILE_VECS: usize = 2;
    // 12 accumulators: enough independent FMA chains to cover the FMA latency on two ports.
    const TILE_ROWS: usize = 6;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Avx2F32(_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Avx2F32(_mm256_loadu_ps(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        _mm256_storeu_ps(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Avx2F32(_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        Avx2F32(_mm256_mul_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Avx2F32(_mm256_add_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        Avx2F32(_mm256_div_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Avx2F32(_mm256_max_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        let less = _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, bound.0);
        Avx2F32(_mm256_blendv_ps(otherwise.0, then.0, less))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        let halves = _mm_max_ps(
            _mm256_castps256_ps128(self.0),
            _mm256_extractf128_ps(self.0, 1),
        );
        let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
        let single = _mm_max_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        _mm_cvtss_f32(single)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        let halves = _mm_add_ps(
            _mm256_castps256_ps128(self.0),
            _mm256_extractf128_ps(self.0, 1),
        );
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        let single = _mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1));
        _mm_cvtss_f32(single)
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // -inf (and anything below the normal range) clamps to 2^-127, which rounds to 0. maxps
        // returns its second operand when either is NaN, so a NaN `x` stays NaN to the end.
        let x = _mm256_max_ps(_mm256_set1_ps(-127.0), self.0);
        let whole = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let frac = _mm256_sub_ps(x, whole);
        let mut poly = _mm256_set1_ps(EXP2_COEFFS[7]);
        for coeff in EXP2_COEFFS[..7].iter().rev() {
            poly = _mm256_fmadd_ps(poly, frac, _mm256_set1_ps(*coeff));
        }
        let biased = _mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127));
        let power = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
        Avx2F32(_mm256_mul_ps(poly, power))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx2F64(__m256d);

impl SimdVec for Avx2F64 {
    type Elem = f64;
    const LANES: usize = 4;
    const TILE_VECS: usize = 2;
    // 12 accumulators: enough independent FMA chains to cover the FMA latency on two ports.
    const TILE_ROWS: usize = 6;

    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        Avx2F64(_mm256_set1_pd(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        Avx2F64(_mm256_loadu_pd(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        _mm256_storeu_pd(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Avx2F64(_mm256_fmadd_pd(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        Avx2F64(_mm256_mul_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Avx2F64(_mm256_add_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        Avx2F64(_mm256_div_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Avx2F64(_mm256_max_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        let less = _mm256_cmp_pd::<_CMP_LT_OQ>(self.0, bound.0);
        Avx2F64(_mm256_blendv_pd(otherwise.0, then.0, less))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        let mut lanes = [0.0f64; 4];
        self.store(lanes.as_mut_ptr());
        lanes.into_iter().fold(f64::NEG_INFINITY, f64::max)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 {
        let mut lanes = [0.0f64; 4];
        self.store(lanes.as_mut_ptr());
        lanes.into_iter().sum()
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // f64 favours accuracy over speed: the library exp2 per lane.
        let mut lanes = [0.0f64; 4];
        self.store(lanes.as_mut_ptr());
        Self::load(lanes.map(f64::exp2).as_ptr())
    }
}
