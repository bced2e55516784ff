//! Multi-head attention as a layer: project the inputs (`Q = x·W_Q`, `K = x·W_K`,
//! `V = x·W_V`), run every head at once on the attention kernel, join the heads and project
//! back (`·W_O`). Optionally appends the new keys and values to a [`KvCache`] and attends over
//! all of it, for generating one token at a time.

pub(crate) mod projection;

use ndarray::{
    Array2, Array4, ArrayD, ArrayView1, ArrayView2, ArrayView3, ArrayView4, ArrayViewD, Axis,
    CowArray, Ix3, Ix4, IxDyn, Slice, Zip,
};

use crate::attention::shapes::{broadcasts, check_weights_fit};
use crate::attention::{scaled_dot_product_attention, Attention, AttentionOptions, Mask};
use crate::cache::{CacheAttendOptions, KvCache};
use crate::error::shape_str;
use crate::error::AttnError;
use crate::kernel::KernelElement;
use crate::layer::projection::linear;
use crate::memory::{self, standard_layout, zeroed};
use crate::threads::pool_for;

/// The learned matrices in the chapter's orientation (`x·W`): `w_q` is `(E, Hq·Dh)`, `w_k`
/// `(Ek, Hkv·Dh)`, `w_v` `(Ev, Hkv·Dh)`, `w_o` `(Hq·Dh, E_out)`; biases one per column.
#[derive(Clone, Copy)]
pub struct MhaWeights<'a, T> {
    pub w_q: ArrayView2<'a, T>,
    pub w_k: ArrayView2<'a, T>,
    pub w_v: ArrayView2<'a, T>,
    pub w_o: ArrayView2<'a, T>,
    pub b_q: Option<ArrayView1<'a, T>>,
    pub b_k: Option<ArrayView1<'a, T>>,
    pub b_v: Option<ArrayView1<'a, T>>,
    pub b_o: Option<ArrayView1<'a, T>>,
}

/// Query heads and key/value heads (fewer for grouped-query, 1 for multi-query attention).
#[derive(Debug, Clone, Copy)]
pub struct MhaHeads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

/// One forward call's inputs: `query` `(B, L, E)`, `key` `(B, S, Ek)`, `value` `(B, S, Ev)`.
pub struct MhaInputs<'a, T> {
    pub query: ArrayView3<'a, T>,
    pub key: ArrayView3<'a, T>,
    pub value: ArrayView3<'a, T>,
    /// Broadcastable to `(B, Hq, L, S)`: bool (true = may attend) or added to the scores.
    pub attn_mask: Mask<'a, T>,
    /// `(B, S)`, true = padding (the key is ignored), as in PyTorch.
    pub key_padding_mask: Option<ArrayView2<'a, bool>>,
    /// Top-left causal, as PyTorch's `is_causal` (with a cache, attention is always causal).
    pub is_causal: bool,
    /// Also return the per-head weights `(B, Hq, L, S)`.
    pub need_weights: bool,
    /// Worker threads for this call; `None` uses the engine-wide count.
    pub num_threads: Option<usize>,
}

/// The sizes the weights imply.
#[derive(Debug, Clone, Copy)]
struct LayerDims {
    embed_dim: usize,
    key_dim: usize,
    value_dim: usize,
    head_dim: usize,
    kv_width: usize,
    output_dim: usize,
}

fn check_matrix(
    name: &'static str,
    shape: &[usize],
    rows: Option<usize>,
    cols: usize,
    expected: &str,
) -> Result<(), AttnError> {
    if rows.is_some_and(|r| r != shape[0]) || shape[1] != cols {
        return Err(AttnError::shape(
            name,
            format!("expected shape {expected}, got {}", shape_str(shape)),
        ));
    }
    Ok(())
}

