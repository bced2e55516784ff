//! A cache of past keys and values for decoding one token (or a few) at a time.
//!
//! Each (batch, kv head) keeps its keys in rows of one growing buffer with spare rows after
//! them, so appending copies only the new rows and attention reads the cache in place. The
//! spare room at least doubles whenever it runs out: a long generation copies each key a
//! bounded number of times in all, not once per step.
//!
//! Rows are stored in the cache's [`Storage`]: the compute type, or compressed (bfloat16,
//! float16, int8 blocks), converted once by `append` and read in place by the kernels.
//!
//! A bounded cache ([`Eviction`]) keeps the first `sinks` tokens and the most recent
//! `max_len − sinks`, as StreamingLLM does. The held rows stay contiguous: when old rows are
//! evicted the few sink rows move forward over them, and the rows slide back to the buffer's
//! start only when its end is reached (at most once per `max_len − sinks` tokens).

pub(crate) mod storage;

use ndarray::{s, ArrayView4, ArrayViewD};
use rayon::prelude::*;
use rayon::ThreadPool;

use crate::attention::decode::decode;
use crate::attention::shapes::{check_call, Geometry};
use crate::attention::{attention_over_strided_kv, StridedKv};
use crate::attention::{Attention, AttentionOptions, Mask};
use crate::bounds::Window;
use crate::bounds::{Bounds, CausalAlignment};
use crate::cache::storage::{HeadRowsMut, Relocation, RowBuffer, Rows, Storage};
use crate::error::shape_str;
use crate::error::AttnError;
use crate::kernel::decode::{DecodeCall, Int8Rows, RowFormat, StoredRows};
use crate::kernel::score_scale;
use crate::kernel::KernelElement;
use crate::memory::standard_layout;
use crate::simd::{active_level, SimdLevel};
use crate::threads::{pool_for, APPEND_INLINE_VALUES};

/// One head's key rows and value rows, borrowed for writing.
type KeyValueHead<'a, T> = (HeadRowsMut<'a, T>, HeadRowsMut<'a, T>);

/// What a bounded cache keeps: the first `sinks` tokens and the most recent `max_len − sinks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    pub max_len: usize,
    pub sinks: usize,
}

impl Eviction {
    /// Checks `max_len >= 1` and `sinks <= max_len`.
    pub fn new(max_len: usize, sinks: usize) -> Result<Self, AttnError> {
        if max_len == 0 {
            return Err(AttnError::value("max_len", "must be >= 1 (or None), got 0"));
        }
        if sinks > max_len {
            return Err(AttnError::value(
                "sinks",
                format!("{sinks} sink tokens do not fit in max_len = {max_len}"),
            ));
        }
        Ok(Eviction { max_len, sinks })
    }

    /// Tokens kept after the sinks.
    fn recent(&self) -> usize {
        self.max_len - self.sinks
    }

    /// Rows per head a bounded buffer never outgrows: the kept tokens plus room for a chunk
    /// of new ones, so rows slide back at most once per `recent` appended tokens.
    fn row_limit(&self) -> usize {
        // Saturating: a `max_len` near the address space's size is no limit at all.
        self.max_len.saturating_add(self.recent())
    }
}

/// Keys `(batch, Hkv, len, D)` and values `(batch, Hkv, len, D)` of the tokens kept.
#[derive(Debug, Clone)]
pub struct KvCache<T> {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    /// Rows allocated per (batch, kv head); `first_row + len <= row_capacity`.
    row_capacity: usize,
    /// Row of every head where the held tokens start (evictions move it forward).
    first_row: usize,
    storage: Storage,
    eviction: Option<Eviction>,
    keys: Rows<T>,
    values: Rows<T>,
}

/// How the queries of [`KvCache::attend`] see the cached keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheAttendOptions {
    /// Multiplies `Q·Kᵀ`; `None` means `1 / sqrt(D)`.
    pub scale: Option<f64>,
    /// Keeps only keys within the window of each query's diagonal (bottom-right aligned).
    pub window: Option<Window>,
    /// Allows more query heads than cached kv heads (a multiple of them).
    pub enable_gqa: bool,
    pub return_weights: bool,
    /// Worker threads for this call; `None` uses the engine-wide count.
    pub num_threads: Option<usize>,
}

impl CacheAttendOptions {
    /// The attention call a cache makes: its queries are the newest tokens, so they see the
    /// held keys bottom-right causally.
    fn attention_options(&self) -> AttentionOptions {
        AttentionOptions {
            is_causal: true,
            alignment: CausalAlignment::BottomRight,
            window: self.window,
            scale: self.scale,
            enable_gqa: self.enable_gqa,
            return_weights: self.return_weights,
            num_threads: self.num_threads,
        }
    }
}

