//! Running one checked call on the thread pool: the work is cut into tasks over (batch·head,
//! query block[, key chunk]), each task writes its own rows of the one output through a
//! [`DisjointWriter`], and one of three strategies drives the kernel:
//!
//! - [`with_weights`]: each query block computes its exact softmax rows and `weights · V`;
//! - [`by_key_chunks`]: few queries against many keys (decoding) — fixed chunks of keys run in
//!   parallel and their partial softmax states merge in key order;
//! - [`by_query_blocks`]: everything else — each query block streams over its keys.
//!
//! Every task computes the same numbers whichever thread runs it and however many threads
//! there are: key chunks are fixed by the shape alone and merged in a fixed order, so results
//! are bitwise identical for any thread count.

use std::any::Any;
use std::cell::RefCell;
use std::ops::Range;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::attention::shapes::{Geometry, MaskPlan};
use crate::attention::{Attention, AttentionOptions, Mask, ScoreMods, StridedKv};
use crate::bounds::Bounds;
use crate::error::AttnError;
use crate::kernel::KernelElement;
use crate::kernel::{
    check_alibi_range, score_scale, softcap_params, HeadData, KernelParams, MaskRows, Scratch,
    SoftmaxState, KEY_BLOCK, QUERY_BLOCK,
};
use crate::masks::{MaskExpr, MaskShape, TileClass};
use crate::memory::{filled, standard_layout, strided_elements, zeroed, StridedElements};
use crate::simd::SimdLevel;
use crate::threads::{pool_for, ATTENTION_INLINE_WORK};

/// Queries at or below this count split their keys into fixed chunks handled by different
/// threads (decoding one token against a long cache would otherwise use a single core).
const SPLIT_MAX_QUERIES: usize = QUERY_BLOCK;
/// Keys per chunk when splitting; a multiple of `KEY_BLOCK`, fixed so results never depend on
/// the thread count.
pub(crate) const KV_CHUNK: usize = 8 * KEY_BLOCK;

/// A mutable slice that parallel tasks write to at disjoint ranges.
pub(crate) struct DisjointWriter<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only write through `range_mut` at ranges no other task touches.
unsafe impl<T: Send> Send for DisjointWriter<T> {}
unsafe impl<T: Send> Sync for DisjointWriter<T> {}

impl<T> DisjointWriter<T> {
    pub(crate) fn new(data: &mut [T]) -> Self {
        DisjointWriter {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// Rows `rows` of head `head`, each `width` elements, of a `(heads, L, width)` buffer.
    ///
    /// # Safety
    /// No two live slices returned by this method may overlap: callers pass each (head, rows)
    /// pair to one task only.
    #[expect(
        clippy::mut_from_ref,
        reason = "disjoint ranges of one buffer, one per task"
    )]
    pub(crate) unsafe fn rows_mut(
        &self,
        head: usize,
        rows: &Range<usize>,
        num_rows: usize,
        width: usize,
    ) -> &mut [T] {
        let start = (head * num_rows + rows.start) * width;
        let end = (head * num_rows + rows.end) * width;
        assert!(start <= end && end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
    }
}

/// One unit of parallel work: a block of query rows of one (batch, head), over some keys.
pub(crate) struct Task {
    pub head: usize,
    pub rows: Range<usize>,
    pub keys: Range<usize>,
    pub cost: usize,
}

/// Runs `work` with this thread's scratch space of type `S`, kept between calls so that a
/// small call does not spend its time allocating buffers an earlier call already had.
pub(crate) fn with_scratch<S: Default + 'static, R>(work: impl FnOnce(&mut S) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| {
        let Ok(mut kept) = cell.try_borrow_mut() else {
            // A call nested in another on this thread gets its own.
            return work(&mut S::default());
        };
        let index = match kept.iter().position(|entry| entry.is::<S>()) {
            Some(index) => index,
            None => {
                kept.push(Box::new(S::default()));
                kept.len() - 1
            }
        };
        let scratch = kept[index]
            .downcast_mut::<S>()
            .expect("the entry was found by its type");
        work(scratch)
    })
}

