//! Decoding's schedule: a few query rows over stored rows (a KV cache in any storage, or a
//! float32 call's keys and values), cut into blocks for [`decode_block`] and merged.
//!
//! Blocks are (batch · kv head, up to [`ROW_BLOCK`] of its query rows, a range of keys): the
//! query heads that share a kv head are rows of one block, so their keys and values are read
//! once. Few rows split their keys into fixed chunks of [`KEY_CHUNK`] whose partial states merge
//! in key order, so results are the same for every thread count, and the same for every entry
//! point that decodes the same rows.

use std::sync::OnceLock;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::attention::schedule::{run_tasks, Task};
use crate::attention::Attention;
use crate::element::Element;
use crate::error::AttnError;
use crate::kernel::decode::{decode_block, decode_weights, DecodeCall, RowFormat};
use crate::kernel::SoftmaxState;
use crate::memory::filled;
use crate::simd::SimdLevel;
use crate::threads::{pool_for, ATTENTION_INLINE_WORK};

/// Keys per block when a kv head's rows are few enough to split keys; fixed by the shape alone.
const KEY_CHUNK: usize = 1024;
/// Query rows per block (and the most rows for which keys are split into chunks).
const ROW_BLOCK: usize = 16;

/// The output `(batch, Hq, L, D)`, each row's log-sum-exp (natural log) and, when asked for,
/// the weights `(batch, Hq, L, S)`, all float32.
pub(crate) struct Decoded {
    pub output: Vec<f32>,
    pub lse: Vec<f32>,
    pub weights: Option<Vec<f32>>,
    pub num_keys: usize,
}

impl Decoded {
    /// As arrays of `T`: the output of `output_shape` `(..., Hq, L, D)` with the weights
    /// `(..., Hq, L, S)` when computed, and the log-sum-exp `(..., Hq, L)`.
    pub(crate) fn into_arrays<T: Element>(
        self,
        output_shape: &[usize],
    ) -> (Attention<T>, ArrayD<T>) {
        let rows_shape = &output_shape[..output_shape.len() - 1];
        let weights_shape = [rows_shape, &[self.num_keys]].concat();
        let array = |shape: &[usize], values: Vec<f32>| {
            ArrayD::from_shape_vec(IxDyn(shape), T::from_f32(values))
                .expect("the kernel wrote one value per element of the shape")
        };
        let attention = Attention {
            output: array(output_shape, self.output),
            weights: self.weights.map(|weights| array(&weights_shape, weights)),
        };
        (attention, array(rows_shape, self.lse))
    }

    /// [`Decoded::into_arrays`] without the log-sum-exp.
    pub(crate) fn into_attention<T: Element>(self, output_shape: &[usize]) -> Attention<T> {
        self.into_arrays(output_shape).0
    }
}

/// How one call's rows and keys are cut into blocks.
struct Blocks {
    row_blocks: usize,
    key_chunk: usize,
    key_chunks: usize,
}

impl Blocks {
    fn new(call: &DecodeCall<'_>) -> Self {
        let key_chunk = if call.rows_per_head() <= ROW_BLOCK {
            KEY_CHUNK
        } else {
            call.num_keys.max(1)
        };
        Blocks {
            row_blocks: call.rows_per_head().div_ceil(ROW_BLOCK),
            key_chunk,
            key_chunks: call.num_keys.div_ceil(key_chunk),
        }
    }

    /// Every block, in merge order (head, rows, then keys).
    fn tasks(&self, call: &DecodeCall<'_>) -> Vec<Task> {
        let rows_per_head = call.rows_per_head();
        let mut tasks = Vec::with_capacity(self.len(call));
        for head in 0..call.batch * call.kv_heads {
            for row_start in (0..rows_per_head).step_by(ROW_BLOCK) {
                let rows = row_start..(row_start + ROW_BLOCK).min(rows_per_head);
                for key_start in (0..call.num_keys).step_by(self.key_chunk) {
                    let keys = key_start..(key_start + self.key_chunk).min(call.num_keys);
                    let cost = rows.len() * keys.len() * call.depth;
                    tasks.push(Task {
                        head,
                        rows: rows.clone(),
                        keys,
                        cost,
                    });
                }
            }
        }
        tasks
    }

    fn len(&self, call: &DecodeCall<'_>) -> usize {
        call.batch * call.kv_heads * self.row_blocks * self.key_chunks
    }

    /// Where `task` stands in merge order (the scheduler runs tasks in its own order).
    fn index(&self, task: &Task) -> usize {
        (task.head * self.row_blocks + task.rows.start / ROW_BLOCK) * self.key_chunks
            + task.keys.start / self.key_chunk
    }
}

