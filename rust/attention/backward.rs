//! The backward pass of attention, FlashAttention-2's algorithm on the CPU: each tile's
//! probabilities are recomputed from the forward's log-sum-exp, `P = exp(S - lse)`, with
//! `D = rowsum(dO ∘ O)` and `dS = P ∘ (dP - D)` where `dP = dO·Vᵀ`; then `dV = Pᵀ·dO`,
//! `dK = scale · dSᵀ·Q` and `dQ = scale · dS·K`. The L x S matrices never exist: memory beyond
//! the gradients is one row statistic per query and a few tiles per thread. Softcapping and
//! ALiBi modify each tile's scores through the forward's own code; ALiBi's bias is a constant,
//! and the cap's derivative at each raw score multiplies `dS`.
//!
//! Every gradient element has one owner, so results are bitwise identical for any thread
//! count. With enough kv heads, a task per (batch, kv head) sweeps its key blocks in order and
//! computes all three gradients of its heads at once. With few, one pass over key blocks owns
//! `dK` and `dV` (a kv head's query heads visited in order, so grouped-query gradients sum in a
//! fixed order), and a second pass over query blocks owns `dQ`, recomputing the tiles it needs.

use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::attention::schedule::{run_tasks, with_call_data, CallData, DisjointWriter, Task};
use crate::attention::shapes::{check_call, check_score_mods, Geometry};
use crate::attention::{AttentionOptions, Mask, ScoreMods, StridedKv};
use crate::element::Element;
use crate::error::{shape_str, AttnError};
use crate::kernel::backward::{GradHead, GradParams, GradScratch, KeyBlockGrads};
use crate::kernel::KernelElement;
use crate::memory::{standard_layout, zeroed};
use crate::simd::{active_level, SimdLevel};
use crate::threads::pool_for;

/// Keys per task of the key pass (rows of its `dK`, `dV`).
const KEY_PASS_KEYS: usize = 64;
/// Query rows per task of the query pass.
const GRAD_QUERY_BLOCK: usize = 64;
/// From this many (batch, kv head) pairs on, a task per kv head computes all three gradients
/// in one sweep (five products per tile instead of the two passes' seven). The choice depends
/// on the shape alone, never on the thread count, so results stay the same for every count.
const KV_HEAD_TASKS_MIN: usize = 8;

/// The gradients of attention with respect to its three inputs, in their shapes.
pub struct AttentionGrads<T> {
    pub grad_query: ArrayD<T>,
    pub grad_key: ArrayD<T>,
    pub grad_value: ArrayD<T>,
}

/// The arrays of one backward call, each as PyTorch shapes it.
pub struct BackwardInputs<'a, T> {
    pub grad_out: ArrayViewD<'a, T>,
    pub query: ArrayViewD<'a, T>,
    pub key: ArrayViewD<'a, T>,
    pub value: ArrayViewD<'a, T>,
    /// The forward's output.
    pub out: ArrayViewD<'a, T>,
    /// The forward's log-sum-exp, `(..., Hq, L)`.
    pub lse: ArrayViewD<'a, T>,
}

/// The gradients of [`crate::scaled_dot_product_attention`] with respect to query, key and
/// value, given the gradient of its output, its output and its log-sum-exp (from
/// [`crate::scaled_dot_product_attention_with_lse`] with the same arguments and options). An
/// additive mask gets no gradient. Rows that see no key give zero gradients.
pub fn scaled_dot_product_attention_backward<T: KernelElement>(
    inputs: BackwardInputs<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
) -> Result<AttentionGrads<T>, AttnError> {
    backward_at_level(active_level(), inputs, mask, options, &ScoreMods::default())
}

