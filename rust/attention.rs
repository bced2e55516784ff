//! `scaled_dot_product_attention`: checks the arguments, splits the work into tasks over
//! (batch, head, query block[, key chunk]) and runs them on the engine's thread pool.
//!
//! Every task computes the same numbers whichever thread runs it and however many threads
//! there are: key chunks are fixed by the shape alone and merged in a fixed order, so results
//! are bitwise identical for any thread count.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArrayD, ArrayViewD, Axis, CowArray, IxDyn, Slice};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::bounds::{Bounds, CausalAlignment, Window};
use crate::element::Element;
use crate::error::{shape_str, AttnError};
use crate::kernel::{
    score_scale, HeadData, KernelElement, KernelParams, MaskRows, Scratch, SoftmaxState, KEY_BLOCK,
    QUERY_BLOCK,
};
use crate::memory::{standard_layout, strided_elements, zeroed};
use crate::simd::{active_level, SimdLevel};
use crate::threads::pool_for;

/// Options of one attention call; the defaults are PyTorch's.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOptions {
    pub is_causal: bool,
    pub alignment: CausalAlignment,
    pub window: Option<Window>,
    /// Multiplies `Q·Kᵀ`; `None` means `1 / sqrt(D)`.
    pub scale: Option<f64>,
    pub enable_gqa: bool,
    pub return_weights: bool,
    /// Worker threads for this call; `None` uses the engine-wide count.
    pub num_threads: Option<usize>,
}

/// An attention mask broadcastable to `(..., Hq, L, S)`.
pub enum Mask<'a, T> {
    None,
    /// True = the key takes part.
    Bool(ArrayViewD<'a, bool>),
    /// Added to the scaled scores; `-inf` hides the key.
    Additive(ArrayViewD<'a, T>),
}

impl<T> Mask<'_, T> {
    /// The mask's shape (`None` without a mask).
    pub fn shape(&self) -> Option<&[usize]> {
        match self {
            Mask::None => None,
            Mask::Bool(view) => Some(view.shape()),
            Mask::Additive(view) => Some(view.shape()),
        }
    }
}

/// The output `(..., Hq, L, Dv)` and, when asked for, the weights `(..., Hq, L, S)`.
pub struct Attention<T> {
    pub output: ArrayD<T>,
    pub weights: Option<ArrayD<T>>,
}

/// The environment variable read for the initial weights memory limit, in bytes.
pub const WEIGHTS_LIMIT_ENV: &str = "ATTNSCOPE_WEIGHTS_LIMIT_BYTES";
/// The weights memory limit when neither the variable nor `set_weights_memory_limit` sets one.
pub const DEFAULT_WEIGHTS_LIMIT: u64 = 2 << 30;
const LIMIT_UNSET: u64 = u64::MAX;
static WEIGHTS_LIMIT: AtomicU64 = AtomicU64::new(LIMIT_UNSET);

/// The largest weights array, in bytes, that `return_weights` may allocate.
pub fn weights_memory_limit() -> u64 {
    match WEIGHTS_LIMIT.load(Ordering::Relaxed) {
        LIMIT_UNSET => std::env::var(WEIGHTS_LIMIT_ENV)
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .filter(|&limit| limit != LIMIT_UNSET)
            .unwrap_or(DEFAULT_WEIGHTS_LIMIT),
        limit => limit,
    }
}

/// Sets the weights memory limit in bytes.
pub fn set_weights_memory_limit(bytes: u64) {
    WEIGHTS_LIMIT.store(bytes.min(LIMIT_UNSET - 1), Ordering::Relaxed);
}

/// Sizes of one call, with leading dims flattened into `batch` (2-D inputs are one head).
#[derive(Debug, Clone)]
pub(crate) struct Geometry {
    pub query_heads: usize,
    pub kv_heads: usize,
    pub batch: usize,
    pub num_queries: usize,
    pub num_keys: usize,
    pub depth: usize,
    pub value_dim: usize,
    /// The leading (batch) dims, then the head dim if the inputs have one.
    pub outer_shape: Vec<usize>,
    pub batch_shape: Vec<usize>,
}