fn check_weights<T>(weights: &MhaWeights<'_, T>, heads: MhaHeads) -> Result<LayerDims, AttnError> {
    let MhaHeads {
        num_heads,
        num_kv_heads,
    } = heads;
    if num_heads == 0 {
        return Err(AttnError::value("num_heads", "must be >= 1, got 0"));
    }
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(AttnError::value(
            "num_kv_heads",
            format!("num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"),
        ));
    }
    let (embed_dim, query_width) = weights.w_q.dim();
    if query_width % num_heads != 0 {
        return Err(AttnError::shape(
            "w_q",
            format!(
                "has {query_width} columns, not a multiple of num_heads ({num_heads}); shape {}",
                shape_str(weights.w_q.shape())
            ),
        ));
    }
    let head_dim = query_width / num_heads;
    let kv_width = num_kv_heads * head_dim;
    let kv_expected = format!("(kdim, num_kv_heads * head_dim) = (kdim, {kv_width})");
    check_matrix("w_k", weights.w_k.shape(), None, kv_width, &kv_expected)?;
    check_matrix("w_v", weights.w_v.shape(), None, kv_width, &kv_expected)?;
    // The output has the query's width, so w_o is checked here and b_o only against it.
    let output_dim = embed_dim;
    check_matrix(
        "w_o",
        weights.w_o.shape(),
        Some(query_width),
        output_dim,
        &format!("(num_heads * head_dim, E) = ({query_width}, {output_dim})"),
    )?;
    for (name, bias, width) in [
        ("b_q", weights.b_q, query_width),
        ("b_k", weights.b_k, kv_width),
        ("b_v", weights.b_v, kv_width),
        ("b_o", weights.b_o, output_dim),
    ] {
        if let Some(bias) = bias {
            if bias.len() != width {
                return Err(AttnError::shape(
                    name,
                    format!("expected shape ({width},), got {}", shape_str(bias.shape())),
                ));
            }
        }
    }
    Ok(LayerDims {
        embed_dim,
        key_dim: weights.w_k.nrows(),
        value_dim: weights.w_v.nrows(),
        head_dim,
        kv_width,
        output_dim,
    })
}

fn check_inputs<T>(inputs: &MhaInputs<'_, T>, dims: &LayerDims) -> Result<(), AttnError> {
    let (batch, _, width) = inputs.query.dim();
    if width != dims.embed_dim {
        return Err(AttnError::shape(
            "query",
            format!(
                "last axis must be embed_dim = {}, got shape {}",
                dims.embed_dim,
                shape_str(inputs.query.shape())
            ),
        ));
    }
    for (name, input, source, weight, expected_width) in [
        ("key", &inputs.key, &inputs.query, "w_k", dims.key_dim),
        ("value", &inputs.value, &inputs.key, "w_v", dims.value_dim),
    ] {
        let (input_batch, _, input_width) = input.dim();
        if input_batch == batch && input_width == expected_width {
            continue;
        }
        // In self-attention the input is the query (already checked): the weight is wrong.
        if same_array(input, source) && input_batch == batch {
            return Err(AttnError::shape(
                weight,
                format!(
                    "has {expected_width} rows but the {name} input (here the query) is \
                     {input_width} wide: expected shape ({input_width}, num_kv_heads * \
                     head_dim) = ({input_width}, {}), got {}",
                    dims.kv_width,
                    shape_str(&[expected_width, dims.kv_width])
                ),
            ));
        }
        return Err(AttnError::shape(
            name,
            format!(
                "expected shape (B, S, {expected_width}) with B = {batch} like query, got {} \
                 (the last axis must equal the rows of {weight})",
                shape_str(input.shape())
            ),
        ));
    }
    if inputs.key.dim().1 != inputs.value.dim().1 {
        return Err(AttnError::shape(
            "value",
            format!(
                "has {} tokens but key has {} (key {}, value {})",
                inputs.value.dim().1,
                inputs.key.dim().1,
                shape_str(inputs.key.shape()),
                shape_str(inputs.value.shape())
            ),
        ));
    }
    Ok(())
}

/// Whether two views are the same array (self-attention passes the query as key and value).
fn same_array<T>(a: &ArrayView3<'_, T>, b: &ArrayView3<'_, T>) -> bool {
    a.as_ptr() == b.as_ptr() && a.shape() == b.shape() && a.strides() == b.strides()
}

fn check_cache<T: KernelElement>(
    cache: &KvCache<T>,
    batch: usize,
    heads: MhaHeads,
    head_dim: usize,
) -> Result<(), AttnError> {
    let fits = cache.batch() == batch
        && cache.kv_heads() == heads.num_kv_heads
        && cache.head_dim() == head_dim;
    if !fits {
        return Err(AttnError::shape(
            "cache",
            format!(
                "holds (batch, num_kv_heads, head_dim) = ({}, {}, {}) but this call needs \
                 ({batch}, {}, {head_dim})",
                cache.batch(),
                cache.kv_heads(),
                cache.head_dim(),
                heads.num_kv_heads
            ),
        ));
    }
    Ok(())
}

