//! SIMD vectors behind one small trait, and the runtime choice of instruction set.
//!
//! The attention kernel is written once, generic over [`SimdVec`], and compiled once per
//! instruction set inside a `#[target_feature]` entry point, so every helper inlines into code
//! that may use those instructions. The choice is made at run time, never with
//! `target-cpu=native`, and can be forced (tests use that to cover every path).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::element::Element;
use crate::error::AttnError;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod portable;
pub(crate) mod widen;

/// A register of `LANES` elements. Methods are `unsafe` because a vector type may only be used
/// inside code compiled for its instruction set, and loads/stores read `LANES` elements.
pub(crate) trait SimdVec: Copy {
    type Elem: Element;
    const LANES: usize;
    unsafe fn splat(x: Self::Elem) -> Self;
    unsafe fn load(ptr: *const Self::Elem) -> Self;
    unsafe fn store(self, ptr: *mut Self::Elem);
    /// `a * b + c`, fused where the instruction set has FMA.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    unsafe fn mul(self, other: Self) -> Self;
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn div(self, other: Self) -> Self;
    unsafe fn max(self, other: Self) -> Self;
    /// Per lane, `then` where `self < bound`, else `otherwise` (a NaN lane takes `otherwise`).
    unsafe fn select_less(self, bound: Self, then: Self, otherwise: Self) -> Self;
    unsafe fn reduce_max(self) -> Self::Elem;
    unsafe fn reduce_sum(self) -> Self::Elem;
    /// `2^x` for `x <= 0`; exactly 0 for `-inf` and far below the normal range; NaN for NaN
    /// (a NaN score must reach the output, never turn into a zero weight).
    unsafe fn exp2(self) -> Self;
    /// Vectors of columns in the register tile of the `Q·Kᵀ` and `P·V` micro-kernels.
    const TILE_VECS: usize;
    /// Broadcast rows in that register tile: `TILE_ROWS x TILE_VECS` accumulators, plus the
    /// `TILE_VECS` loaded vectors and one broadcast, fill the register file without spilling.
    const TILE_ROWS: usize;
}

/// Coefficients of `2^f = exp(f·ln 2)` on `[-0.5, 0.5]` (Taylor to degree 7: below 1e-8
/// relative error, well inside f32's precision).
pub(crate) const EXP2_COEFFS: [f32; 8] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
    0.000_015_252_73,
];

/// Instruction sets the kernel is compiled for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    Avx512,
    Avx2,
    /// aarch64's baseline vectors: present on every Arm64 CPU.
    Neon,
    Portable,
}

impl SimdLevel {
    /// Every level, best first (those this CPU lacks included).
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Avx512,
        SimdLevel::Avx2,
        SimdLevel::Neon,
        SimdLevel::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Neon => "neon",
            SimdLevel::Portable => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "avx512" => Some(SimdLevel::Avx512),
            "avx2" => Some(SimdLevel::Avx2),
            "neon" => Some(SimdLevel::Neon),
            "portable" => Some(SimdLevel::Portable),
            _ => None,
        }
    }

    /// The levels this CPU can run, best first.
    pub fn supported() -> Vec<SimdLevel> {
        SimdLevel::ALL
            .into_iter()
            .filter(|level| level.is_supported())
            .collect()
    }

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            // F16C (float16 conversion, which the cache's widening loads use) came before AVX2
            // on Intel and AMD alike, so requiring it excludes no AVX2 CPU.
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            SimdLevel::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    fn best_supported() -> Self {
        [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Neon]
            .into_iter()
            .find(|level| level.is_supported())
            .unwrap_or(SimdLevel::Portable)
    }
}

const LEVEL_UNSET: u8 = u8::MAX;
static FORCED_LEVEL: AtomicU8 = AtomicU8::new(LEVEL_UNSET);

fn encode(level: SimdLevel) -> u8 {
    level as u8
}

fn decode(code: u8) -> Option<SimdLevel> {
    SimdLevel::ALL
        .into_iter()
        .find(|level| encode(*level) == code)
}

/// The level kernels run at: the forced one if set, else the best this CPU supports.
pub fn active_level() -> SimdLevel {
    decode(FORCED_LEVEL.load(Ordering::Relaxed)).unwrap_or_else(SimdLevel::best_supported)
}

/// Forces a level (`None` returns to automatic choice). Refuses a level this CPU lacks.
pub fn force_level(level: Option<SimdLevel>) -> Result<(), AttnError> {
    match level {
        None => FORCED_LEVEL.store(LEVEL_UNSET, Ordering::Relaxed),
        Some(level) if level.is_supported() => FORCED_LEVEL.store(encode(level), Ordering::Relaxed),
        Some(level) => {
            return Err(AttnError::value(
                "level",
                format!("this CPU does not support {}", level.name()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp2` of each input at vector type `V`, one lane at a time.
    fn exp2_lanes<V: SimdVec>(inputs: &[f64]) -> Vec<f64> {
        inputs
            .iter()
            .map(|&x| {
                let lanes = vec![V::Elem::from_f64(x); V::LANES];
                let mut out = lanes.clone();
                // SAFETY: callers pass only vector types this CPU supports; both buffers hold
                // LANES elements.
                unsafe { V::load(lanes.as_ptr()).exp2().store(out.as_mut_ptr()) };
                out[0].to_f64()
            })
            .collect()
    }

    fn check_exp2<V: SimdVec>(name: &str) {
        let inputs = [f64::NAN, f64::NEG_INFINITY, -1e30, -200.0, -3.5, -1.0, 0.0];
        let got = exp2_lanes::<V>(&inputs);
        assert!(
            got[0].is_nan(),
            "{name}: 2^NaN must stay NaN, got {}",
            got[0]
        );
        for (&x, &y) in inputs[1..3].iter().zip(&got[1..3]) {
            assert_eq!(y, 0.0, "{name}: 2^{x}");
        }
        // 2^-200 is below float32's range: 0 there, and tiny but exact in float64.
        for (&x, &y) in inputs[3..].iter().zip(&got[3..]) {
            let error = (y - x.exp2()).abs();
            assert!(error <= 1e-6 * x.exp2() + 1e-38, "{name}: 2^{x} = {y}");
        }
    }

    /// NEON is aarch64's baseline, so it is the level chosen there unless another is forced.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_is_the_best_level_on_aarch64() {
        assert!(SimdLevel::Neon.is_supported());
        assert_eq!(SimdLevel::best_supported(), SimdLevel::Neon);
        assert_eq!(
            SimdLevel::supported(),
            [SimdLevel::Neon, SimdLevel::Portable]
        );
    }

    #[test]
    fn exp2_keeps_nan_and_sends_minus_infinity_to_zero_at_every_level() {
        check_exp2::<portable::PortableF32>("portable f32");
        check_exp2::<portable::PortableF64>("portable f64");
        #[cfg(target_arch = "aarch64")]
        {
            check_exp2::<neon::NeonF32>("neon f32");
            check_exp2::<neon::NeonF64>("neon f64");
        }
        #[cfg(target_arch = "x86_64")]
        {
            if SimdLevel::Avx2.is_supported() {
                check_exp2::<avx2::Avx2F32>("avx2 f32");
                check_exp2::<avx2::Avx2F64>("avx2 f64");
            }
            if SimdLevel::Avx512.is_supported() {
                check_exp2::<avx512::Avx512F32>("avx512 f32");
                check_exp2::<avx512::Avx512F64>("avx512 f64");
            }
        }
    }
}