/// Attention of `call`'s queries over stored `keys` and `values` at `level`, on the pool for
/// `num_threads`; with the weights when `want_weights`.
pub(crate) fn decode<F: RowFormat>(
    level: SimdLevel,
    call: &DecodeCall<'_>,
    keys: &F,
    values: &F,
    num_threads: Option<usize>,
    want_weights: bool,
) -> Result<Decoded, AttnError> {
    let pool = pool_for(num_threads)?;
    let blocks = Blocks::new(call);
    let mut tasks = blocks.tasks(call);
    let states: Vec<OnceLock<SoftmaxState<f32>>> =
        (0..tasks.len()).map(|_| OnceLock::new()).collect();
    run_tasks(
        &pool,
        &mut tasks,
        |state: &mut SoftmaxState<f32>, task: &Task| {
            let (rows, keys_range) = (task.rows.clone(), task.keys.clone());
            decode_block(
                level, call, keys, values, task.head, rows, keys_range, state,
            );
            let done = states[blocks.index(task)].set(std::mem::take(state));
            debug_assert!(done.is_ok(), "each block runs once");
        },
    );
    let rows = call.batch * call.query_heads * call.num_queries;
    let mut output = filled(&[rows, call.depth], 0.0f32, "query")?;
    let mut lse = filled(&[rows], f32::NEG_INFINITY, "query")?;
    let mut merged_rows = Vec::new();
    let mut states = states.into_iter().map(|state| state.into_inner());
    for head in 0..call.batch * call.kv_heads {
        for row_start in (0..call.rows_per_head()).step_by(ROW_BLOCK) {
            let mut merged: Option<SoftmaxState<f32>> = None;
            for state in states.by_ref().take(blocks.key_chunks).flatten() {
                match &mut merged {
                    Some(total) => total.merge(&state, call.depth),
                    slot @ None => *slot = Some(state),
                }
            }
            let Some(merged) = merged else { continue };
            let mut row_output = vec![0.0f32; merged.max.len() * call.depth];
            let mut row_lse = vec![0.0f32; merged.max.len()];
            merged.finish_into(&mut row_output, call.depth);
            merged.lse_into(&mut row_lse);
            for (i, (out, &row_lse)) in row_output
                .chunks_exact(call.depth)
                .zip(&row_lse)
                .enumerate()
            {
                let (index, _) = call.row(head, row_start + i);
                output[index * call.depth..][..call.depth].copy_from_slice(out);
                lse[index] = row_lse;
            }
            if want_weights {
                merged_rows.push((head, row_start, merged.max, merged.sum));
            }
        }
    }
    let weights = if want_weights {
        Some(weights_of(level, call, keys, &merged_rows, rows, &pool)?)
    } else {
        None
    };
    Ok(Decoded {
        output,
        lse,
        weights,
        num_keys: call.num_keys,
    })
}

/// Where one output row's weights come from: its kv head, its row in that head, and the row's
/// merged max and sum.
type WeightSource = Option<(usize, usize, f32, f32)>;

/// The weights `(batch, Hq, L, S)` of every row from its merged state: zeros outside the keys
/// each row sees. Rows are independent, so they run on `pool` (inline when the work is small).
fn weights_of<F: RowFormat>(
    level: SimdLevel,
    call: &DecodeCall<'_>,
    keys: &F,
    merged_rows: &[(usize, usize, Vec<f32>, Vec<f32>)],
    rows: usize,
    pool: &ThreadPool,
) -> Result<Vec<f32>, AttnError> {
    let mut weights = filled(&[rows, call.num_keys], 0.0f32, "query")?;
    let mut sources: Vec<WeightSource> = vec![None; rows];
    for (head, row_start, max, sum) in merged_rows {
        for (i, (&max, &sum)) in max.iter().zip(sum).enumerate() {
            let (index, _) = call.row(*head, row_start + i);
            sources[index] = Some((*head, row_start + i, max, sum));
        }
    }
    let fill = |(weights_row, source): (&mut [f32], &WeightSource)| {
        if let Some((head, row, max, sum)) = *source {
            let visible = call.row(head, row).1;
            decode_weights(
                level,
                call,
                keys,
                head,
                row,
                max,
                sum,
                &mut weights_row[visible],
            );
        }
    };
    let chunks = weights.chunks_mut(call.num_keys.max(1));
    if rows * call.num_keys * call.depth <= ATTENTION_INLINE_WORK || pool.current_num_threads() == 1
    {
        chunks.zip(&sources).for_each(fill);
    } else {
        let chunks: Vec<&mut [f32]> = chunks.collect();
        pool.install(|| chunks.into_par_iter().zip(&sources).for_each(fill));
    }
    Ok(weights)
}
