//! AVX-512F vectors (16 x f32, 8 x f64). Only used from code compiled with that feature.

use std::arch::x86_64::*;

use super::{SimdVec, EXP2_COEFFS};

#[derive(Clone, Copy)]
pub(crate) struct Avx512F32(pub(super) __m512);

impl SimdVec for Avx512F32 {
    type Elem = f32;
    const LANES: usize = 16;
    const TILE_VECS: usize = 4;
    const TILE_ROWS: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Avx512F32(_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        Avx512F32(_mm512_loadu_ps(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        _mm512_storeu_ps(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Avx512F32(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        Avx512F32(_mm512_mul_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Avx512F32(_mm512_add_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        Avx512F32(_mm512_div_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Avx512F32(_mm512_max_ps(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        let less = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, bound.0);
        Avx512F32(_mm512_mask_blend_ps(less, otherwise.0, then.0))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        _mm512_reduce_max_ps(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // -inf (and anything below the normal range) clamps to 2^-127, which rounds to 0. vmaxps
        // returns its second operand when either is NaN, so a NaN `x` stays NaN to the end.
        let x = _mm512_max_ps(_mm512_set1_ps(-127.0), self.0);
        let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let frac = _mm512_sub_ps(x, whole);
        let mut poly = _mm512_set1_ps(EXP2_COEFFS[7]);
        for coeff in EXP2_COEFFS[..7].iter().rev() {
            poly = _mm512_fmadd_ps(poly, frac, _mm512_set1_ps(*coeff));
        }
        let biased = _mm512_add_epi32(_mm512_cvtps_epi32(whole), _mm512_set1_epi32(127));
        let power = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased));
        Avx512F32(_mm512_mul_ps(poly, power))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx512F64(__m512d);

impl SimdVec for Avx512F64 {
    type Elem = f64;
    const LANES: usize = 8;
    const TILE_VECS: usize = 4;
    const TILE_ROWS: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        Avx512F64(_mm512_set1_pd(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        Avx512F64(_mm512_loadu_pd(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        _mm512_storeu_pd(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Avx512F64(_mm512_fmadd_pd(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        Avx512F64(_mm512_mul_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        Avx512F64(_mm512_add_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        Avx512F64(_mm512_div_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        Avx512F64(_mm512_max_pd(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        let less = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self.0, bound.0);
        Avx512F64(_mm512_mask_blend_pd(less, otherwise.0, then.0))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        _mm512_reduce_max_pd(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 {
        _mm512_reduce_add_pd(self.0)
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // f64 favours accuracy over speed: the library exp2 per lane.
        let mut lanes = [0.0f64; 8];
        self.store(lanes.as_mut_ptr());
        Self::load(lanes.map(f64::exp2).as_ptr())
    }
}
