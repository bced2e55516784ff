//! attnscope's engine: exact scaled dot-product attention on the CPU.
//!
//! A tiled, online-softmax kernel (never the L x S matrix unless weights are asked for),
//! multithreaded with rayon over (batch, head, query block) and, for few queries, key chunks;
//! SIMD micro-kernels chosen at run time (AVX-512, AVX2+FMA+F16C, NEON, portable). Pure Rust: the Python
//! bindings live in `python/` behind the `python` feature.
//!
//! The modules are floors; each uses only those below it (`make lint` checks it):
//! - `error`, `element`, `bounds` (the causal/window rule), `memory`, `threads`, `limits`:
//!   shared ground;
//! - `simd`: vectors only, one module per instruction set, and the runtime choice of level;
//! - `masks`: mask expressions, evaluated per tile;
//! - `kernel`: everything generic over the SIMD vector: the forward and backward tiles, the
//!   decoding kernel over stored rows in any storage (`kernel::decode`), their micro-kernels,
//!   and their instances per instruction set (`kernel::dispatch`);
//! - `attention`: one call: its vocabulary, shape checks, scheduling (`attention::schedule`,
//!   `attention::decode`), and the forward and backward entry points;
//! - `cache`: the KV cache and its storages; `layer`: the multi-head layer;
//! - `python`: the bindings, the only code that knows Python.

mod attention;
mod bounds;
mod cache;
mod element;
mod error;
mod kernel;
mod layer;
mod limits;
mod masks;
mod memory;
pub mod simd;
mod threads;

#[cfg(feature = "python")]
mod python;

pub use attention::backward::{
    scaled_dot_product_attention_backward, scaled_dot_product_attention_backward_with_mods,
    AttentionGrads, BackwardInputs,
};
pub use attention::{
    attention_over_strided_kv, scaled_dot_product_attention, scaled_dot_product_attention_with_lse,
    scaled_dot_product_attention_with_mods, Attention, AttentionOptions, AttentionWithLse, Mask,
    ScoreMods, StridedKv,
};
pub use bounds::{CausalAlignment, Window};
pub use cache::storage::{Storage, INT8_BLOCK};
pub use cache::{CacheAttendOptions, Eviction, KvCache};
pub use element::Element;
pub use error::AttnError;
pub use kernel::KernelElement as Float;
pub use layer::{multi_head_attention, MhaHeads, MhaInputs, MhaWeights};
pub use limits::{
    set_weights_memory_limit, weights_memory_limit, DEFAULT_WEIGHTS_LIMIT, WEIGHTS_LIMIT_ENV,
};
pub use masks::{MaskExpr, MaskLayout, MaskShape, TileClass};
pub use threads::{num_threads, set_num_threads, MAX_THREADS, NUM_THREADS_ENV};