/// Which tokens of an appended chunk are written, and how many old ones leave.
struct AppendPlan {
    /// Leading tokens of the chunk that fill the sink rows (or, unbounded, every token).
    fill: std::ops::Range<usize>,
    /// Trailing tokens of the chunk kept as recent ones.
    recent: std::ops::Range<usize>,
    /// Oldest recent rows evicted.
    evict: usize,
}

impl<T: KernelElement> KvCache<T> {
    /// An empty unbounded cache in the compute type for `batch` sequences of `kv_heads` heads
    /// of width `head_dim`, with room for `capacity` tokens before its first growth.
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        batch: usize,
        capacity: usize,
    ) -> Result<Self, AttnError> {
        Self::with_storage(kv_heads, head_dim, batch, capacity, Storage::Native, None)
    }

    /// An empty cache storing its rows in `storage`, bounded by `eviction` if given.
    pub fn with_storage(
        kv_heads: usize,
        head_dim: usize,
        batch: usize,
        capacity: usize,
        storage: Storage,
        eviction: Option<Eviction>,
    ) -> Result<Self, AttnError> {
        for (name, value) in [
            ("num_kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("batch", batch),
        ] {
            if value == 0 {
                return Err(AttnError::value(name, "must be >= 1, got 0"));
            }
        }
        if storage != Storage::Native && T::TYPE_NAME != "float32" {
            return Err(AttnError::value(
                "storage",
                format!(
                    "compressed storage needs a float32 cache, not {}",
                    T::TYPE_NAME
                ),
            ));
        }
        let capacity = eviction.map_or(capacity, |bound| capacity.min(bound.row_limit()));
        let mut cache = KvCache {
            batch,
            kv_heads,
            head_dim,
            len: 0,
            row_capacity: 0,
            first_row: 0,
            storage,
            eviction,
            keys: Rows::new(storage, 0, head_dim)?,
            values: Rows::new(storage, 0, head_dim)?,
        };
        cache.relocate(capacity)?;
        Ok(cache)
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn storage(&self) -> Storage {
        self.storage
    }

    pub fn eviction(&self) -> Option<Eviction> {
        self.eviction
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows per head allocated (tokens that fit before the buffers grow or slide back).
    pub fn capacity(&self) -> usize {
        self.row_capacity
    }

    /// Bytes of the keys and values held, in their storage (int8 counts its block scales).
    pub fn nbytes(&self) -> usize {
        2 * self.batch * self.kv_heads * self.len * self.storage.row_bytes::<T>(self.head_dim)
    }

    /// Forgets every token; the buffers are kept for the next sequence.
    pub fn reset(&mut self) {
        self.len = 0;
        self.first_row = 0;
    }

    /// Drops the tokens after the first `len` (undoes appends after a failed step; tokens an
    /// append evicted are not restored).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The `(batch, Hkv, n, D)` shape `append` expects for `n` new tokens.
    fn expected_shape(&self, tokens: &str) -> String {
        format!(
            "({}, {}, {tokens}, {})",
            self.batch, self.kv_heads, self.head_dim
        )
    }

    /// Checks that `key` and `value` fit this cache, without changing it.
    pub fn check_append(&self, key: &[usize], value: &[usize]) -> Result<(), AttnError> {
        for (name, shape) in [("k", key), ("v", value)] {
            let fits = shape.len() == 4
                && shape[0] == self.batch
                && shape[1] == self.kv_heads
                && shape[3] == self.head_dim;
            if !fits {
                return Err(AttnError::shape(
                    name,
                    format!(
                        "expected shape (batch, num_kv_heads, n, head_dim) = {}, got {}",
                        self.expected_shape("n"),
                        shape_str(shape)
                    ),
                ));
            }
        }
        if key[2] != value[2] {
            return Err(AttnError::shape(
                "v",
                format!(
                    "holds {} tokens but k holds {} (k {}, v {})",
                    value[2],
                    key[2],
                    shape_str(key),
                    shape_str(value)
                ),
            ));
        }
        Ok(())
    }

    /// Which of `new_tokens` appended tokens are kept, and how many held ones are evicted.
    fn plan(&self, new_tokens: usize) -> AppendPlan {
        let Some(bound) = self.eviction else {
            return AppendPlan {
                fill: 0..new_tokens,
                recent: new_tokens..new_tokens,
                evict: 0,
            };
        };
        let held_sinks = self.len.min(bound.sinks);
        let fill = (bound.sinks - held_sinks).min(new_tokens);
        let kept = (new_tokens - fill).min(bound.recent());
        let held_recent = self.len - held_sinks;
        AppendPlan {
            fill: 0..fill,
            recent: new_tokens - kept..new_tokens,
            evict: (held_recent + kept).saturating_sub(bound.recent()),
        }
    }

    /// Tokens held after appending `new_tokens`, and whether all of them are kept (a chunk
    /// longer than a bounded cache's room keeps only its last tokens).
    pub fn after_append(&self, new_tokens: usize) -> (usize, bool) {
        let plan = self.plan(new_tokens);
        let kept = plan.fill.len() + plan.recent.len();
        (self.len + kept - plan.evict, kept == new_tokens)
    }

    /// Appends `key` and `value`, each `(batch, Hkv, n, D)`, converted to the storage (a long
    /// chunk on `num_threads` workers, or the engine-wide count when `None`); a bounded cache
    /// then evicts what no longer fits. On error the cache is unchanged.
    pub fn append(
        &mut self,
        key: ArrayView4<'_, T>,
        value: ArrayView4<'_, T>,
        num_threads: Option<usize>,
    ) -> Result<(), AttnError> {
        self.check_append(key.shape(), value.shape())?;
        self.storage.check_values("k", key.iter().copied())?;
        self.storage.check_values("v", value.iter().copied())?;
        let pool = pool_for(num_threads)?;
        let new_tokens = key.shape()[2];
        if new_tokens == 0 {
            // Nothing to copy, however many (batch, head) pairs there are.
            return Ok(());
        }
        let plan = self.plan(new_tokens);
        let needed = self
            .len
            .checked_add(plan.fill.len() + plan.recent.len())
            .ok_or_else(|| {
                AttnError::value("k", format!("{new_tokens} more tokens overflow the cache"))
            })?;
        // A long chunk is converted on the engine's workers, a decoding step's few rows inline.
        let values = 2 * self.batch * self.kv_heads * new_tokens * self.head_dim;
        let pool =
            (values > APPEND_INLINE_VALUES && pool.current_num_threads() > 1).then_some(&*pool);
        self.make_room(needed)?;
        // Nothing below fails: the cache changes only once the room is there.
        self.write(&key, &value, plan.fill.clone(), pool);
        if plan.evict > 0 {
            let sinks = self.eviction.map_or(0, |bound| bound.sinks);
            let heads = self.batch * self.kv_heads;
            let (from, to) = (self.first_row, self.first_row + plan.evict);
            self.keys
                .move_rows(heads, self.row_capacity, from, to, sinks);
            self.values
                .move_rows(heads, self.row_capacity, from, to, sinks);
            self.first_row = to;
            self.len -= plan.evict;
        }
        self.write(&key, &value, plan.recent, pool);
        Ok(())
    }

    /// Ensures `needed` rows fit after `first_row`: slides the held rows back to row 0 when
    /// that is enough, otherwise grows (geometrically, up to a bounded cache's limit).
    fn make_room(&mut self, needed: usize) -> Result<(), AttnError> {
        if self.first_row + needed <= self.row_capacity {
            return Ok(());
        }
        if needed <= self.row_capacity {
            let heads = self.batch * self.kv_heads;
            let (from, held) = (self.first_row, self.len);
            self.keys.move_rows(heads, self.row_capacity, from, 0, held);
            self.values
                .move_rows(heads, self.row_capacity, from, 0, held);
            self.first_row = 0;
            return Ok(());
        }
        let mut rows = needed.max(self.row_capacity.saturating_mul(2));
        if let Some(bound) = self.eviction {
            rows = rows.min(bound.row_limit()).max(needed);
        }
        self.relocate(rows)
    }

    /// Moves the held rows into new buffers of `rows` rows per head, starting at row 0.
    fn relocate(&mut self, rows: usize) -> Result<(), AttnError> {
        let relocation = Relocation {
            heads: self.batch * self.kv_heads,
            capacity: self.row_capacity,
            new_capacity: rows,
            held: self.first_row..self.first_row + self.len,
        };
        let keys = self.keys.relocated(&relocation)?;
        let values = self.values.relocated(&relocation)?;
        self.keys = keys;
        self.values = values;
        self.row_capacity = rows;
        self.first_row = 0;
        Ok(())
    }

    /// Writes tokens `tokens` of `key` and `value` after the held rows, on `pool` when it is
    /// given (each head's rows are converted by one worker).
    fn write(
        &mut self,
        key: &ArrayView4<'_, T>,
        value: &ArrayView4<'_, T>,
        tokens: std::ops::Range<usize>,
        pool: Option<&ThreadPool>,
    ) {
        if tokens.is_empty() {
            return;
        }
        let (at, kv_heads, depth) = (self.first_row + self.len, self.kv_heads, self.head_dim);
        let write_head = |(head, (mut keys, mut values)): (usize, KeyValueHead<'_, T>)| {
            let (batch, kv_head) = (head / kv_heads, head % kv_heads);
            let mut staging = Vec::with_capacity(depth);
            for (offset, token) in tokens.clone().enumerate() {
                let (key_row, value_row) = (
                    key.slice(s![batch, kv_head, token, ..]),
                    value.slice(s![batch, kv_head, token, ..]),
                );
                keys.write_row(at + offset, key_row, &mut staging);
                values.write_row(at + offset, value_row, &mut staging);
            }
        };
        let heads: Vec<KeyValueHead<'_, T>> = (self.keys)
            .heads_mut(self.row_capacity)
            .into_iter()
            .zip(self.values.heads_mut(self.row_capacity))
            .collect();
        match pool {
            Some(pool) => pool.install(|| {
                let heads = heads.into_par_iter().enumerate();
                heads.with_max_len(1).for_each(write_head)
            }),
            None => heads.into_iter().enumerate().for_each(write_head),
        }
        self.len += tokens.len();
    }

    /// The native buffers (compute-type storage).
    fn native(&self) -> Option<(&RowBuffer<T>, &RowBuffer<T>)> {
        match (&self.keys, &self.values) {
            (Rows::Native(keys), Rows::Native(values)) => Some((keys, values)),
            _ => None,
        }
    }

    /// The cached keys and values as [`StridedKv`] buffers for the attention kernel (native
    /// storage only: compressed rows are read by the cache's own kernel).
    pub fn strided(&self) -> Option<StridedKv<'_, T>> {
        let (keys, values) = self.native()?;
        let skip = self.first_row * self.head_dim;
        Some(StridedKv {
            key: &keys.data[skip..],
            value: &values.data[skip..],
            kv_heads: self.kv_heads,
            num_keys: self.len,
            row_capacity: self.row_capacity,
            depth: self.head_dim,
            value_dim: self.head_dim,
        })
    }

    /// The held keys and values decoded to float32, `(batch · Hkv, len, D)` each.
    pub fn decoded(&self) -> (Vec<f32>, Vec<f32>) {
        let (depth, heads) = (self.head_dim, self.batch * self.kv_heads);
        let mut keys = vec![0.0f32; heads * self.len * depth];
        let mut values = keys.clone();
        for head in 0..heads {
            for token in 0..self.len {
                let row = head * self.row_capacity + self.first_row + token;
                let at = (head * self.len + token) * depth;
                self.keys.read_row(row, &mut keys[at..at + depth]);
                self.values.read_row(row, &mut values[at..at + depth]);
            }
        }
        (keys, values)
    }

    /// Attention of `query` `(batch, Hq, L, D)` over the cache: the `L` queries are the
    /// newest tokens, so query `i` sees keys up to `len - L + i` (bottom-right causal over
    /// the kept tokens).
    pub fn attend(
        &self,
        query: ArrayViewD<'_, T>,
        mask: Mask<'_, T>,
        options: &CacheAttendOptions,
    ) -> Result<Attention<T>, AttnError> {
        let shape = query.shape();
        if shape.len() != 4 || shape[0] != self.batch || shape[3] != self.head_dim {
            return Err(AttnError::shape(
                "q",
                format!(
                    "expected shape (batch, num_heads, L, head_dim) = ({}, H, L, {}), got {}",
                    self.batch,
                    self.head_dim,
                    shape_str(shape)
                ),
            ));
        }
        if shape[2] > self.len {
            return Err(AttnError::shape(
                "q",
                format!(
                    "has {} queries but the cache holds only {} tokens; append the new \
                     tokens' keys and values first",
                    shape[2], self.len
                ),
            ));
        }
        let attention_options = options.attention_options();
        if matches!(mask, Mask::None) && (self.storage != Storage::Native || shape[2] == 1) {
            if let Some(result) =
                self.attend_stored(active_level(), query.view(), &attention_options)?
            {
                return Ok(result);
            }
        }
        match self.strided() {
            Some(kv) => attention_over_strided_kv(query, &kv, mask, &attention_options),
            None => self.attend_decoded(query, mask, &attention_options),
        }
    }

    /// The decoding kernel over the stored rows (no mask), at `level`: every compressed storage,
    /// and float32 rows (`None` for float64 rows, which the general kernel reads).
    fn attend_stored(
        &self,
        level: SimdLevel,
        query: ArrayViewD<'_, T>,
        options: &AttentionOptions,
    ) -> Result<Option<Attention<T>>, AttnError> {
        let shape = query.shape().to_vec();
        let kv_shape = [self.batch, self.kv_heads, self.len, self.head_dim];
        let geometry = Geometry::check(&shape, &kv_shape, &kv_shape, options.enable_gqa)?;
        check_call(&geometry, &Mask::<T>::None, options)?;
        let depth = self.head_dim;
        let query = standard_layout(query, "q")?;
        let query_slice = query.as_slice().expect("standard layout is contiguous");
        let widened: Vec<f32>;
        let query32 = match T::as_f32(query_slice) {
            Some(query32) => query32,
            None => {
                widened = query_slice.iter().map(|x| x.to_f64() as f32).collect();
                &widened
            }
        };
        let call = DecodeCall {
            query: query32,
            batch: self.batch,
            query_heads: shape[1],
            kv_heads: self.kv_heads,
            num_queries: shape[2],
            num_keys: self.len,
            depth,
            row_capacity: self.row_capacity,
            first_row: self.first_row,
            score_scale: score_scale::<f32>(options.scale_for(depth))?,
            bounds: Bounds::new(
                shape[2],
                self.len,
                true,
                CausalAlignment::BottomRight,
                options.window,
            ),
        };
        let decoded = match (&self.keys, &self.values) {
            (Rows::Native(keys), Rows::Native(values)) => {
                let (Some(keys), Some(values)) = (T::as_f32(&keys.data), T::as_f32(&values.data))
                else {
                    return Ok(None);
                };
                let keys = StoredRows {
                    data: keys,
                    per_row: depth,
                };
                let values = StoredRows {
                    data: values,
                    per_row: depth,
                };
                self.decode_with(level, &call, &keys, &values, options)?
            }
            (Rows::BFloat16(keys), Rows::BFloat16(values)) => {
                self.decode_with(level, &call, &keys.stored(), &values.stored(), options)?
            }
            (Rows::Float16(keys), Rows::Float16(values)) => {
                self.decode_with(level, &call, &keys.stored(), &values.stored(), options)?
            }
            (
                Rows::Int8 {
                    values: key_values,
                    scales: key_scales,
                },
                Rows::Int8 {
                    values: value_values,
                    scales: value_scales,
                },
            ) => {
                let keys = Int8Rows {
                    values: key_values.stored(),
                    scales: key_scales.stored(),
                };
                let values = Int8Rows {
                    values: value_values.stored(),
                    scales: value_scales.stored(),
                };
                self.decode_with(level, &call, &keys, &values, options)?
            }
            _ => unreachable!("keys and values share one storage"),
        };
        Ok(Some(decoded))
    }

    /// Runs the decoding kernel over `keys` and `values` in one storage.
    fn decode_with<F: RowFormat>(
        &self,
        level: SimdLevel,
        call: &DecodeCall<'_>,
        keys: &F,
        values: &F,
        options: &AttentionOptions,
    ) -> Result<Attention<T>, AttnError> {
        let decoded = decode(
            level,
            call,
            keys,
            values,
            options.num_threads,
            options.return_weights,
        )?;
        let shape = [
            self.batch,
            call.query_heads,
            call.num_queries,
            self.head_dim,
        ];
        Ok(decoded.into_attention(&shape))
    }

    /// A compressed cache with a mask or weights: its held rows decoded to float32 for this
    /// call, then the general kernel.
    fn attend_decoded(
        &self,
        query: ArrayViewD<'_, T>,
        mask: Mask<'_, T>,
        options: &AttentionOptions,
    ) -> Result<Attention<T>, AttnError> {
        let (keys, values) = self.decoded();
        let decoded: Vec<T> = keys.iter().map(|&x| T::from_f64(f64::from(x))).collect();
        let decoded_values: Vec<T> = values.iter().map(|&x| T::from_f64(f64::from(x))).collect();
        let kv = StridedKv {
            key: &decoded,
            value: &decoded_values,
            kv_heads: self.kv_heads,
            num_keys: self.len,
            row_capacity: self.len,
            depth: self.head_dim,
            value_dim: self.head_dim,
        };
        attention_over_strided_kv(query, &kv, mask, options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::schedule::attend_checked;
    use crate::attention::ScoreMods;
    use crate::cache::storage::Storage;
    use ndarray::{Array4, ArrayD, Axis, IxDyn};

    fn ramp(shape: [usize; 4], offset: f32) -> Array4<f32> {
        let mut counter = offset;
        Array4::from_shape_simple_fn(shape, || {
            counter += 0.37;
            (counter * 1.3).sin()
        })
    }

    /// Appends `keys` and `values` to `cache` ten tokens at a time.
    fn append_in_chunks(cache: &mut KvCache<f32>, keys: &Array4<f32>, values: &Array4<f32>) {
        for start in (0..keys.len_of(Axis(2))).step_by(10) {
            let range = start..start + 10;
            cache
                .append(
                    keys.slice(s![.., .., range.clone(), ..]),
                    values.slice(s![.., .., range, ..]),
                    None,
                )
                .unwrap();
        }
    }

    #[test]
    fn appends_grow_and_keep_what_was_held() {
        let mut cache = KvCache::<f32>::new(2, 3, 2, 1).unwrap();
        let first = ramp([2, 2, 3, 3], 0.0);
        let second = ramp([2, 2, 5, 3], 7.0);
        cache.append(first.view(), first.view(), None).unwrap();
        cache.append(second.view(), second.view(), None).unwrap();
        assert_eq!(cache.len(), 8);
        assert!(cache.capacity() >= 8);
        let kv = cache.strided().unwrap();
        for head in 0..4 {
            let (batch, kv_head) = (head / 2, head % 2);
            for token in 0..8 {
                let expected = if token < 3 {
                    first.slice(s![batch, kv_head, token, ..]).to_vec()
                } else {
                    second.slice(s![batch, kv_head, token - 3, ..]).to_vec()
                };
                let at = (head * kv.row_capacity + token) * 3;
                assert_eq!(&kv.key[at..at + 3], expected.as_slice());
            }
        }
        assert_eq!(cache.nbytes(), 2 * 2 * 2 * 8 * 3 * 4);
    }

    #[test]
    fn growth_is_geometric() {
        let mut cache = KvCache::<f32>::new(1, 4, 1, 0).unwrap();
        let token = Array4::<f32>::ones([1, 1, 1, 4]);
        let mut growths = 0;
        let mut capacity = cache.capacity();
        for _ in 0..1000 {
            cache.append(token.view(), token.view(), None).unwrap();
            if cache.capacity() != capacity {
                growths += 1;
                capacity = cache.capacity();
            }
        }
        assert!(growths <= 11, "{growths} growths for 1000 tokens");
    }

    #[test]
    fn failed_append_changes_nothing() {
        let mut cache = KvCache::<f64>::new(2, 4, 1, 2).unwrap();
        let good = Array4::<f64>::ones([1, 2, 2, 4]);
        cache.append(good.view(), good.view(), None).unwrap();
        let before = cache.clone();
        let short = Array4::<f64>::ones([1, 2, 1, 4]);
        let wide = Array4::<f64>::ones([1, 2, 2, 5]);
        assert!(cache.append(good.view(), short.view(), None).is_err());
        assert!(cache.append(wide.view(), wide.view(), None).is_err());
        assert_eq!(cache.len(), before.len());
        assert_eq!(cache.keys, before.keys);
        assert_eq!(cache.first_row, before.first_row);
        assert_eq!(cache.capacity(), before.capacity());
    }

    /// Values a compressed storage cannot keep are refused, naming k or v, before anything
    /// is written: int8 takes no inf or NaN (its block scale would spread it), float16 no
    /// finite value past 65,504 (it would become inf). Storages that hold them keep them.
    #[test]
    fn compressed_storage_refuses_what_it_cannot_keep() {
        let good = Array4::<f32>::ones([1, 1, 2, 64]);
        for (storage, bad, refused) in [
            (Storage::Int8, f32::NAN, true),
            (Storage::Int8, f32::NEG_INFINITY, true),
            (Storage::Int8, 3e38, false),
            (Storage::Float16, 65520.0, true),
            (Storage::Float16, -1e6, true),
            (Storage::Float16, 65504.0, false),
            (Storage::Float16, f32::NAN, false),
            (Storage::BFloat16, f32::INFINITY, false),
            (Storage::Native, f32::NAN, false),
        ] {
            let mut cache = KvCache::<f32>::with_storage(1, 64, 1, 0, storage, None).unwrap();
            cache.append(good.view(), good.view(), None).unwrap();
            let mut chunk = good.clone();
            chunk[[0, 0, 1, 40]] = bad;
            for (name, key, value) in [("k", &chunk, &good), ("v", &good, &chunk)] {
                let result = cache.clone().append(key.view(), value.view(), None);
                match result {
                    Err(error) if refused => {
                        let text = error.to_string();
                        assert!(text.starts_with(name), "{storage:?} {bad}: {text}");
                    }
                    Ok(()) if !refused => {}
                    other => panic!("{storage:?} {bad} in {name}: {other:?}"),
                }
            }
            let before = cache.clone();
            let _ = cache.append(chunk.view(), good.view(), None);
            if refused {
                assert_eq!((cache.len(), &cache.keys), (before.len(), &before.keys));
            }
        }
    }

    /// Attention over the cache equals attention over the same keys as plain arrays, with
    /// grouped heads decoding one token (the stored-rows kernel) and several (the general one).
    #[test]
    fn attend_matches_contiguous_attention() {
        for (queries, window) in [(1, None), (1, Some(Window::symmetric(5))), (3, None)] {
            let mut cache = KvCache::<f32>::new(2, 8, 1, 3).unwrap();
            let keys = ramp([1, 2, 40, 8], 1.0);
            let values = ramp([1, 2, 40, 8], 2.0);
            append_in_chunks(&mut cache, &keys, &values);
            let query = ramp([1, 6, queries, 8], 3.0).into_dyn();
            let options = CacheAttendOptions {
                window,
                enable_gqa: true,
                ..Default::default()
            };
            let cached = cache.attend(query.view(), Mask::None, &options).unwrap();
            let plain = crate::attention::scaled_dot_product_attention(
                query.view(),
                keys.view().into_dyn(),
                values.view().into_dyn(),
                Mask::None,
                &AttentionOptions {
                    is_causal: true,
                    alignment: CausalAlignment::BottomRight,
                    window,
                    enable_gqa: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let difference = (&cached.output - &plain.output)
                .iter()
                .fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                difference < 1e-5,
                "{queries} queries, {window:?}: {difference}"
            );
        }
    }

    #[test]
    fn grouped_decode_honours_a_padding_mask() {
        let mut cache = KvCache::<f64>::new(1, 4, 2, 0).unwrap();
        let keys = ramp([2, 1, 9, 4], 0.5).mapv(f64::from);
        cache.append(keys.view(), keys.view(), None).unwrap();
        let query = ramp([2, 3, 1, 4], 4.0).mapv(f64::from).into_dyn();
        let mut padding = ArrayD::from_elem(IxDyn(&[2, 1, 1, 9]), true);
        padding.slice_mut(s![1, .., .., ..4]).fill(false);
        let options = CacheAttendOptions {
            enable_gqa: true,
            ..Default::default()
        };
        let masked = cache
            .attend(query.view(), Mask::Bool(padding.view()), &options)
            .unwrap();
        // The second sequence must equal attention over its last 5 keys alone.
        let tail = keys.slice(s![1..2, .., 4.., ..]).to_owned();
        let mut alone = KvCache::<f64>::new(1, 4, 1, 0).unwrap();
        alone.append(tail.view(), tail.view(), None).unwrap();
        let expected = alone
            .attend(
                query.slice(s![1..2, .., .., ..]).into_dyn(),
                Mask::None,
                &options,
            )
            .unwrap();
        let got = masked.output.index_axis(Axis(0), 1).to_owned();
        let want = expected.output.index_axis(Axis(0), 0).to_owned();
        let difference = (&got - &want).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(difference < 1e-12, "{difference}");
    }

    /// The tiled kernel over the cache's rows decoded to float32, weights included.
    fn general_kernel(
        cache: &KvCache<f32>,
        query: ArrayViewD<'_, f32>,
        options: &AttentionOptions,
    ) -> Attention<f32> {
        let (keys, values) = cache.decoded();
        let depth = cache.head_dim;
        let kv = StridedKv {
            key: &keys,
            value: &values,
            kv_heads: cache.kv_heads,
            num_keys: cache.len,
            row_capacity: cache.len,
            depth,
            value_dim: depth,
        };
        let kv_shape = [cache.batch, cache.kv_heads, cache.len, depth];
        let geometry = Geometry::check(query.shape(), &kv_shape, &kv_shape, true).unwrap();
        let plain = ScoreMods::default();
        let (attention, _) = attend_checked(
            active_level(),
            &geometry,
            query,
            &kv,
            &Mask::None,
            options,
            &plain,
            false,
        )
        .unwrap();
        attention
    }

    /// Every storage at every SIMD level: the decoding kernel's output and weights equal the
    /// tiled kernel's over the same decoded values, for one and several queries, grouped heads
    /// and a window.
    #[test]
    fn stored_kernel_matches_the_general_kernel_on_decoded_values() {
        let keys = ramp([2, 2, 70, 40], 1.0);
        let values = ramp([2, 2, 70, 40], 2.0);
        for storage in [
            Storage::Native,
            Storage::BFloat16,
            Storage::Float16,
            Storage::Int8,
        ] {
            let mut cache = KvCache::<f32>::with_storage(2, 40, 2, 0, storage, None).unwrap();
            append_in_chunks(&mut cache, &keys, &values);
            for (queries, window) in [(1, None), (5, None), (3, Some(Window::symmetric(9)))] {
                let query = ramp([2, 6, queries, 40], 3.0).into_dyn();
                let options = CacheAttendOptions {
                    window,
                    enable_gqa: true,
                    return_weights: true,
                    ..Default::default()
                }
                .attention_options();
                let general = general_kernel(&cache, query.view(), &options);
                let largest = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
                    assert_eq!(a.shape(), b.shape());
                    (a - b).iter().fold(0.0f32, |m, x| m.max(x.abs()))
                };
                for level in SimdLevel::supported() {
                    let stored = cache
                        .attend_stored(level, query.view(), &options)
                        .unwrap()
                        .expect("float32 rows decode");
                    let output = largest(&stored.output, &general.output);
                    let weights = largest(
                        stored.weights.as_ref().unwrap(),
                        general.weights.as_ref().unwrap(),
                    );
                    assert!(
                        output < 2e-5 && weights < 2e-6,
                        "{level:?}, {storage:?}, {queries} queries, {window:?}: output \
                         {output}, weights {weights}"
                    );
                }
            }
        }
    }

    /// One decoding query gives the same bits through a float32 cache, through SDPA over the
    /// same keys and values (bottom-right causal, or no mask at all), with or without weights,
    /// on one thread or two: grouped heads or not, keys in several chunks.
    #[test]
    fn a_decoding_step_is_the_same_through_every_entry() {
        use crate::attention::scaled_dot_product_attention;
        for (query_heads, kv_heads) in [(4, 4), (8, 2)] {
            let keys = ramp([2, kv_heads, 2500, 48], 1.0);
            let values = ramp([2, kv_heads, 2500, 48], 2.0);
            let query = ramp([2, query_heads, 1, 48], 3.0).into_dyn();
            let mut cache = KvCache::<f32>::new(kv_heads, 48, 2, 0).unwrap();
            cache.append(keys.view(), values.view(), None).unwrap();
            let options = CacheAttendOptions {
                enable_gqa: true,
                ..Default::default()
            };
            let cached = cache.attend(query.view(), Mask::None, &options).unwrap();
            let bits = |array: &ArrayD<f32>| array.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (is_causal, return_weights, num_threads) in [
                (true, false, None),
                (true, true, Some(1)),
                (false, false, Some(2)),
                (false, true, None),
            ] {
                let sdpa_options = AttentionOptions {
                    is_causal,
                    alignment: CausalAlignment::BottomRight,
                    enable_gqa: true,
                    return_weights,
                    num_threads,
                    ..Default::default()
                };
                let direct = scaled_dot_product_attention(
                    query.view(),
                    keys.view().into_dyn(),
                    values.view().into_dyn(),
                    Mask::None,
                    &sdpa_options,
                )
                .unwrap();
                assert_eq!(
                    bits(&direct.output),
                    bits(&cached.output),
                    "Hq {query_heads}, Hkv {kv_heads}, causal {is_causal}, weights \
                     {return_weights}, threads {num_threads:?}"
                );
                assert_eq!(direct.weights.is_some(), return_weights);
            }
        }
    }

    /// A bounded cache holds the first `sinks` tokens and the newest `max_len − sinks`, in
    /// order, after single tokens and after chunks longer than it.
    #[test]
    fn bounded_cache_keeps_sinks_and_the_newest_tokens() {
        let token = |index: usize| Array4::from_elem([1, 2, 1, 3], index as f32);
        for (max_len, sinks) in [(8, 2), (8, 0), (5, 5), (1, 0)] {
            let bound = Eviction::new(max_len, sinks).unwrap();
            let mut cache =
                KvCache::<f32>::with_storage(2, 3, 1, 0, Storage::Float16, Some(bound)).unwrap();
            let mut seen = 0;
            for step in 0..60 {
                let chunk = [1, 1, 3, 11][step % 4];
                let mut block = Array4::<f32>::zeros([1, 2, chunk, 3]);
                for t in 0..chunk {
                    block
                        .slice_mut(s![.., .., t..t + 1, ..])
                        .assign(&token(seen + t));
                }
                cache.append(block.view(), block.view(), None).unwrap();
                seen += chunk;
                let held: Vec<usize> = (0..sinks.min(seen))
                    .chain(seen.saturating_sub(max_len - sinks).max(sinks)..seen)
                    .collect();
                assert_eq!(cache.len(), held.len(), "{max_len}/{sinks} after {seen}");
                let (decoded_keys, _) = cache.decoded();
                let got: Vec<usize> = decoded_keys
                    .chunks(3)
                    .take(held.len())
                    .map(|row| row[0] as usize)
                    .collect();
                assert_eq!(got, held, "{max_len}/{sinks} after {seen}");
                assert!(cache.capacity() <= bound.row_limit());
                assert_eq!(cache.nbytes(), 2 * 2 * held.len() * 3 * 2);
            }
        }
        assert!(Eviction::new(0, 0).is_err());
        assert!(Eviction::new(4, 5).is_err());
    }
}
