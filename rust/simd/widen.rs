//! Loads that widen compressed cache values to f32 vectors: bfloat16 (a shift), float16 (F16C's
//! `vcvtph2ps` on x86, bit arithmetic on NEON) and int8 (sign-extend and convert). The
//! compressed-cache kernel reads its rows through these, so no decompressed copy of a row is
//! ever written.

use half::{bf16, f16};

use super::portable::PortableF32;
use super::SimdVec;

/// An f32 vector that can be loaded from `LANES` compressed values.
pub(crate) trait Widen: SimdVec<Elem = f32> {
    /// # Safety
    /// `ptr` must point at `LANES` readable values, in code compiled for this vector's features.
    unsafe fn load_bf16(ptr: *const bf16) -> Self;
    /// # Safety
    /// As [`Widen::load_bf16`].
    unsafe fn load_f16(ptr: *const f16) -> Self;
    /// # Safety
    /// As [`Widen::load_bf16`].
    unsafe fn load_i8(ptr: *const i8) -> Self;
}

/// `LANES` values read one by one and converted: the portable path.
unsafe fn lanes_from<U: Copy, const N: usize>(ptr: *const U, widen: impl Fn(U) -> f32) -> [f32; N] {
    let mut lanes = [0.0f32; N];
    for (i, lane) in lanes.iter_mut().enumerate() {
        *lane = widen(ptr.add(i).read_unaligned());
    }
    lanes
}