/// `view` with leading length-1 axes up to rank 4, and its broadcast axes (stride 0, as
/// `np.broadcast_to` makes them) shrunk to length 1, so combining it copies only what it holds.
fn as_rank4<'a, U>(view: &ArrayViewD<'a, U>) -> ArrayViewD<'a, U> {
    let mut view = view.clone();
    while view.ndim() < 4 {
        view.insert_axis_inplace(Axis(0));
    }
    for axis in 0..4 {
        if view.strides()[axis] == 0 && view.shape()[axis] > 1 {
            view.slice_axis_inplace(Axis(axis), Slice::from(0..1));
        }
    }
    view
}

/// `mask` (rank 4) combined with `may_attend` `(B, 1, 1, S)` into a new array of their
/// broadcast shape, allocated through `memory`.
fn combined<U: Copy + Default>(
    mask: &ArrayViewD<'_, U>,
    may_attend: &ArrayD<bool>,
    hidden: U,
) -> Result<ArrayD<U>, AttnError> {
    // NumPy's rule: a length-1 dim takes the other's length (which may be 0).
    let shape: Vec<usize> = (0..4)
        .map(
            |axis| match (mask.shape()[axis], may_attend.shape()[axis]) {
                (1, other) | (other, _) => other,
            },
        )
        .collect();
    let buffer = memory::filled(&shape, U::default(), "attn_mask")?;
    let mut array =
        ArrayD::from_shape_vec(IxDyn(&shape), buffer).expect("a buffer of the shape's length");
    Zip::from(&mut array)
        .and_broadcast(mask)
        .and_broadcast(may_attend)
        .for_each(|slot, &value, &keep| *slot = if keep { value } else { hidden });
    Ok(array)
}

/// The attention mask and the key padding mask as one mask for the kernel. A padding mask
/// becomes `(B, 1, 1, S)` (true = may attend) and is combined with `attn_mask` by broadcasting,
/// so nothing of size `Hq·L·S` is built unless `attn_mask` already has that size.
enum CombinedMask<'a, T> {
    Borrowed(Mask<'a, T>),
    Bool(ArrayD<bool>),
    Additive(ArrayD<T>),
}

impl<'a, T: KernelElement> CombinedMask<'a, T> {
    fn new(
        attn_mask: Mask<'a, T>,
        key_padding_mask: Option<ArrayView2<'_, bool>>,
    ) -> Result<Self, AttnError> {
        let Some(padding) = key_padding_mask else {
            return Ok(CombinedMask::Borrowed(attn_mask));
        };
        let (batch, keys) = padding.dim();
        let shape = [batch, 1, 1, keys];
        let buffer = memory::filled(&shape, false, "key_padding_mask")?;
        let mut may_attend =
            ArrayD::from_shape_vec(IxDyn(&shape), buffer).expect("a buffer of (B, 1, 1, S)");
        // Assigned through the view's own strides: transposed or reversed views work too.
        may_attend
            .view_mut()
            .into_shape_with_order((batch, keys))
            .expect("a C-order (B, 1, 1, S) array is (B, S)")
            .zip_mut_with(&padding, |keep, &is_padding| *keep = !is_padding);
        Ok(match attn_mask {
            Mask::None => CombinedMask::Bool(may_attend),
            Mask::Bool(mask) => CombinedMask::Bool(combined(&as_rank4(&mask), &may_attend, false)?),
            Mask::Additive(mask) => {
                CombinedMask::Additive(combined(&as_rank4(&mask), &may_attend, T::NEG_INFINITY)?)
            }
            Mask::Expr(_) => {
                return Err(AttnError::value(
                    "key_padding_mask",
                    "cannot be combined with a mask expression; add the padding to the \
                     expression instead (a document() id for the padding keys)",
                ))
            }
        })
    }