/// [`scaled_dot_product_attention_backward`] of a forward with softcapping and/or ALiBi
/// ([`ScoreMods`], the ones the forward was given). The slopes are constants: they get no
/// gradient.
pub fn scaled_dot_product_attention_backward_with_mods<T: KernelElement>(
    inputs: BackwardInputs<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<AttentionGrads<T>, AttnError> {
    backward_at_level(active_level(), inputs, mask, options, mods)
}

/// [`scaled_dot_product_attention_backward`] at a given instruction set.
pub(crate) fn backward_at_level<T: KernelElement>(
    level: SimdLevel,
    inputs: BackwardInputs<'_, T>,
    mask: Mask<'_, T>,
    options: &AttentionOptions,
    mods: &ScoreMods<'_>,
) -> Result<AttentionGrads<T>, AttnError> {
    let options = AttentionOptions {
        return_weights: false,
        ..*options
    };
    let geometry = Geometry::check(
        inputs.query.shape(),
        inputs.key.shape(),
        inputs.value.shape(),
        options.enable_gqa,
    )?;
    check_call(&geometry, &mask, &options)?;
    check_score_mods(&geometry, mods)?;
    check_forward_results(&geometry, &inputs)?;
    let pool = pool_for(options.num_threads)?;
    // Non-contiguous inputs are copied once; contiguous ones are read in place.
    let query = standard_layout(inputs.query.view(), "query")?;
    let key = standard_layout(inputs.key.view(), "key")?;
    let value = standard_layout(inputs.value.view(), "value")?;
    let grad_out = standard_layout(inputs.grad_out.view(), "grad_out")?;
    let out = standard_layout(inputs.out.view(), "out")?;
    let lse = standard_layout(inputs.lse.view(), "lse")?;
    let (heads, l, s) = (geometry.heads(), geometry.num_queries, geometry.num_keys);
    let (d, dv) = (geometry.depth, geometry.value_dim);
    let kv_heads = geometry.batch * geometry.kv_heads;
    let mut grad_query = zeroed::<T>(&[heads, l, d], "grad_query")?;
    let mut grad_key = zeroed::<T>(&[kv_heads, s, d], "grad_key")?;
    let mut grad_value = zeroed::<T>(&[kv_heads, s, dv], "grad_value")?;
    let nothing_to_do = heads == 0 || l == 0 || s == 0;
    if !nothing_to_do {
        let (out, grad_out) = (
            out.as_slice().expect("standard layout is contiguous"),
            grad_out.as_slice().expect("standard layout is contiguous"),
        );
        let delta = row_deltas(grad_out, out, dv)?;
        let kv = StridedKv {
            key: key.as_slice().expect("standard layout is contiguous"),
            value: value.as_slice().expect("standard layout is contiguous"),
            kv_heads: geometry.kv_heads,
            num_keys: s,
            row_capacity: s,
            depth: d,
            value_dim: dv,
        };
        let query = query.as_slice().expect("standard layout is contiguous");
        let lse = lse.as_slice().expect("standard layout is contiguous");
        with_call_data(
            level,
            &geometry,
            query,
            &kv,
            &mask,
            &options,
            mods,
            |call| {
                let grads = GradCall {
                    call,
                    params: GradParams {
                        kernel: call.params,
                        scale: T::from_f64(options.scale_for(geometry.depth)),
                    },
                    grad_out,
                    lse,
                    delta: &delta,
                };
                if geometry.batch * geometry.kv_heads >= KV_HEAD_TASKS_MIN {
                    grads.by_kv_heads(&pool, &mut grad_query, &mut grad_key, &mut grad_value);
                } else {
                    grads.key_pass(&pool, &mut grad_key, &mut grad_value);
                    grads.query_pass(&pool, &mut grad_query);
                }
            },
        )?;
    }
    // Each gradient has its input's shape (and the buffers that input's row-major layout).
    let shaped = |buffer: Vec<T>, input: &ArrayViewD<'_, T>| {
        ArrayD::from_shape_vec(IxDyn(input.shape()), buffer)
            .expect("gradient buffer matches its shape")
    };
    Ok(AttentionGrads {
        grad_query: shaped(grad_query, &inputs.query),
        grad_key: shaped(grad_key, &inputs.key),
        grad_value: shaped(grad_value, &inputs.value),
    })
}

