//! Plain-Rust vectors: the fallback for any CPU. Fixed-size arrays let the compiler use
//! whatever baseline SIMD the target has (SSE2 on x86_64, NEON on aarch64).

use super::{SimdVec, EXP2_COEFFS};

/// `2^x` for f32 by the same range reduction and polynomial as the SIMD paths.
#[inline(always)]
pub(crate) fn exp2_f32(x: f32) -> f32 {
    // -inf (and anything below the normal range) clamps to 2^-127, which rounds to 0. A NaN fails
    // the comparison and stays NaN to the end (f32::max would turn it into -127).
    let x = if x < -127.0 { -127.0 } else { x };
    let whole = x.round();
    let frac = x - whole;
    let mut poly = EXP2_COEFFS[7];
    for coeff in EXP2_COEFFS[..7].iter().rev() {
        poly = poly * frac + coeff;
    }
    let bits = ((whole as i32 + 127) as u32) << 23;
    poly * f32::from_bits(bits)
}

macro_rules! portable_vector {
    ($name:ident, $t:ty, $lanes:expr, $exp2:expr) => {
        #[derive(Clone, Copy)]
        pub(crate) struct $name([$t; $lanes]);

        impl SimdVec for $name {
            type Elem = $t;
            const LANES: usize = $lanes;
            const TILE_VECS: usize = 2;
            const TILE_ROWS: usize = 4;

            #[inline(always)]
            unsafe fn splat(x: $t) -> Self {
                $name([x; $lanes])
            }
            #[inline(always)]
            unsafe fn load(ptr: *const $t) -> Self {
                $name(std::ptr::read_unaligned(ptr as *const [$t; $lanes]))
            }
            #[inline(always)]
            unsafe fn store(self, ptr: *mut $t) {
                std::ptr::write_unaligned(ptr as *mut [$t; $lanes], self.0)
            }
            #[inline(always)]
            unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
                let mut out = c.0;
                for lane in 0..$lanes {
                    out[lane] += a.0[lane] * b.0[lane];
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn mul(self, other: Self) -> Self {
                let mut out = self.0;
                for lane in 0..$lanes {
                    out[lane] *= other.0[lane];
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn add(self, other: Self) -> Self {
                let mut out = self.0;
                for lane in 0..$lanes {
                    out[lane] += other.0[lane];
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn div(self, other: Self) -> Self {
                let mut out = self.0;
                for lane in 0..$lanes {
                    out[lane] /= other.0[lane];
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn max(self, other: Self) -> Self {
                let mut out = self.0;
                for lane in 0..$lanes {
                    out[lane] = out[lane].max(other.0[lane]);
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self {
                let mut out = otherwise.0;
                for lane in 0..$lanes {
                    if self.0[lane] < bound.0[lane] {
                        out[lane] = then.0[lane];
                    }
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn reduce_max(self) -> $t {
                self.0.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max)
            }
            #[inline(always)]
            unsafe fn reduce_sum(self) -> $t {
                self.0.iter().copied().sum()
            }
            #[inline(always)]
            unsafe fn exp2(self) -> Self {
                let exp2: fn($t) -> $t = $exp2;
                $name(self.0.map(exp2))
            }
        }
    };
}

portable_vector!(PortableF32, f32, 8, exp2_f32);
portable_vector!(PortableF64, f64, 4, f64::exp2);