    fn view(&self) -> Mask<'_, T> {
        match self {
            CombinedMask::Borrowed(mask) => mask.view(),
            CombinedMask::Bool(array) => Mask::Bool(array.view()),
            CombinedMask::Additive(array) => Mask::Additive(array.view()),
        }
    }
}

/// A `(B, N, E)` input as `(B·N, E)` rows (a view: the input is already contiguous).
fn token_rows<'b, T>(input: &'b CowArray<'_, T, Ix3>) -> ArrayView2<'b, T> {
    let (batch, tokens, width) = input.dim();
    input
        .view()
        .into_shape_with_order((batch * tokens, width))
        .expect("a standard-layout (B, N, E) array reshapes to (B·N, E)")
}

/// `(B·N, H·Dh)` projected rows as the kernel's `(B, H, N, Dh)` (a view; no copy).
fn split_heads<T>(
    projected: &Array2<T>,
    (batch, tokens): (usize, usize),
    heads: usize,
) -> ArrayView4<'_, T> {
    let width = projected.ncols();
    projected
        .view()
        .into_shape_with_order((batch, tokens, heads, width / heads))
        .expect("projection rows are (B·N, H·Dh)")
        .permuted_axes([0, 2, 1, 3])
}

/// The whole layer: projections, attention over every head, output projection. Returns the
/// output `(B, L, E_out)` and, with `need_weights`, the per-head weights `(B, Hq, L, S)`.
///
/// With a `cache`, the new keys and values are appended and the queries attend over the whole
/// cache with bottom-right causal alignment (query `i` of `L` sees keys up to `len - L + i`);
/// the call must then be self-attention (`key` and `value` are `query`). If the call fails the
/// cache is left as it was.
pub fn multi_head_attention<T: KernelElement>(
    weights: &MhaWeights<'_, T>,
    heads: MhaHeads,
    inputs: MhaInputs<'_, T>,
    cache: Option<&mut KvCache<T>>,
) -> Result<Attention<T>, AttnError> {
    let dims = check_weights(weights, heads)?;
    check_inputs(&inputs, &dims)?;
    let (batch, num_queries, _) = inputs.query.dim();
    let new_keys = inputs.key.dim().1;
    let cached = match &cache {
        Some(cache) => {
            check_cache(cache, batch, heads, dims.head_dim)?;
            let (held, all_kept) = cache.after_append(new_keys);
            if !all_kept {
                return Err(AttnError::shape(
                    "query",
                    format!(
                        "{new_keys} new tokens do not all fit the bounded cache \
                         (max_len {:?}, sinks {:?}, {} held); feed fewer tokens per call",
                        cache.eviction().map(|e| e.max_len),
                        cache.eviction().map(|e| e.sinks),
                        cache.len()
                    ),
                ));
            }
            // The masks' S is what the cache holds once the new tokens are in.
            Some(held - new_keys)
        }
        None => None,
    };
    check_masks(&inputs, heads, cached)?;

    let pool = pool_for(inputs.num_threads)?;
    let project = |input: &ArrayView3<'_, T>, weight, bias, argument| {
        let rows = standard_layout(input.view(), argument)?;
        linear(&pool, token_rows(&rows), weight, bias, argument)
    };
    let projected_query = project(&inputs.query, weights.w_q, weights.b_q, "query")?;
    let projected_key = project(&inputs.key, weights.w_k, weights.b_k, "key")?;
    let projected_value = project(&inputs.value, weights.w_v, weights.b_v, "value")?;
    let query = split_heads(&projected_query, (batch, num_queries), heads.num_heads);
    let key = split_heads(&projected_key, (batch, new_keys), heads.num_kv_heads);
    let value = split_heads(&projected_value, (batch, new_keys), heads.num_kv_heads);
    let mask = CombinedMask::new(inputs.attn_mask.view(), inputs.key_padding_mask)?;

    let attention = attend_heads([query, key, value], mask.view(), &inputs, cache)?;
    let joined = join_heads(attention.output)?;
    let output = linear(&pool, joined.view(), weights.w_o, weights.b_o, "output")?
        .into_shape_with_order(IxDyn(&[batch, num_queries, dims.output_dim]))
        .expect("(B·L, E) reshapes to (B, L, E)");
    Ok(Attention {
        output,
        weights: attention.weights,
    })
}