impl Geometry {
    fn check(
        query: &[usize],
        key: &[usize],
        value: &[usize],
        enable_gqa: bool,
    ) -> Result<Self, AttnError> {
        let shapes = || {
            format!(
                "(query {}, key {}, value {})",
                shape_str(query),
                shape_str(key),
                shape_str(value)
            )
        };
        if query.len() < 2 {
            return Err(AttnError::shape(
                "query",
                format!(
                    "expected at least 2 dims (L, D), got shape {}",
                    shape_str(query)
                ),
            ));
        }
        let rank = query.len();
        for (name, shape) in [("key", key), ("value", value)] {
            if shape.len() != rank {
                return Err(AttnError::shape(
                    name,
                    format!(
                        "expected {rank} dims like query, got {} dims {}",
                        shape.len(),
                        shapes()
                    ),
                ));
            }
        }
        let lead = rank.saturating_sub(3);
        for (name, shape) in [("key", key), ("value", value)] {
            if shape[..lead] != query[..lead] {
                return Err(AttnError::shape(
                    name,
                    format!(
                        "leading (batch) dims {} do not match query's {} {}",
                        shape_str(&shape[..lead]),
                        shape_str(&query[..lead]),
                        shapes()
                    ),
                ));
            }
        }
        if key[rank - 1] != query[rank - 1] {
            return Err(AttnError::shape(
                "key",
                format!(
                    "head dim D (last axis) is {} but query's is {} {}",
                    key[rank - 1],
                    query[rank - 1],
                    shapes()
                ),
            ));
        }
        if value[rank - 2] != key[rank - 2] {
            return Err(AttnError::shape(
                "value",
                format!(
                    "length S (axis -2) is {} but key's is {} {}",
                    value[rank - 2],
                    key[rank - 2],
                    shapes()
                ),
            ));
        }
        let (query_heads, kv_heads) = if rank >= 3 {
            (query[rank - 3], key[rank - 3])
        } else {
            (1, 1)
        };
        if rank >= 3 && value[rank - 3] != kv_heads {
            return Err(AttnError::shape(
                "value",
                format!(
                    "has {} heads but key has {kv_heads} {}",
                    value[rank - 3],
                    shapes()
                ),
            ));
        }
        if query_heads != kv_heads {
            if !enable_gqa {
                return Err(AttnError::shape(
                    "key",
                    format!(
                        "query has {query_heads} heads but key/value have {kv_heads}; pass \
                         enable_gqa=True for grouped-query attention {}",
                        shapes()
                    ),
                ));
            }
            if kv_heads == 0 || query_heads % kv_heads != 0 {
                return Err(AttnError::shape(
                    "enable_gqa",
                    format!(
                        "query heads ({query_heads}) must be a multiple of key/value heads \
                         ({kv_heads}) {}",
                        shapes()
                    ),
                ));
            }
        }
        let batch_shape = query[..lead].to_vec();
        Ok(Geometry {
            query_heads,
            kv_heads,
            batch: batch_shape.iter().product(),
            num_queries: query[rank - 2],
            num_keys: key[rank - 2],
            depth: query[rank - 1],
            value_dim: value[rank - 1],
            outer_shape: query[..rank - 2].to_vec(),
            batch_shape,
        })
    }

    fn output_shape(&self) -> Vec<usize> {
        let mut shape = self.outer_shape.clone();
        shape.extend([self.num_queries, self.value_dim]);
        shape
    }

    fn weights_shape(&self) -> Vec<usize> {
        let mut shape = self.outer_shape.clone();
        shape.extend([self.num_queries, self.num_keys]);
        shape
    }

    fn heads(&self) -> usize {
        self.batch * self.query_heads
    }
}

/// Where a mask's elements live, as element strides that broadcast it to
/// `(batch..., Hq, L, S)` (0 along broadcast dims).
struct MaskPlan {
    batch_strides: Vec<usize>,
    head_stride: usize,
    row_stride: usize,
    col_stride: usize,
}

/// Whether a mask of `mask_shape` broadcasts to `target` (NumPy rules, right-aligned).
pub(crate) fn broadcasts(mask_shape: &[usize], target: &[usize]) -> bool {
    mask_shape.len() <= target.len()
        && mask_shape
            .iter()
            .rev()
            .zip(target.iter().rev())
            .all(|(&m, &t)| m == t || m == 1)
}