impl Widen for PortableF32 {
    #[inline(always)]
    unsafe fn load_bf16(ptr: *const bf16) -> Self {
        let lanes: [f32; 8] = lanes_from(ptr, bf16::to_f32);
        Self::load(lanes.as_ptr())
    }
    #[inline(always)]
    unsafe fn load_f16(ptr: *const f16) -> Self {
        let lanes: [f32; 8] = lanes_from(ptr, f16::to_f32);
        Self::load(lanes.as_ptr())
    }
    #[inline(always)]
    unsafe fn load_i8(ptr: *const i8) -> Self {
        let lanes: [f32; 8] = lanes_from(ptr, f32::from);
        Self::load(lanes.as_ptr())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::Widen;
    use crate::simd::avx2::Avx2F32;
    use crate::simd::avx512::Avx512F32;

    // The AVX2 loads are used only from functions compiled with `avx2,fma,f16c`.
    impl Widen for Avx2F32 {
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const bf16) -> Self {
            let halves = _mm_loadu_si128(ptr as *const __m128i);
            let words = _mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16);
            Avx2F32(_mm256_castsi256_ps(words))
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const f16) -> Self {
            Avx2F32(_mm256_cvtph_ps(_mm_loadu_si128(ptr as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn load_i8(ptr: *const i8) -> Self {
            let bytes = _mm_loadl_epi64(ptr as *const __m128i);
            Avx2F32(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)))
        }
    }

    impl Widen for Avx512F32 {
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const bf16) -> Self {
            let halves = _mm256_loadu_si256(ptr as *const __m256i);
            let words = _mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16);
            Avx512F32(_mm512_castsi512_ps(words))
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const f16) -> Self {
            Avx512F32(_mm512_cvtph_ps(_mm256_loadu_si256(ptr as *const __m256i)))
        }
        #[inline(always)]
        unsafe fn load_i8(ptr: *const i8) -> Self {
            let bytes = _mm_loadu_si128(ptr as *const __m128i);
            Avx512F32(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)))
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use half::{bf16, f16};

    use super::Widen;
    use crate::simd::neon::NeonF32;

    // Each load reads exactly LANES (4) values: a row's last vector may end the buffer.
    impl Widen for NeonF32 {
        #[inline(always)]
        unsafe fn load_bf16(ptr: *const bf16) -> Self {
            let words = vshlq_n_u32::<16>(vmovl_u16(vld1_u16(ptr as *const u16)));
            NeonF32(vreinterpretq_f32_u32(words))
        }
        #[inline(always)]
        unsafe fn load_f16(ptr: *const f16) -> Self {
            // By bits, with baseline instructions only: the magnitude moves into f32's fields
            // and a multiply by 2^112 rebiases the exponent (exact, and it turns float16's
            // subnormals into f32 normals); infinities and NaNs keep an all-ones exponent.
            let halves = vmovl_u16(vld1_u16(ptr as *const u16));
            let sign = vshlq_n_u32::<16>(vandq_u32(halves, vdupq_n_u32(0x8000)));
            let magnitude = vshlq_n_u32::<13>(vandq_u32(halves, vdupq_n_u32(0x7fff)));
            let rebiased = vmulq_f32(
                vreinterpretq_f32_u32(magnitude),
                vreinterpretq_f32_u32(vdupq_n_u32(0x7780_0000)),
            );
            let not_finite = vcgeq_u32(magnitude, vdupq_n_u32(0x7c00 << 13));
            let special = vorrq_u32(magnitude, vdupq_n_u32(0x7f80_0000));
            let bits = vbslq_u32(not_finite, special, vreinterpretq_u32_f32(rebiased));
            NeonF32(vreinterpretq_f32_u32(vorrq_u32(bits, sign)))
        }
        #[inline(always)]
        unsafe fn load_i8(ptr: *const i8) -> Self {
            let four = vreinterpret_s8_u32(vdup_n_u32((ptr as *const u32).read_unaligned()));
            let wide = vmovl_s16(vget_low_s16(vmovl_s8(four)));
            NeonF32(vcvtq_f32_s32(wide))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widened<V: Widen>(load: impl Fn(usize) -> V) -> Vec<f32> {
        let mut out = vec![0.0f32; V::LANES];
        // SAFETY: callers pass only vector types this CPU supports.
        unsafe { load(0).store(out.as_mut_ptr()) };
        out
    }

    fn check<V: Widen>(name: &str) {
        let values: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.731).collect();
        let brain: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
        let half: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
        let bytes: Vec<i8> = (0..16).map(|i| (i * 17 - 128) as i8).collect();
        // SAFETY: each buffer holds 16 >= LANES values.
        let got_bf16 = widened(|_| unsafe { V::load_bf16(brain.as_ptr()) });
        let got_f16 = widened(|_| unsafe { V::load_f16(half.as_ptr()) });
        let got_i8 = widened(|_| unsafe { V::load_i8(bytes.as_ptr()) });
        for lane in 0..V::LANES {
            assert_eq!(got_bf16[lane], brain[lane].to_f32(), "{name} bf16 {lane}");
            assert_eq!(got_f16[lane], half[lane].to_f32(), "{name} f16 {lane}");
            assert_eq!(got_i8[lane], f32::from(bytes[lane]), "{name} i8 {lane}");
        }
    }

    /// Every float16 bit pattern (subnormals, infinities and NaNs included) widens to the
    /// value `half` gives it, at vector type `V`.
    fn check_every_f16<V: Widen>(name: &str) {
        let patterns: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut out = vec![0.0f32; V::LANES];
        for (start, chunk) in patterns.chunks_exact(V::LANES).enumerate() {
            // SAFETY: the chunk holds LANES values; callers pass only supported vector types.
            unsafe { V::load_f16(chunk.as_ptr()).store(out.as_mut_ptr()) };
            for (lane, (&half, &got)) in chunk.iter().zip(&out).enumerate() {
                let want = half.to_f32();
                let same = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
                assert!(
                    same,
                    "{name}: f16 {:#06x} gave {got}, not {want}",
                    start * V::LANES + lane
                );
            }
        }
    }

    #[test]
    fn every_level_widens_exactly() {
        check::<PortableF32>("portable");
        check_every_f16::<PortableF32>("portable");
        #[cfg(target_arch = "aarch64")]
        {
            use crate::simd::neon::NeonF32;
            // SAFETY: NEON is part of every aarch64 CPU.
            check::<NeonF32>("neon");
            check_every_f16::<NeonF32>("neon");
        }
        #[cfg(target_arch = "x86_64")]
        {
            use crate::simd::{avx2::Avx2F32, avx512::Avx512F32};
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2() {
                check::<Avx2F32>("avx2");
                check_every_f16::<Avx2F32>("avx2");
            }
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512() {
                check::<Avx512F32>("avx512");
                check_every_f16::<Avx512F32>("avx512");
            }
            if crate::simd::SimdLevel::Avx2.is_supported() {
                // SAFETY: the features were just detected.
                unsafe { avx2() };
            }
            if crate::simd::SimdLevel::Avx512.is_supported() {
                // SAFETY: as above.
                unsafe { avx512() };
            }
        }
    }
}