/// The masks' shapes against `(B, Hq, L, S)` (`S` counts the `cached` tokens too), and the
/// weights' size: all checked before the cache grows, so a refused call leaves it as it was.
fn check_masks<T: KernelElement>(
    inputs: &MhaInputs<'_, T>,
    heads: MhaHeads,
    cached: Option<usize>,
) -> Result<(), AttnError> {
    let (batch, num_queries, _) = inputs.query.dim();
    let total_keys = cached.unwrap_or(0) + inputs.key.dim().1;
    let weights_shape = [batch, heads.num_heads, num_queries, total_keys];
    if let Some(padding) = &inputs.key_padding_mask {
        if padding.dim() != (batch, total_keys) {
            let counted = if cached.is_some() {
                " (S counts the cached tokens and the new ones)"
            } else {
                ""
            };
            return Err(AttnError::shape(
                "key_padding_mask",
                format!(
                    "expected shape (B, S) = ({batch}, {total_keys}){counted}, got {}",
                    shape_str(padding.shape())
                ),
            ));
        }
    }
    if let Some(shape) = inputs.attn_mask.shape() {
        if !broadcasts(shape, &weights_shape) {
            return Err(AttnError::shape(
                "attn_mask",
                format!(
                    "shape {} does not broadcast to (B, num_heads, L, S) = {}",
                    shape_str(shape),
                    shape_str(&weights_shape)
                ),
            ));
        }
    }
    if inputs.need_weights {
        check_weights_fit::<T>(&weights_shape)?;
    }
    Ok(())
}