/// Refuses a mask that does not broadcast to the weights shape.
fn check_mask_shape(mask_shape: &[usize], geometry: &Geometry) -> Result<(), AttnError> {
    let target = geometry.weights_shape();
    if broadcasts(mask_shape, &target) {
        return Ok(());
    }
    Err(AttnError::shape(
        "attn_mask",
        format!(
            "shape {} does not broadcast to the weights shape {} (..., Hq, L, S)",
            shape_str(mask_shape),
            shape_str(&target)
        ),
    ))
}

impl MaskPlan {
    /// `strides` are the mask's element strides, one per dim of `mask_shape` (which
    /// [`check_mask_shape`] accepted).
    fn new(mask_shape: &[usize], strides: &[usize], geometry: &Geometry) -> Self {
        // Right-aligned onto (batch..., Hq, L, S); a length-1 dim is broadcast: stride 0.
        let full_rank = geometry.batch_shape.len() + 3;
        let mut aligned = vec![0usize; full_rank];
        for (offset, (&dim, &stride)) in mask_shape.iter().zip(strides).rev().enumerate() {
            if dim != 1 {
                aligned[full_rank - 1 - offset] = stride;
            }
        }
        MaskPlan {
            batch_strides: aligned[..full_rank - 3].to_vec(),
            head_stride: aligned[full_rank - 3],
            row_stride: aligned[full_rank - 2],
            col_stride: aligned[full_rank - 1],
        }
    }

    /// Offset of element (query 0, key 0) for flattened batch index `batch` and head `head`.
    fn base(&self, geometry: &Geometry, batch: usize, head: usize) -> usize {
        let mut remaining = batch;
        let mut offset = head * self.head_stride;
        for (dim, stride) in geometry.batch_shape.iter().zip(&self.batch_strides).rev() {
            offset += (remaining % dim) * stride;
            remaining /= dim;
        }
        offset
    }
}

/// A mutable slice that parallel tasks write to at disjoint ranges.
struct DisjointWriter<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only write through `range_mut` at ranges no other task touches.
unsafe impl<T: Send> Send for DisjointWriter<T> {}
unsafe impl<T: Send> Sync for DisjointWriter<T> {}