/// Runs `work` over `tasks` head by head, each head's heaviest first, on the pool or, for small
/// problems, inline. Each thread reuses its scratch space across the tasks it runs.
pub(crate) fn run_tasks<S, F>(pool: &ThreadPool, tasks: &mut [Task], work: F)
where
    S: Default + 'static,
    F: Fn(&mut S, &Task) + Sync + Send,
{
    // A head's tasks read the same keys and values, so running them together keeps those in
    // cache (ordering all heads' tasks by cost alone interleaves the heads, and the causal
    // forward took 17-30% longer on one thread). Within a head the heaviest go first, so that
    // the tasks left for the end, when threads run out of work, are light.
    tasks.sort_by_key(|task| (task.head, std::cmp::Reverse(task.cost)));
    let total: usize = tasks.iter().map(|task| task.cost).sum();
    if total <= ATTENTION_INLINE_WORK || tasks.len() == 1 || pool.current_num_threads() == 1 {
        with_scratch(|scratch| tasks.iter().for_each(|task| work(scratch, task)));
    } else {
        pool.install(|| {
            tasks
                .par_iter()
                .with_max_len(1)
                .for_each(|task| with_scratch(|scratch| work(scratch, task)))
        });
    }
}

/// What every task of one call reads: the query rows, the keys and values, the mask and the
/// kernel's parameters.
pub(crate) struct CallData<'a, T> {
    pub level: SimdLevel,
    pub params: KernelParams<T>,
    pub geometry: &'a Geometry,
    pub query: &'a [T],
    pub kv: &'a StridedKv<'a, T>,
    mask: Option<(&'a MaskPlan, MaskElements<'a, T>)>,
    expr: Option<(&'a MaskExpr, MaskShape)>,
    alibi_slopes: Option<&'a [f64]>,
}

/// A mask's elements as the kernel reads them.
enum MaskElements<'a, T> {
    Bool(&'a [bool]),
    Additive(&'a [T]),
}

/// The keys of `rows` worth visiting and what they cost: the causal/window span, narrowed to
/// the tiles a mask expression leaves visible (the same for every head).
fn visited_keys(
    bounds: &Bounds,
    expr: Option<(&MaskExpr, MaskShape)>,
    rows: &Range<usize>,
) -> (Range<usize>, usize) {
    let span = bounds.block_keys(rows);
    let Some((expr, shape)) = expr else {
        return (span.clone(), span.len());
    };
    let (mut first, mut end, mut cost) = (span.end, span.start, 0);
    for start in span.clone().step_by(KEY_BLOCK) {
        let block = start..(start + KEY_BLOCK).min(span.end);
        let keys = match expr.classify(shape, rows, &block) {
            TileClass::Empty => continue,
            TileClass::Full => block,
            TileClass::Partial(hull) => hull,
        };
        (first, end, cost) = (first.min(keys.start), end.max(keys.end), cost + keys.len());
    }
    if first >= end {
        return (span.start..span.start, 0);
    }
    (first..end, cost)
}

impl<T: KernelElement> CallData<'_, T> {
    /// The inputs of flattened (batch, query head) `head`.
    pub(crate) fn head(&self, head: usize) -> HeadData<'_, T> {
        let geometry = self.geometry;
        let (batch, query_head) = (head / geometry.query_heads, head % geometry.query_heads);
        let kv_head = batch * geometry.kv_heads + query_head / geometry.group();
        let (l, s, d, dv) = (
            geometry.num_queries,
            geometry.num_keys,
            geometry.depth,
            geometry.value_dim,
        );
        let capacity = self.kv.row_capacity;
        let mask = match &self.mask {
            None => match self.expr {
                Some((expr, shape)) => MaskRows::Expr { expr, shape },
                None => MaskRows::None,
            },
            Some((plan, elements)) => {
                let base = plan.base(geometry, batch, query_head);
                match *elements {
                    MaskElements::Bool(data) => MaskRows::Bool(plan.cells(data, base)),
                    MaskElements::Additive(data) => MaskRows::Additive(plan.cells(data, base)),
                }
            }
        };
        HeadData {
            q: &self.query[head * l * d..(head + 1) * l * d],
            k: &self.kv.key[kv_head * capacity * d..][..s * d],
            v: &self.kv.value[kv_head * capacity * dv..][..s * dv],
            mask,
            alibi_slope: self
                .alibi_slopes
                .map(|slopes| T::from_f64(slopes[query_head] * std::f64::consts::LOG2_E)),
        }
    }

    /// The online softmax of `task`'s rows over its keys, left in `scratch.state`.
    fn stream(&self, scratch: &mut Scratch<T>, task: &Task) {
        scratch
            .state
            .reset(task.rows.len(), self.geometry.value_dim);
        let head = self.head(task.head);
        let (rows, keys) = (task.rows.clone(), task.keys.clone());
        T::flash(self.level, &self.params, &head, rows, keys, scratch);
    }

    /// Every (head, query block) with the keys its rows can see.
    pub(crate) fn query_blocks(&self) -> Vec<Task> {
        let geometry = self.geometry;
        let (l, width) = (
            geometry.num_queries,
            (geometry.depth + geometry.value_dim).max(1),
        );
        let row_blocks: Vec<(Range<usize>, Range<usize>, usize)> = (0..l)
            .step_by(QUERY_BLOCK)
            .map(|start| {
                let rows = start..(start + QUERY_BLOCK).min(l);
                let (keys, key_cost) = visited_keys(&self.params.bounds, self.expr, &rows);
                (rows.clone(), keys, rows.len() * key_cost * width)
            })
            .collect();
        let mut blocks = Vec::with_capacity(geometry.heads() * row_blocks.len());
        for head in 0..geometry.heads() {
            for (rows, keys, cost) in &row_blocks {
                blocks.push(Task {
                    head,
                    rows: rows.clone(),
                    keys: keys.clone(),
                    cost: *cost,
                });
            }
        }
        blocks
    }
}

