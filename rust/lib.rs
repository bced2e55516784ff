//! attnscope's engine: exact scaled dot-product attention on the CPU.
//!
//! A tiled, online-softmax kernel (never the L x S matrix unless weights are asked for),
//! multithreaded with rayon over (batch, head, query block) and, for few queries, key chunks;
//! SIMD micro-kernels chosen at run time (AVX-512, AVX2+FMA, portable). Pure Rust: the Python
//! bindings live in `python.rs` behind the `python` feature.
//!
//! Read top-down: `attention` (entry points) checks a call with `shapes`, hands it to
//! `schedule` (tasks and strategies), which runs `kernel` (one block of queries, built on
//! `microkernel`) through `simd::dispatch` (one instance per instruction set); `backward`
//! computes the gradients with the same tiles and schedule. `mha`,
//! `projection` and `kv_cache` build the layer on top; `memory`, `threads`, `bounds`, `error`
//! and `element` are the shared pieces.

mod attention;
mod backward;
mod bounds;
mod element;
mod error;
mod kernel;
mod kv_attend;
mod kv_cache;
mod kv_storage;
mod masks;
mod memory;
mod mha;
mod microkernel;
mod projection;
mod schedule;
mod shapes;
pub mod simd;
mod threads;

#[cfg(feature = "python")]
mod python;

pub use attention::{
    attention_over_strided_kv, scaled_dot_product_attention, scaled_dot_product_attention_with_lse,
    scaled_dot_product_attention_with_mods, Attention, AttentionOptions, AttentionWithLse, Mask,
    ScoreMods, StridedKv,
};
pub use backward::{
    scaled_dot_product_attention_backward, scaled_dot_product_attention_backward_with_mods,
    AttentionGrads, BackwardInputs,
};
pub use bounds::{CausalAlignment, Window};
pub use element::Element;
pub use error::AttnError;
pub use kv_cache::{CacheAttendOptions, Eviction, KvCache};
pub use kv_storage::{Storage, INT8_BLOCK};
pub use masks::{MaskExpr, MaskLayout, MaskShape, TileClass};
pub use mha::{multi_head_attention, MhaHeads, MhaInputs, MhaWeights};
pub use shapes::{
    set_weights_memory_limit, weights_memory_limit, DEFAULT_WEIGHTS_LIMIT, WEIGHTS_LIMIT_ENV,
};
pub use simd::KernelElement as Float;
pub use threads::{num_threads, set_num_threads, MAX_THREADS, NUM_THREADS_ENV};

#[cfg(test)]
mod attention_tests;
#[cfg(test)]
mod backward_tests;
#[cfg(test)]
mod nonfinite_tests;