impl<T> DisjointWriter<T> {
    fn new(data: &mut [T]) -> Self {
        DisjointWriter {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// # Safety
    /// No two live slices returned by this method may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

/// Queries at or below this count split their keys into fixed chunks handled by different
/// threads (decoding one token against a long cache would otherwise use a single core).
const SPLIT_MAX_QUERIES: usize = QUERY_BLOCK;
/// Keys per chunk when splitting; a multiple of `KEY_BLOCK`, fixed so results never depend on
/// the thread count.
pub(crate) const KV_CHUNK: usize = 8 * KEY_BLOCK;
/// Below this many multiply-adds the pool's wake-up costs more than it saves.
const SERIAL_WORK: usize = 1 << 18;

/// One unit of parallel work: a block of query rows of one (batch, head), over some keys.
struct Task {
    head: usize,
    rows: Range<usize>,
    keys: Range<usize>,
    cost: usize,
}

fn contiguous<'a, T>(array: &'a CowArray<'_, T, IxDyn>) -> &'a [T] {
    array.as_slice().expect("standard layout is contiguous")
}

/// Runs `work` over `tasks` heaviest first, on the pool or, for small problems, inline. Each
/// worker reuses one scratch space across the tasks it runs.
fn run_tasks<T, F>(pool: &ThreadPool, tasks: &mut [Task], work: F)
where
    T: Element,
    F: Fn(&mut Scratch<T>, &Task) + Sync + Send,
{
    tasks.sort_by_key(|task| std::cmp::Reverse(task.cost));
    let total: usize = tasks.iter().map(|task| task.cost).sum();
    if total <= SERIAL_WORK || tasks.len() == 1 {
        let mut scratch = Scratch::default();
        tasks.iter().for_each(|task| work(&mut scratch, task));
    } else {
        pool.install(|| {
            tasks
                .par_iter()
                .with_max_len(1)
                .for_each_init(Scratch::default, |scratch, task| work(scratch, task))
        });
    }
}

/// Exact scaled dot-product attention; see [`AttentionOptions`] for the options and the
/// Python docs for the full contract.
pub fn scaled_dot_product_attention<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    attention_at_level(active_level(), query, key, value, mask, options)
}

/// [`scaled_dot_product_attention`] at a given instruction set (tests cover each one).
pub(crate) fn attention_at_level<T: KernelElement>(
    level: SimdLevel,
    query: ArrayViewD<'_, T>,
    key: ArrayViewD<'_, T>,
    value: ArrayViewD<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let geometry = Geometry::check(
        query.shape(),
        key.shape(),
        value.shape(),
        options.enable_gqa,
    )?;
    check_call(&geometry, &mask, options)?;
    if let Some(empty) = nothing_to_compute(&geometry, options)? {
        return Ok(empty);
    }
    // Borrow contiguous inputs as they are; copy only strided, transposed or reversed ones.
    let key = standard_layout(key, "key")?;
    let value = standard_layout(value, "value")?;
    if decodes_by_group(&geometry, &mask, options) {
        let kv = StridedKv {
            key: contiguous(&key),
            value: contiguous(&value),
            kv_heads: geometry.kv_heads,
            num_keys: geometry.num_keys,
            row_capacity: geometry.num_keys,
            depth: geometry.depth,
            value_dim: geometry.value_dim,
        };
        return attend_query_groups(level, &geometry, query, &kv, &mask, options);
    }
    let kv = KvRows {
        key: contiguous(&key),
        value: contiguous(&value),
        row_capacity: geometry.num_keys,
    };
    attend_checked(level, &geometry, query, kv, &mask, options)
}

/// The checks shared by every entry point once the shapes fit: scale, mask shape, weights size.
fn check_call<T: KernelElement>(
    geometry: &Geometry,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<(), AttnError> {
    if let Some(scale) = options.scale {
        if !scale.is_finite() {
            return Err(AttnError::value(
                "scale",
                format!("must be finite, got {scale}"),
            ));
        }
        score_scale::<T>(scale)?;
    }
    if let Some(shape) = mask.shape() {
        check_mask_shape(shape, geometry)?;
    }
    if options.return_weights {
        check_weights_fit::<T>(&geometry.weights_shape())?;
    }
    Ok(())
}

/// The result at once when the output and weights hold no element: the work must follow the
/// data, not leading dims that multiply to billions of empty heads.
fn nothing_to_compute<T: KernelElement>(
    geometry: &Geometry,
    options: &AttentionOptions,
) -> Result<Option<Attention<T>>, AttnError> {
    let empty = |shape: &[usize]| shape.contains(&0);
    let output_shape = geometry.output_shape();
    let weights_shape = geometry.weights_shape();
    if !empty(&output_shape) || (options.return_weights && !empty(&weights_shape)) {
        return Ok(None);
    }
    let output = ArrayD::from_shape_vec(IxDyn(&output_shape), Vec::new())
        .expect("an empty shape holds no element");
    let weights = options.return_weights.then(|| {
        ArrayD::from_shape_vec(IxDyn(&weights_shape), Vec::new())
            .expect("an empty shape holds no element")
    });
    Ok(Some(Attention { output, weights }))
}

/// Refuses, before anything is allocated, weights of `shape` larger than the memory limit.
pub(crate) fn check_weights_fit<T>(shape: &[usize]) -> Result<(), AttnError> {
    let bytes = shape
        .iter()
        .fold(std::mem::size_of::<T>() as u128, |product, &dim| {
            product.saturating_mul(dim as u128)
        });
    let limit = weights_memory_limit();
    if bytes > limit as u128 {
        return Err(AttnError::WeightsTooLarge {
            shape: shape.to_vec(),
            bytes,
            limit,
        });
    }
    Ok(())
}

/// Keys and values head after head (batch and kv heads flattened), each head's rows
/// `row_capacity` rows apart: a KV cache keeps room to grow after each head's keys.
struct KvRows<'a, T> {
    key: &'a [T],
    value: &'a [T],
    row_capacity: usize,
}

/// Runs a call whose arguments [`check_call`] accepted.
fn attend_checked<T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: KvRows<'_, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let pool = pool_for(options.num_threads)?;
    let query = standard_layout(query, "query")?;
    // Masks are read through their own strides: a broadcast or transposed view costs nothing.
    let bool_mask = match mask {
        Mask::Bool(view) => Some(strided_elements(view.view(), "attn_mask")?),
        _ => None,
    };
    let additive_mask = match mask {
        Mask::Additive(view) => Some(strided_elements(view.view(), "attn_mask")?),
        _ => None,
    };
    let plan = match (mask.shape(), &bool_mask, &additive_mask) {
        (Some(shape), Some(memory), _) => Some(MaskPlan::new(shape, &memory.strides, geometry)),
        (Some(shape), _, Some(memory)) => Some(MaskPlan::new(shape, &memory.strides, geometry)),
        _ => None,
    };
    let (q, k, v) = (contiguous(&query), kv.key, kv.value);
    let row_capacity = kv.row_capacity;

    let scale = options.scale.unwrap_or(if geometry.depth == 0 {
        1.0
    } else {
        1.0 / (geometry.depth as f64).sqrt()
    });
    let params = KernelParams {
        num_keys: geometry.num_keys,
        depth: geometry.depth,
        value_dim: geometry.value_dim,
        bounds: Bounds::new(
            geometry.num_queries,
            geometry.num_keys,
            options.is_causal,
            options.alignment,
            options.window,
        ),
        score_scale: score_scale(scale)?,
    };

    let group = geometry.query_heads / geometry.kv_heads.max(1);
    let (l, s, d, dv) = (
        geometry.num_queries,
        geometry.num_keys,
        geometry.depth,
        geometry.value_dim,
    );
    let head_data = |head: usize| -> HeadData<'_, T> {
        let (batch, query_head) = (head / geometry.query_heads, head % geometry.query_heads);
        let kv_head = batch * geometry.kv_heads + query_head / group;
        let mask_rows = match (&plan, &bool_mask, &additive_mask) {
            (Some(plan), Some(memory), _) => MaskRows::Bool {
                data: memory.data(),
                base: plan.base(geometry, batch, query_head),
                row_stride: plan.row_stride,
                col_stride: plan.col_stride,
            },
            (Some(plan), _, Some(memory)) => MaskRows::Additive {
                data: memory.data(),
                base: plan.base(geometry, batch, query_head),
                row_stride: plan.row_stride,
                col_stride: plan.col_stride,
            },
            _ => MaskRows::None,
        };
        HeadData {
            q: &q[head * l * d..(head + 1) * l * d],
            k: &k[kv_head * row_capacity * d..][..s * d],
            v: &v[kv_head * row_capacity * dv..][..s * dv],
            mask: mask_rows,
        }
    };

