//! A cache of past keys and values for decoding one token (or a few) at a time.
//!
//! Each (batch, kv head) keeps its keys in rows of one growing buffer with spare rows after
//! them, so appending copies only the new rows and attention reads the cache in place. The
//! spare room at least doubles whenever it runs out: a long generation copies each key a
//! bounded number of times in all, not once per step.

use ndarray::{s, ArrayView2, ArrayView4, ArrayViewD};

use crate::attention::{attention_over_strided_kv, StridedKv};
use crate::bounds::CausalAlignment;
use crate::error::shape_str;
use crate::memory::zeroed;
use crate::simd::KernelElement;
use crate::{Attention, AttentionOptions, AttnError, Mask, Window};

/// Keys `(batch, Hkv, len, D)` and values `(batch, Hkv, len, D)` of the tokens seen so far.
#[derive(Debug, Clone)]
pub struct KvCache<T> {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    /// Rows allocated per (batch, kv head); `len <= row_capacity`.
    row_capacity: usize,
    keys: Vec<T>,
    values: Vec<T>,
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

impl<T: KernelElement> KvCache<T> {
    /// An empty cache for `batch` sequences of `kv_heads` heads of width `head_dim`, with room
    /// for `capacity` tokens before its first growth.
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        batch: usize,
        capacity: usize,
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
        let mut cache = KvCache {
            batch,
            kv_heads,
            head_dim,
            len: 0,
            row_capacity: 0,
            keys: Vec::new(),
            values: Vec::new(),
        };
        cache.reserve_rows(capacity)?;
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

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens that fit before the buffers grow.
    pub fn capacity(&self) -> usize {
        self.row_capacity
    }

    /// Bytes of the keys and values held (`2 · batch · Hkv · len · D` elements).
    pub fn nbytes(&self) -> usize {
        2 * self.batch * self.kv_heads * self.len * self.head_dim * std::mem::size_of::<T>()
    }

    /// Forgets every token; the buffers are kept for the next sequence.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops the tokens after the first `len` (undoes appends after a failed step).
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

    /// Appends `key` and `value`, each `(batch, Hkv, n, D)`. On error the cache is unchanged.
    pub fn append(
        &mut self,
        key: ArrayView4<'_, T>,
        value: ArrayView4<'_, T>,
    ) -> Result<(), AttnError> {
        self.check_append(key.shape(), value.shape())?;
        let new_tokens = key.shape()[2];
        if new_tokens == 0 {
            // Nothing to copy, however many (batch, head) pairs there are.
            return Ok(());
        }
        let total = self.len.checked_add(new_tokens).ok_or_else(|| {
            AttnError::value("k", format!("{new_tokens} more tokens overflow the cache"))
        })?;
        if total > self.row_capacity {
            self.reserve_rows(total.max(self.row_capacity.saturating_mul(2)))?;
        }
        let (row_capacity, held, depth) = (self.row_capacity, self.len, self.head_dim);
        let rows = |head: usize| {
            let first = (head * row_capacity + held) * depth;
            first..first + new_tokens * depth
        };
        for batch in 0..self.batch {
            for kv_head in 0..self.kv_heads {
                let head = batch * self.kv_heads + kv_head;
                copy_rows(
                    &mut self.keys[rows(head)],
                    key.slice(s![batch, kv_head, .., ..]),
                );
                copy_rows(
                    &mut self.values[rows(head)],
                    value.slice(s![batch, kv_head, .., ..]),
                );
            }
        }
        self.len = total;
        Ok(())
    }

    /// Grows every head's buffer to `rows` rows, moving the held keys and values once.
    fn reserve_rows(&mut self, rows: usize) -> Result<(), AttnError> {
        if rows <= self.row_capacity {
            return Ok(());
        }
        let heads = self.batch * self.kv_heads;
        let regrow = |old: &[T]| -> Result<Vec<T>, AttnError> {
            let mut grown = zeroed(&[heads, rows, self.head_dim], "capacity")?;
            let held = self.len * self.head_dim;
            for head in 0..heads {
                let from = head * self.row_capacity * self.head_dim;
                let to = head * rows * self.head_dim;
                grown[to..to + held].copy_from_slice(&old[from..from + held]);
            }
            Ok(grown)
        };
        let keys = regrow(&self.keys)?;
        let values = regrow(&self.values)?;
        self.keys = keys;
        self.values = values;
        self.row_capacity = rows;
        Ok(())
    }