/// The kernel's parameters for a call of `geometry` with `options`.
fn kernel_params<T: KernelElement>(
    geometry: &Geometry,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<KernelParams<T>, AttnError> {
    let scale = options.scale_for(geometry.depth);
    if let Some(slopes) = mods.alibi_slopes {
        check_alibi_range::<T>(slopes, geometry.num_queries, geometry.num_keys)?;
    }
    Ok(KernelParams {
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
        softcap: mods.softcap.map(softcap_params).transpose()?,
        diagonal_offset: options
            .alignment
            .diagonal_offset(geometry.num_queries, geometry.num_keys),
    })
}

/// Runs `work` on the [`CallData`] of a call whose arguments `shapes::check_call` accepted:
/// `query` is `(heads, L, D)` in row-major order, and `kv` holds the keys and values of every
/// (batch, kv head) `kv.row_capacity` rows apart.
#[expect(
    clippy::too_many_arguments,
    reason = "one call's inputs and the work to run on them"
)]
pub(crate) fn with_call_data<T: KernelElement, R>(
    level: SimdLevel,
    geometry: &Geometry,
    query: &[T],
    kv: &StridedKv<'_, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
    work: impl FnOnce(&CallData<'_, T>) -> R,
) -> Result<R, AttnError> {
    // Masks are read through their own strides: a broadcast or transposed view costs nothing.
    let bool_mask: Option<StridedElements<'_, bool>> = match mask {
        Mask::Bool(view) => Some(strided_elements(view.view(), "attn_mask")?),
        _ => None,
    };
    let additive_mask: Option<StridedElements<'_, T>> = match mask {
        Mask::Additive(view) => Some(strided_elements(view.view(), "attn_mask")?),
        _ => None,
    };
    let (elements, strides) = match (&bool_mask, &additive_mask) {
        (Some(memory), _) => (Some(MaskElements::Bool(memory.data())), &memory.strides),
        (_, Some(memory)) => (Some(MaskElements::Additive(memory.data())), &memory.strides),
        _ => (None, &Vec::new()),
    };
    let plan = mask
        .shape()
        .map(|shape| MaskPlan::new(shape, strides, geometry));
    let call = CallData {
        level,
        params: kernel_params(geometry, options, mods)?,
        geometry,
        query,
        kv,
        mask: plan.as_ref().zip(elements),
        expr: match mask {
            Mask::Expr(expr) => Some((
                *expr,
                MaskShape {
                    num_queries: geometry.num_queries,
                    num_keys: geometry.num_keys,
                },
            )),
            _ => None,
        },
        alibi_slopes: mods.alibi_slopes,
    };
    Ok(work(&call))
}