    let mut output = zeroed(&[geometry.heads(), l, dv], "output")?;
    let mut weights = if options.return_weights {
        Some(zeroed(&[geometry.heads(), l, s], "return_weights")?)
    } else {
        None
    };

    // Query blocks of every head, each with the keys its rows can see.
    let mut blocks = Vec::new();
    for head in 0..geometry.heads() {
        for start in (0..l).step_by(QUERY_BLOCK) {
            let rows = start..(start + QUERY_BLOCK).min(l);
            let keys = params.bounds.block_keys(&rows);
            let cost = rows.len() * keys.len() * (d + dv).max(1);
            blocks.push(Task {
                head,
                rows,
                keys,
                cost,
            });
        }
    }

    let out_writer = DisjointWriter::new(&mut output);
    if let Some(weights) = weights.as_mut() {
        let weights_writer = DisjointWriter::new(weights);
        run_tasks(&pool, &mut blocks, |scratch, task| {
            let head = head_data(task.head);
            let base = task.head * l;
            // SAFETY: (head, rows) pairs are distinct across tasks, so these ranges are disjoint.
            let (w, out) = unsafe {
                (
                    weights_writer
                        .range_mut((base + task.rows.start) * s..(base + task.rows.end) * s),
                    out_writer
                        .range_mut((base + task.rows.start) * dv..(base + task.rows.end) * dv),
                )
            };
            T::weights(level, &params, &head, task.rows.clone(), w, out, scratch);
        });
    } else if l <= SPLIT_MAX_QUERIES && blocks.iter().any(|task| task.keys.len() > KV_CHUNK) {
        // Few queries, many keys: chunks of keys run in parallel and merge in key order.
        let mut chunks = Vec::new();
        for (index, block) in blocks.iter().enumerate() {
            let mut start = block.keys.start;
            while start < block.keys.end {
                let keys = start..(start + KV_CHUNK).min(block.keys.end);
                start = keys.end;
                let cost = block.rows.len() * keys.len() * (d + dv).max(1);
                chunks.push((
                    index,
                    Task {
                        head: block.head,
                        rows: block.rows.clone(),
                        keys,
                        cost,
                    },
                ));
            }
        }
        let compute = |scratch: &mut Scratch<T>, (_, task): &(usize, Task)| {
            scratch.state.reset(task.rows.len(), dv);
            T::flash(
                level,
                &params,
                &head_data(task.head),
                task.rows.clone(),
                task.keys.clone(),
                scratch,
            );
            std::mem::take(&mut scratch.state)
        };
        let states: Vec<SoftmaxState<T>> = pool.install(|| {
            chunks
                .par_iter()
                .map_init(Scratch::default, compute)
                .collect()
        });
        let mut merged: Vec<Option<SoftmaxState<T>>> = (0..blocks.len()).map(|_| None).collect();
        for ((index, _), state) in chunks.iter().zip(states) {
            match &mut merged[*index] {
                Some(total) => total.merge(&state, dv),
                slot @ None => *slot = Some(state),
            }
        }
        for (block, state) in blocks.iter().zip(merged) {
            if let Some(state) = state {
                let base = block.head * l;
                // SAFETY: single-threaded here; ranges are disjoint anyway.
                let out = unsafe {
                    out_writer
                        .range_mut((base + block.rows.start) * dv..(base + block.rows.end) * dv)
                };
                state.finish_into(out, dv);
            }
        }
    } else {
        run_tasks(&pool, &mut blocks, |scratch, task| {
            scratch.state.reset(task.rows.len(), dv);
            T::flash(
                level,
                &params,
                &head_data(task.head),
                task.rows.clone(),
                task.keys.clone(),
                scratch,
            );
            let base = task.head * l;
            // SAFETY: (head, rows) pairs are distinct across tasks, so these ranges are disjoint.
            let out = unsafe {
                out_writer.range_mut((base + task.rows.start) * dv..(base + task.rows.end) * dv)
            };
            scratch.state.finish_into(out, dv);
        });
    }

