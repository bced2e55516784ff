//! NEON vectors (4 x f32, 2 x f64) for aarch64, where NEON is part of the baseline: every
//! aarch64 CPU has it, so this level needs no detection.

use std::arch::aarch64::*;

use super::{SimdVec, EXP2_COEFFS};

#[derive(Clone, Copy)]
pub(crate) struct NeonF32(pub(super) float32x4_t);

impl SimdVec for NeonF32 {
    type Elem = f32;
    const LANES: usize = 4;
    // 32 registers: 4 x 4 accumulators, the 4 loaded vectors and a broadcast (25 of 32), as
    // NEON GEMM kernels size theirs.
    const TILE_VECS: usize = 4;
    const TILE_ROWS: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        NeonF32(vdupq_n_f32(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        NeonF32(vld1q_f32(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        vst1q_f32(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        NeonF32(vfmaq_f32(c.0, a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        NeonF32(vmulq_f32(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        NeonF32(vaddq_f32(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        NeonF32(vdivq_f32(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        NeonF32(vmaxq_f32(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        NeonF32(vbslq_f32(vcltq_f32(self.0, bound.0), then.0, otherwise.0))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        vmaxvq_f32(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        vaddvq_f32(self.0)
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // -inf (and anything below the normal range) clamps to 2^-127, which rounds to 0. NEON's
        // fmax returns NaN when either operand is NaN, so a NaN `x` stays NaN to the end (its
        // integer conversion gives 0, and NaN times 2^0 is NaN).
        let x = vmaxq_f32(vdupq_n_f32(-127.0), self.0);
        let whole = vrndnq_f32(x);
        let frac = vsubq_f32(x, whole);
        let mut poly = vdupq_n_f32(EXP2_COEFFS[7]);
        for coeff in EXP2_COEFFS[..7].iter().rev() {
            poly = vfmaq_f32(vdupq_n_f32(*coeff), poly, frac);
        }
        let biased = vaddq_s32(vcvtq_s32_f32(whole), vdupq_n_s32(127));
        let power = vreinterpretq_f32_s32(vshlq_n_s32::<23>(biased));
        NeonF32(vmulq_f32(poly, power))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct NeonF64(float64x2_t);

impl SimdVec for NeonF64 {
    type Elem = f64;
    const LANES: usize = 2;
    const TILE_VECS: usize = 4;
    const TILE_ROWS: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        NeonF64(vdupq_n_f64(x))
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        NeonF64(vld1q_f64(ptr))
    }
    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        vst1q_f64(ptr, self.0)
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        NeonF64(vfmaq_f64(c.0, a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        NeonF64(vmulq_f64(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        NeonF64(vaddq_f64(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn div(self, other: Self) -> Self {
        NeonF64(vdivq_f64(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        NeonF64(vmaxq_f64(self.0, other.0))
    }
    #[inline(always)]
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
        NeonF64(vbslq_f64(vcltq_f64(self.0, bound.0), then.0, otherwise.0))
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        vmaxvq_f64(self.0)
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 {
        vaddvq_f64(self.0)
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // f64 favours accuracy over speed: the library exp2 per lane, as on x86.
        let mut lanes = [0.0f64; 2];
        self.store(lanes.as_mut_ptr());
        Self::load(lanes.map(f64::exp2).as_ptr())
    }
}