/// A call's result and, when asked for, each query row's log-sum-exp `(..., Hq, L)`.
pub(crate) type WithLse<T> = (Attention<T>, Option<ArrayD<T>>);

/// Runs a call whose arguments `shapes::check_call` accepted: `kv` holds the keys and values
/// of every (batch, kv head) `kv.row_capacity` rows apart. With `want_lse`, also returns each
/// query row's log-sum-exp, `(..., Hq, L)`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call's inputs, checked, one by one"
)]
pub(crate) fn attend_checked<T: KernelElement>(
    level: SimdLevel,
    geometry: &Geometry,
    query: ArrayViewD<'_, T>,
    kv: &StridedKv<'_, T>,
    mask: &Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
    want_lse: bool,
) -> Result<WithLse<T>, AttnError> {
    let pool = pool_for(options.num_threads)?;
    let query = standard_layout(query, "query")?;
    let query = query.as_slice().expect("standard layout is contiguous");
    let (heads, l) = (geometry.heads(), geometry.num_queries);
    let mut output = zeroed(&[heads, l, geometry.value_dim], "output")?;
    let mut lse = if want_lse {
        Some(filled(&[heads, l], T::NEG_INFINITY, "return_lse")?)
    } else {
        None
    };
    let mut weights = None;
    with_call_data(level, geometry, query, kv, mask, options, mods, |call| {
        let mut blocks = call.query_blocks();
        let lse = lse.as_deref_mut();
        if options.return_weights {
            let mut buffer = zeroed(&[heads, l, geometry.num_keys], "return_weights")?;
            with_weights(&pool, call, &mut blocks, &mut output, &mut buffer, lse);
            weights = Some(buffer);
        } else if l <= SPLIT_MAX_QUERIES && blocks.iter().any(|task| task.keys.len() > KV_CHUNK) {
            by_key_chunks(&pool, call, &blocks, &mut output, lse);
        } else {
            by_query_blocks(&pool, call, &mut blocks, &mut output, lse);
        }
        Ok::<(), AttnError>(())
    })??;

    let output = ArrayD::from_shape_vec(IxDyn(&geometry.output_shape()), output)
        .expect("output buffer matches its shape");
    let weights = weights.map(|w| {
        ArrayD::from_shape_vec(IxDyn(&geometry.weights_shape()), w)
            .expect("weights buffer matches its shape")
    });
    let lse = lse.map(|lse| {
        ArrayD::from_shape_vec(IxDyn(&geometry.lse_shape()), lse)
            .expect("lse buffer matches its shape")
    });
    Ok((Attention { output, weights }, lse))
}

