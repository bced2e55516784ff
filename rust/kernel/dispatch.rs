//! Runtime dispatch: the generic kernels compiled once per element type and instruction set,
//! each instance inside a `#[target_feature]` function, and the call that picks one by
//! [`SimdLevel`].

use std::ops::Range;

use crate::element::Element;
use crate::kernel::backward::{
    key_block_grads, query_block_grads, GradHead, GradParams, GradScratch, KeyBlockGrads,
};
use crate::kernel::{flash_block, weights_block, HeadData, KernelParams, Scratch};
use crate::simd::SimdLevel;

/// The element types the kernel is compiled for, each at every instruction set.
pub trait KernelElement: Element {
    fn flash(
        level: SimdLevel,
        params: &KernelParams<Self>,
        head: &HeadData<'_, Self>,
        rows: Range<usize>,
        keys: Range<usize>,
        scratch: &mut Scratch<Self>,
    );
    #[expect(
        clippy::too_many_arguments,
        reason = "the kernel's inputs and its three outputs, one by one"
    )]
    fn weights(
        level: SimdLevel,
        params: &KernelParams<Self>,
        head: &HeadData<'_, Self>,
        rows: Range<usize>,
        weights: &mut [Self],
        out: &mut [Self],
        lse: &mut [Self],
        scratch: &mut Scratch<Self>,
    );
    /// The backward pass's `dK` and `dV` of one kv head's keys (see `backward`).
    fn key_block_grads(
        level: SimdLevel,
        params: &GradParams<Self>,
        heads: &[GradHead<'_, Self>],
        keys: Range<usize>,
        num_queries: usize,
        out: KeyBlockGrads<'_, Self>,
        scratch: &mut GradScratch<Self>,
    );
    /// The backward pass's `dQ` of one head's query rows (see `backward`).
    fn query_block_grads(
        level: SimdLevel,
        params: &GradParams<Self>,
        head: &GradHead<'_, Self>,
        rows: Range<usize>,
        grad_query: &mut [Self],
        scratch: &mut GradScratch<Self>,
    );
}

/// Calls `$kernel::<V>(args)` (or `$kernel::<V, G...>(args)` for a kernel with more generic
/// parameters) with `V` the vector type of `$level`, each instruction set's instance compiled
/// inside a `#[target_feature]` function so the generic code inlines into code that may use
/// those instructions.
macro_rules! at_level {
    ($level:expr, $portable:ty, $avx2:ty, $avx512:ty, $neon:ty,
     $kernel:ident $(<$($generic:ident: $bound:path),+>)? ($($arg:ident: $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512 $(<$($generic: $bound),+>)? ($($arg: $ty),*) {
                $kernel::<$avx512 $($(, $generic)+)?>($($arg),*)
            }
            // F16C (float16 conversion) is part of the AVX2 level: every CPU with AVX2 has it.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2 $(<$($generic: $bound),+>)? ($($arg: $ty),*) {
                $kernel::<$avx2 $($(, $generic)+)?>($($arg),*)
            }
            // SAFETY: `level` comes from `simd::active_level`, which only returns levels this
            // CPU supports.
            match $level {
                SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                _ => {}
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            #[target_feature(enable = "neon")]
            unsafe fn neon $(<$($generic: $bound),+>)? ($($arg: $ty),*) {
                $kernel::<$neon $($(, $generic)+)?>($($arg),*)
            }
            if $level == SimdLevel::Neon {
                // SAFETY: NEON is part of every aarch64 CPU.
                return unsafe { neon($($arg),*) };
            }
        }
        let _ = $level;
        // SAFETY: portable vectors need no CPU feature.
        unsafe { $kernel::<$portable $($(, $generic)+)?>($($arg),*) }
    }};
}
pub(crate) use at_level;

/// Functions `$name(level, args)` that run `$kernel(args)` at `level` (see [`at_level`]), one
/// per `;`-separated item; attributes and doc comments go before the name.
macro_rules! dispatched {
    ($portable:ty, $avx2:ty, $avx512:ty, $neon:ty;
     $($(#[$attr:meta])* $vis:vis $name:ident $(<$($generic:ident: $bound:path),+>)?
       => $kernel:ident($($arg:ident: $ty:ty),* $(,)?));+ $(;)?) => {$(
        $(#[$attr])*
        $vis fn $name $(<$($generic: $bound),+>)? (level: SimdLevel, $($arg: $ty),*) {
            $crate::kernel::dispatch::at_level!(
                level, $portable, $avx2, $avx512, $neon,
                $kernel $(<$($generic: $bound),+>)? ($($arg: $ty),*)
            )
        }
    )+};
}
pub(crate) use dispatched;

/// Compiles the generic kernels for one element type at each instruction set.
macro_rules! kernel_element {
    ($t:ty, $portable:ty, $avx2:ty, $avx512:ty, $neon:ty) => {
        impl KernelElement for $t {
            dispatched!(
                $portable, $avx2, $avx512, $neon;
                flash => flash_block(
                    params: &KernelParams<$t>, head: &HeadData<'_, $t>,
                    rows: Range<usize>, keys: Range<usize>, scratch: &mut Scratch<$t>,
                );
                weights => weights_block(
                    params: &KernelParams<$t>, head: &HeadData<'_, $t>, rows: Range<usize>,
                    weights: &mut [$t], out: &mut [$t], lse: &mut [$t], scratch: &mut Scratch<$t>,
                );
                key_block_grads => key_block_grads(
                    params: &GradParams<$t>, heads: &[GradHead<'_, $t>], keys: Range<usize>,
                    num_queries: usize, out: KeyBlockGrads<'_, $t>, scratch: &mut GradScratch<$t>,
                );
                query_block_grads => query_block_grads(
                    params: &GradParams<$t>, head: &GradHead<'_, $t>, rows: Range<usize>,
                    grad_query: &mut [$t], scratch: &mut GradScratch<$t>,
                );
            );
        }
    };
}

// Each architecture's vector types are named only inside the macro's branches for that
// architecture, so the others never need them.
#[cfg(target_arch = "x86_64")]
use crate::simd::avx2::{Avx2F32, Avx2F64};
#[cfg(target_arch = "x86_64")]
use crate::simd::avx512::{Avx512F32, Avx512F64};
#[cfg(target_arch = "aarch64")]
use crate::simd::neon::{NeonF32, NeonF64};
use crate::simd::portable::{PortableF32, PortableF64};

kernel_element!(f32, PortableF32, Avx2F32, Avx512F32, NeonF32);
kernel_element!(f64, PortableF64, Avx2F64, Avx512F64, NeonF64);