    let output = ArrayD::from_shape_vec(IxDyn(&geometry.output_shape()), output)
        .expect("output buffer matches its shape");
    let weights = weights.map(|w| {
        ArrayD::from_shape_vec(IxDyn(&geometry.weights_shape()), w)
            .expect("weights buffer matches its shape")
    });
    Ok(Attention { output, weights })
}

/// Keys and values kept in buffers with room to grow, as in a KV cache: `key` holds
/// `(..., Hkv, row_capacity, D)` and `value` `(..., Hkv, row_capacity, Dv)` (leading dims
/// those of the query), and the first `num_keys` rows of every head take part.
#[derive(Debug, Clone, Copy)]
pub struct StridedKv<'a, T> {
    pub key: &'a [T],
    pub value: &'a [T],
    pub kv_heads: usize,
    pub num_keys: usize,
    pub row_capacity: usize,
    pub depth: usize,
    pub value_dim: usize,
}

/// Whether one query row with grouped heads can run each kv group's query heads as one block
/// (the mask, if any, must be the same for every head and row).
fn decodes_by_group<T>(
    geometry: &Geometry,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> bool {
    let group = geometry.query_heads / geometry.kv_heads.max(1);
    // The head dim is third from the right; a mask of lower rank broadcasts over it.
    let same_mask_for_every_head = mask
        .shape()
        .is_none_or(|shape| shape.len() < 3 || shape[shape.len() - 3] == 1);
    geometry.num_queries == 1 && group > 1 && !options.return_weights && same_mask_for_every_head
}

/// [`scaled_dot_product_attention`] with `query` `(..., Hq, L, D)` against keys and values
/// read in place from [`StridedKv`] buffers (no copy of the cache per call).
///
/// Decoding one query row with grouped heads runs the query heads that share a kv head as one
/// block of rows, so each kv head's keys and values are read from memory once, not once per
/// query head (when the mask, if any, is the same for every head).
pub fn attention_over_strided_kv<T: KernelElement>(
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let level = active_level();
    let rank = query.ndim();
    if rank < 3 {
        return Err(AttnError::shape(
            "query",
            format!(
                "expected (..., Hq, L, D) to attend over cached keys, got shape {}",
                shape_str(query.shape())
            ),
        ));
    }
    let lead = &query.shape()[..rank - 3];
    let key_shape = [lead, &[kv.kv_heads, kv.num_keys, kv.depth]].concat();
    let value_shape = [lead, &[kv.kv_heads, kv.num_keys, kv.value_dim]].concat();
    let geometry = Geometry::check(query.shape(), &key_shape, &value_shape, options.enable_gqa)?;
    let kv_rows = geometry.batch * kv.kv_heads * kv.row_capacity;
    if kv.num_keys > kv.row_capacity
        || kv.key.len() != kv_rows * kv.depth
        || kv.value.len() != kv_rows * kv.value_dim
    {
        return Err(AttnError::value(
            "key",
            format!(
                "buffers of {} key and {} value elements do not hold {kv_rows} rows of depth {} \
                 and {} with {} keys in use",
                kv.key.len(),
                kv.value.len(),
                kv.depth,
                kv.value_dim,
                kv.num_keys
            ),
        ));
    }
    check_call(&geometry, &mask, options)?;
    if let Some(empty) = nothing_to_compute(&geometry, options)? {
        return Ok(empty);
    }
    if decodes_by_group(&geometry, &mask, options) {
        return attend_query_groups(level, &geometry, query, kv, &mask, options);
    }
    let rows = KvRows {
        key: kv.key,
        value: kv.value,
        row_capacity: kv.row_capacity,
    };
    attend_checked(level, &geometry, query, rows, &mask, options)
}

/// One query row per head, `group` query heads per kv head: the group's heads become the rows
/// of one block against their shared keys. With a single query row the causal and window rules
/// reduce to one range of keys, which is sliced out so the block needs no per-row rule.
fn attend_query_groups<'a, T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'a, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    let group = geometry.query_heads / geometry.kv_heads;
    let visible = Bounds::new(
        1,
        geometry.num_keys,
        options.is_causal,
        options.alignment,
        options.window,
    )
    .row_keys(0);
    let query = standard_layout(query, "query")?;
    let mut grouped_shape = geometry.batch_shape.clone();
    grouped_shape.extend([geometry.kv_heads, group, geometry.depth]);
    let grouped_query = query
        .view()
        .into_shape_with_order(IxDyn(&grouped_shape))
        .expect("a contiguous (..., Hq, 1, D) query regroups as (..., Hkv, group, D)");
    // A mask broadcast along the keys (last dim 1) has nothing to slice.
    let per_key = |shape: &[usize]| shape.last() != Some(&1);
    let grouped_mask = match mask {
        Mask::None => Mask::None,
        Mask::Bool(view) => Mask::Bool(if per_key(view.shape()) {
            view.slice_axis(Axis(view.ndim() - 1), Slice::from(visible.clone()))
        } else {
            view.view()
        }),
        Mask::Additive(view) => Mask::Additive(if per_key(view.shape()) {
            view.slice_axis(Axis(view.ndim() - 1), Slice::from(visible.clone()))
        } else {
            view.view()
        }),
    };
    let grouped_options = AttentionOptions {
        is_causal: false,
        window: None,
        enable_gqa: false,
        return_weights: false,
        ..*options
    };
    let mut key_shape = grouped_shape.clone();
    key_shape[geometry.batch_shape.len() + 1] = visible.len();
    let mut value_shape = key_shape.clone();
    *value_shape.last_mut().expect("rank >= 3") = geometry.value_dim;
    let grouped = Geometry::check(&grouped_shape, &key_shape, &value_shape, false)?;
    check_call(&grouped, &grouped_mask, &grouped_options)?;
    // Every (batch, kv head) starts its rows at `visible.start`; an empty batch has no rows.
    let from = |buffer: &'a [T], width: usize| buffer.get(visible.start * width..).unwrap_or(&[]);
    let rows = KvRows {
        key: from(kv.key, kv.depth),
        value: from(kv.value, kv.value_dim),
        row_capacity: kv.row_capacity,
    };
    let result = attend_checked(
        level,
        &grouped,
        grouped_query,
        rows,
        &grouped_mask,
        &grouped_options,
    )?;
    let output = result
        .output
        .into_shape_with_order(IxDyn(&geometry.output_shape()))
        .expect("(..., Hkv, group, Dv) output regroups as (..., Hq, 1, Dv)");
    Ok(Attention {
        output,
        weights: None,
    })
}