/// Each query block: exact softmax rows into `weights`, and `weights · V` into `output`.
fn with_weights<T: KernelElement>(
    pool: &ThreadPool,
    call: &CallData<'_, T>,
    blocks: &mut [Task],
    output: &mut [T],
    weights: &mut [T],
    lse: Option<&mut [T]>,
) {
    let geometry = call.geometry;
    let (l, s, dv) = (geometry.num_queries, geometry.num_keys, geometry.value_dim);
    let (out_writer, weights_writer) = (DisjointWriter::new(output), DisjointWriter::new(weights));
    let lse_writer = lse.map(DisjointWriter::new);
    run_tasks(pool, blocks, |scratch: &mut Scratch<T>, task| {
        // SAFETY: (head, rows) pairs are distinct across tasks, so these ranges are disjoint.
        let (w, out) = unsafe {
            (
                weights_writer.rows_mut(task.head, &task.rows, l, s),
                out_writer.rows_mut(task.head, &task.rows, l, dv),
            )
        };
        let mut unwanted = Vec::new();
        let lse = match &lse_writer {
            // SAFETY: as above.
            Some(writer) => unsafe { writer.rows_mut(task.head, &task.rows, l, 1) },
            None => {
                unwanted.resize(task.rows.len(), T::ZERO);
                &mut unwanted[..]
            }
        };
        let head = call.head(task.head);
        T::weights(
            call.level,
            &call.params,
            &head,
            task.rows.clone(),
            w,
            out,
            lse,
            scratch,
        );
    });
}

/// Each query block streams over its keys with an online softmax.
fn by_query_blocks<T: KernelElement>(
    pool: &ThreadPool,
    call: &CallData<'_, T>,
    blocks: &mut [Task],
    output: &mut [T],
    lse: Option<&mut [T]>,
) {
    let (l, dv) = (call.geometry.num_queries, call.geometry.value_dim);
    let out_writer = DisjointWriter::new(output);
    let lse_writer = lse.map(DisjointWriter::new);
    run_tasks(pool, blocks, |scratch: &mut Scratch<T>, task| {
        call.stream(scratch, task);
        // SAFETY: (head, rows) pairs are distinct across tasks, so these ranges are disjoint.
        let out = unsafe { out_writer.rows_mut(task.head, &task.rows, l, dv) };
        scratch.state.finish_into(out, dv);
        if let Some(writer) = &lse_writer {
            // SAFETY: as above.
            scratch
                .state
                .lse_into(unsafe { writer.rows_mut(task.head, &task.rows, l, 1) });
        }
    });
}

/// Few queries, many keys: fixed chunks of each block's keys run in parallel, and their partial
/// softmax states merge in key order.
fn by_key_chunks<T: KernelElement>(
    pool: &ThreadPool,
    call: &CallData<'_, T>,
    blocks: &[Task],
    output: &mut [T],
    lse: Option<&mut [T]>,
) {
    let (l, dv) = (call.geometry.num_queries, call.geometry.value_dim);
    let mut chunks = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        for start in block.keys.clone().step_by(KV_CHUNK) {
            let keys = start..(start + KV_CHUNK).min(block.keys.end);
            let cost = block.rows.len() * keys.len();
            let (head, rows) = (block.head, block.rows.clone());
            chunks.push((
                index,
                Task {
                    head,
                    rows,
                    keys,
                    cost,
                },
            ));
        }
    }
    let compute = |scratch: &mut Scratch<T>, (_, task): &(usize, Task)| {
        call.stream(scratch, task);
        std::mem::take(&mut scratch.state)
    };
    let states: Vec<SoftmaxState<T>> = pool.install(|| {
        chunks
            .par_iter()
            .map(|chunk| with_scratch(|scratch| compute(scratch, chunk)))
            .collect()
    });
    let mut merged: Vec<Option<SoftmaxState<T>>> = (0..blocks.len()).map(|_| None).collect();
    for ((index, _), state) in chunks.iter().zip(states) {
        match &mut merged[*index] {
            Some(total) => total.merge(&state, dv),
            slot @ None => *slot = Some(state),
        }
    }
    let out_writer = DisjointWriter::new(output);
    let lse_writer = lse.map(DisjointWriter::new);
    for (block, state) in blocks.iter().zip(merged) {
        if let Some(state) = state {
            // SAFETY: single-threaded here; (head, rows) ranges are disjoint anyway.
            let out = unsafe { out_writer.rows_mut(block.head, &block.rows, l, dv) };
            state.finish_into(out, dv);
            if let Some(writer) = &lse_writer {
                // SAFETY: as above.
                state.lse_into(unsafe { writer.rows_mut(block.head, &block.rows, l, 1) });
            }
        }
    }
}