/// Attention of every head: over `key` and `value` alone, or, with a `cache`, after appending
/// them to it (undone if the attention fails).
fn attend_heads<T: KernelElement>(
    [query, key, value]: [ArrayView4<'_, T>; 3],
    mask: Mask<'_, T>,
    inputs: &MhaInputs<'_, T>,
    cache: Option<&mut KvCache<T>>,
) -> Result<Attention<T>, AttnError> {
    let Some(cache) = cache else {
        let options = AttentionOptions {
            is_causal: inputs.is_causal,
            enable_gqa: true,
            return_weights: inputs.need_weights,
            num_threads: inputs.num_threads,
            ..Default::default()
        };
        return scaled_dot_product_attention(
            query.into_dyn(),
            key.into_dyn(),
            value.into_dyn(),
            mask,
            &options,
        );
    };
    let held = cache.len();
    cache.append(key, value, inputs.num_threads)?;
    let options = CacheAttendOptions {
        enable_gqa: true,
        return_weights: inputs.need_weights,
        num_threads: inputs.num_threads,
        ..Default::default()
    };
    cache
        .attend(query.into_dyn(), mask, &options)
        .inspect_err(|_| cache.truncate(held))
}

/// The heads side by side again: `(B, Hq, L, Dh)` becomes `(B·L, Hq·Dh)` rows.
fn join_heads<T: KernelElement>(per_head: ArrayD<T>) -> Result<Array2<T>, AttnError> {
    let per_head = per_head
        .into_dimensionality::<Ix4>()
        .expect("attention output is (B, Hq, L, Dh)");
    let (batch, heads, tokens, head_dim) = per_head.dim();
    let mut joined = Array4::from_shape_vec(
        (batch, tokens, heads, head_dim),
        zeroed(&[batch, tokens, heads, head_dim], "output")?,
    )
    .expect("a buffer of B·L·Hq·Dh elements");
    joined.assign(&per_head.permuted_axes([0, 2, 1, 3]));
    Ok(joined
        .into_shape_with_order((batch * tokens, heads * head_dim))
        .expect("standard layout (B, L, Hq, Dh) reshapes to (B·L, Hq·Dh)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array1, Array3, Axis};

    fn filled<D: ndarray::Dimension>(shape: D, seed: f64) -> ndarray::Array<f64, D> {
        let mut counter = seed;
        ndarray::Array::from_shape_simple_fn(shape, || {
            counter += 0.618;
            (counter * 2.3).sin()
        })
    }

    struct Layer {
        w: [Array2<f64>; 4],
        b: [Array1<f64>; 4],
    }

    impl Layer {
        fn new(embed: usize, heads: MhaHeads) -> Self {
            let head_dim = embed / heads.num_heads;
            let kv = heads.num_kv_heads * head_dim;
            Layer {
                w: [
                    filled(ndarray::Ix2(embed, embed), 0.1) * 0.3,
                    filled(ndarray::Ix2(embed, kv), 0.2) * 0.3,
                    filled(ndarray::Ix2(embed, kv), 0.3) * 0.3,
                    filled(ndarray::Ix2(embed, embed), 0.4) * 0.3,
                ],
                b: [
                    filled(ndarray::Ix1(embed), 0.5),
                    filled(ndarray::Ix1(kv), 0.6),
                    filled(ndarray::Ix1(kv), 0.7),
                    filled(ndarray::Ix1(embed), 0.8),
                ],
            }
        }

        fn weights(&self) -> MhaWeights<'_, f64> {
            MhaWeights {
                w_q: self.w[0].view(),
                w_k: self.w[1].view(),
                w_v: self.w[2].view(),
                w_o: self.w[3].view(),
                b_q: Some(self.b[0].view()),
                b_k: Some(self.b[1].view()),
                b_v: Some(self.b[2].view()),
                b_o: Some(self.b[3].view()),
            }
        }

        /// The layer over `x` attending to itself without a causal mask, through `cache`
        /// when given.
        fn self_attend(
            &self,
            heads: MhaHeads,
            x: ArrayView3<'_, f64>,
            cache: Option<&mut KvCache<f64>>,
        ) -> Result<Attention<f64>, AttnError> {
            multi_head_attention(&self.weights(), heads, self_attention(x, false), cache)
        }
    }

    fn self_attention(x: ArrayView3<'_, f64>, is_causal: bool) -> MhaInputs<'_, f64> {
        MhaInputs {
            query: x,
            key: x,
            value: x,
            attn_mask: Mask::None,
            key_padding_mask: None,
            is_causal,
            need_weights: false,
            num_threads: None,
        }
    }

    /// Four query heads over two kv heads.
    const HEADS: MhaHeads = MhaHeads {
        num_heads: 4,
        num_kv_heads: 2,
    };

    #[test]
    fn decoding_token_by_token_equals_one_causal_forward() {
        let (heads, layer) = (HEADS, Layer::new(16, HEADS));
        let x: Array3<f64> = filled(ndarray::Ix3(2, 9, 16), 1.0);
        let full = multi_head_attention(
            &layer.weights(),
            heads,
            self_attention(x.view(), true),
            None,
        )
        .unwrap()
        .output;
        let mut cache = KvCache::new(2, 4, 2, 0).unwrap();
        let prompt = x.slice(s![.., ..5, ..]);
        let mut steps = vec![
            layer
                .self_attend(heads, prompt, Some(&mut cache))
                .unwrap()
                .output,
        ];
        for token in 5..9 {
            let step = x.slice(s![.., token..token + 1, ..]);
            let output = layer.self_attend(heads, step, Some(&mut cache)).unwrap();
            steps.push(output.output);
        }
        let views: Vec<_> = steps.iter().map(|step| step.view()).collect();
        let decoded = ndarray::concatenate(Axis(1), &views).unwrap();
        let difference = (&decoded - &full)
            .iter()
            .fold(0.0f64, |m, d| m.max(d.abs()));
        assert!(difference < 1e-12, "{difference}");
        assert_eq!(cache.len(), 9);
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let (heads, layer) = (HEADS, Layer::new(16, HEADS));
        let narrow: Array3<f64> = Array3::zeros((1, 3, 12));
        let error = layer.self_attend(heads, narrow.view(), None).err().unwrap();
        assert!(error.to_string().starts_with("query: "), "{error}");
        let bad_heads = MhaHeads {
            num_heads: 4,
            num_kv_heads: 3,
        };
        let x: Array3<f64> = Array3::zeros((1, 3, 16));
        let error = layer.self_attend(bad_heads, x.view(), None).err().unwrap();
        assert!(error.to_string().starts_with("num_kv_heads: "), "{error}");
        let mut cache = KvCache::new(1, 4, 1, 0).unwrap();
        let error = layer
            .self_attend(heads, x.view(), Some(&mut cache))
            .err()
            .unwrap();
        assert!(error.to_string().starts_with("cache: "), "{error}");
        assert!(cache.is_empty());
    }
}