/// Refuses a `grad_out`, `out` or `lse` whose shape is not the forward's output's or lse's.
fn check_forward_results<T>(
    geometry: &Geometry,
    inputs: &BackwardInputs<'_, T>,
) -> Result<(), AttnError> {
    let output = geometry.output_shape();
    let lse = geometry.lse_shape();
    for (name, shape, expected, what) in [
        ("grad_out", inputs.grad_out.shape(), &output, "the output's"),
        ("out", inputs.out.shape(), &output, "the output's"),
        ("lse", inputs.lse.shape(), &lse, "(..., Hq, L)"),
    ] {
        if shape != expected.as_slice() {
            return Err(AttnError::shape(
                name,
                format!(
                    "has shape {} but must have {what} shape {} for query {}, key {}, value {}",
                    shape_str(shape),
                    shape_str(expected),
                    shape_str(inputs.query.shape()),
                    shape_str(inputs.key.shape()),
                    shape_str(inputs.value.shape()),
                ),
            ));
        }
    }
    Ok(())
}

/// `D = rowsum(dO ∘ O)` of every row of every head.
fn row_deltas<T: Element>(
    grad_out: &[T],
    out: &[T],
    value_dim: usize,
) -> Result<Vec<T>, AttnError> {
    let rows = grad_out.len() / value_dim.max(1);
    let mut delta = zeroed::<T>(&[rows], "lse")?;
    if value_dim > 0 {
        for ((delta, grad), out) in delta
            .iter_mut()
            .zip(grad_out.chunks_exact(value_dim))
            .zip(out.chunks_exact(value_dim))
        {
            *delta = grad
                .iter()
                .zip(out)
                .fold(T::ZERO, |sum, (&g, &o)| sum + g * o);
        }
    }
    Ok(delta)
}

/// One backward call's shared inputs.
struct GradCall<'a, T> {
    call: &'a CallData<'a, T>,
    params: GradParams<T>,
    grad_out: &'a [T],
    lse: &'a [T],
    delta: &'a [T],
}