    /// The cached keys and values as [`StridedKv`] buffers for the attention kernel.
    pub fn strided(&self) -> StridedKv<'_, T> {
        StridedKv {
            key: &self.keys,
            value: &self.values,
            kv_heads: self.kv_heads,
            num_keys: self.len,
            row_capacity: self.row_capacity,
            depth: self.head_dim,
            value_dim: self.head_dim,
        }
    }

    /// Attention of `query` `(batch, Hq, L, D)` over the cache: the `L` queries are the
    /// newest tokens, so query `i` sees keys up to `len - L + i` (bottom-right causal).
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
        let attention_options = AttentionOptions {
            is_causal: true,
            alignment: CausalAlignment::BottomRight,
            window: options.window,
            scale: options.scale,
            enable_gqa: options.enable_gqa,
            return_weights: options.return_weights,
            num_threads: options.num_threads,
        };
        attention_over_strided_kv(query, &self.strided(), mask, &attention_options)
    }
}

/// Copies `source` (any layout) into `target` in row-major order.
fn copy_rows<T: Copy>(target: &mut [T], source: ArrayView2<'_, T>) {
    match source.as_slice() {
        Some(contiguous) => target.copy_from_slice(contiguous),
        None => {
            for (slot, &x) in target.iter_mut().zip(source.iter()) {
                *slot = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array4, ArrayD, Axis, IxDyn};

    fn ramp(shape: [usize; 4], offset: f32) -> Array4<f32> {
        let mut counter = offset;
        Array4::from_shape_simple_fn(shape, || {
            counter += 0.37;
            (counter * 1.3).sin()
        })
    }

    #[test]
    fn appends_grow_and_keep_what_was_held() {
        let mut cache = KvCache::<f32>::new(2, 3, 2, 1).unwrap();
        let first = ramp([2, 2, 3, 3], 0.0);
        let second = ramp([2, 2, 5, 3], 7.0);
        cache.append(first.view(), first.view()).unwrap();
        cache.append(second.view(), second.view()).unwrap();
        assert_eq!(cache.len(), 8);
        assert!(cache.capacity() >= 8);
        let kv = cache.strided();
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
            cache.append(token.view(), token.view()).unwrap();
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
        cache.append(good.view(), good.view()).unwrap();
        let before = cache.clone();
        let short = Array4::<f64>::ones([1, 2, 1, 4]);
        let wide = Array4::<f64>::ones([1, 2, 2, 5]);
        assert!(cache.append(good.view(), short.view()).is_err());
        assert!(cache.append(wide.view(), wide.view()).is_err());
        assert_eq!(cache.len(), before.len());
        assert_eq!(cache.keys, before.keys);
        assert_eq!(cache.capacity(), before.capacity());
    }

    /// Attention over the cache equals attention over the same keys as plain arrays, with
    /// grouped heads decoding one token (the grouped path) and several.
    #[test]
    fn attend_matches_contiguous_attention() {
        for (queries, window) in [(1, None), (1, Some(Window::symmetric(5))), (3, None)] {
            let mut cache = KvCache::<f32>::new(2, 8, 1, 3).unwrap();
            let keys = ramp([1, 2, 40, 8], 1.0);
            let values = ramp([1, 2, 40, 8], 2.0);
            for step in 0..4 {
                let range = step * 10..(step + 1) * 10;
                cache
                    .append(
                        keys.slice(s![.., .., range.clone(), ..]),
                        values.slice(s![.., .., range, ..]),
                    )
                    .unwrap();
            }
            let query = ramp([1, 6, queries, 8], 3.0).into_dyn();
            let options = CacheAttendOptions {
                window,
                enable_gqa: true,
                ..Default::default()
            };
            let cached = cache.attend(query.view(), Mask::None, &options).unwrap();
            let plain = crate::scaled_dot_product_attention(
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
        cache.append(keys.view(), keys.view()).unwrap();
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
        alone.append(tail.view(), tail.view()).unwrap();
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
}