impl<T: KernelElement> GradCall<'_, T> {
    /// The backward inputs of flattened (batch, query head) `head`.
    fn head(&self, head: usize) -> GradHead<'_, T> {
        let geometry = self.call.geometry;
        let (l, dv) = (geometry.num_queries, geometry.value_dim);
        GradHead {
            head: self.call.head(head),
            grad_out: &self.grad_out[head * l * dv..(head + 1) * l * dv],
            lse: &self.lse[head * l..(head + 1) * l],
            delta: &self.delta[head * l..(head + 1) * l],
        }
    }

    /// All three gradients, a task per (batch, kv head): each sweeps its key blocks in order,
    /// accumulating its query heads' `dQ` as it goes (no tile is computed twice).
    fn by_kv_heads(
        &self,
        pool: &rayon::ThreadPool,
        grad_query: &mut [T],
        grad_key: &mut [T],
        grad_value: &mut [T],
    ) {
        let geometry = self.call.geometry;
        let (l, s) = (geometry.num_queries, geometry.num_keys);
        let (d, dv, group) = (geometry.depth, geometry.value_dim, geometry.group());
        let mut tasks: Vec<Task> = (0..geometry.batch * geometry.kv_heads)
            .map(|kv_head| Task {
                head: kv_head,
                rows: 0..l,
                keys: 0..s,
                // The work itself, so that a large call is never run inline on one thread.
                cost: l * s * group * (d + dv),
            })
            .collect();
        let writers = [grad_query, grad_key, grad_value].map(DisjointWriter::new);
        run_tasks(pool, &mut tasks, |scratch: &mut GradScratch<T>, task| {
            let heads = self.group_heads(task.head);
            // SAFETY: each task owns one kv head: its rows of dK and dV, and the rows of dQ of
            // the query heads that read it, which no other task touches.
            let (grad_query, grad_key, grad_value) = unsafe {
                (
                    writers[0].rows_mut(task.head, &(0..group * l), group * l, d),
                    writers[1].rows_mut(task.head, &(0..s), s, d),
                    writers[2].rows_mut(task.head, &(0..s), s, dv),
                )
            };
            for start in (0..s).step_by(KEY_PASS_KEYS) {
                let keys = start..(start + KEY_PASS_KEYS).min(s);
                let out = KeyBlockGrads {
                    grad_key: &mut grad_key[keys.start * d..keys.end * d],
                    grad_value: &mut grad_value[keys.start * dv..keys.end * dv],
                    grad_query: Some(&mut *grad_query),
                };
                T::key_block_grads(self.call.level, &self.params, &heads, keys, l, out, scratch);
            }
            for x in grad_query.iter_mut() {
                *x *= self.params.scale;
            }
        });
    }

    /// The query heads that read flattened (batch, kv head) `kv_head`, in order.
    fn group_heads(&self, kv_head: usize) -> Vec<GradHead<'_, T>> {
        let geometry = self.call.geometry;
        let group = geometry.group();
        let (batch, kv_head) = (kv_head / geometry.kv_heads, kv_head % geometry.kv_heads);
        let first = batch * geometry.query_heads + kv_head * group;
        (first..first + group).map(|h| self.head(h)).collect()
    }

    /// `dK` and `dV`: a task per (batch, kv head, block of keys).
    fn key_pass(&self, pool: &rayon::ThreadPool, grad_key: &mut [T], grad_value: &mut [T]) {
        let geometry = self.call.geometry;
        let (l, s) = (geometry.num_queries, geometry.num_keys);
        let (d, dv, group) = (geometry.depth, geometry.value_dim, geometry.group());
        let mut tasks = Vec::new();
        for kv_head in 0..geometry.batch * geometry.kv_heads {
            for start in (0..s).step_by(KEY_PASS_KEYS) {
                let keys = start..(start + KEY_PASS_KEYS).min(s);
                let cost = keys.len() * l * group * (d + dv);
                tasks.push(Task {
                    head: kv_head,
                    rows: 0..l,
                    keys,
                    cost,
                });
            }
        }
        let (key_writer, value_writer) = (
            DisjointWriter::new(grad_key),
            DisjointWriter::new(grad_value),
        );
        run_tasks(pool, &mut tasks, |scratch: &mut GradScratch<T>, task| {
            let heads = self.group_heads(task.head);
            // SAFETY: (kv head, keys) pairs are distinct across tasks, so these ranges are
            // disjoint.
            let out = unsafe {
                KeyBlockGrads {
                    grad_key: key_writer.rows_mut(task.head, &task.keys, s, d),
                    grad_value: value_writer.rows_mut(task.head, &task.keys, s, dv),
                    grad_query: None,
                }
            };
            T::key_block_grads(
                self.call.level,
                &self.params,
                &heads,
                task.keys.clone(),
                l,
                out,
                scratch,
            );
        });
    }

    /// `dQ`: a task per (batch, query head, block of query rows).
    fn query_pass(&self, pool: &rayon::ThreadPool, grad_query: &mut [T]) {
        let geometry = self.call.geometry;
        let (l, d) = (geometry.num_queries, geometry.depth);
        let mut tasks = Vec::new();
        for head in 0..geometry.heads() {
            for start in (0..l).step_by(GRAD_QUERY_BLOCK) {
                let rows = start..(start + GRAD_QUERY_BLOCK).min(l);
                let keys = self.call.params.bounds.block_keys(&rows);
                let cost = rows.len() * keys.len() * (d + geometry.value_dim);
                tasks.push(Task {
                    head,
                    rows,
                    keys,
                    cost,
                });
            }
        }
        let writer = DisjointWriter::new(grad_query);
        run_tasks(pool, &mut tasks, |scratch: &mut GradScratch<T>, task| {
            // SAFETY: (head, rows) pairs are distinct across tasks, so these ranges are disjoint.
            let grad_query = unsafe { writer.rows_mut(task.head, &task.rows, l, d) };
            T::query_block_grads(
                self.call.level,
                &self.params,
                &self.head(task.head),
                task.rows.clone(),
                grad_query,
                scratch,
            );
        });
    }
}
