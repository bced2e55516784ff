//! Core tests of the backward pass: both strategies at every instruction set against the chain
//! rule written out in f64 through the full weights, and bitwise thread invariance.

use ndarray::{ArrayD, IxDyn};

use crate::attention::backward::{backward_at_level, BackwardInputs};
use crate::attention::AttentionOptions;
use crate::attention::{
    scaled_dot_product_attention_with_lse, scaled_dot_product_attention_with_mods, Mask, ScoreMods,
};
use crate::bounds::CausalAlignment;
use crate::bounds::Window;
use crate::kernel::KernelElement;
use crate::simd::SimdLevel;

/// Deterministic numbers in [-2, 2).
fn filled<T: KernelElement>(shape: &[usize], seed: u64) -> ArrayD<T> {
    let mut state = seed;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        T::from_f64(((state >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0)
    })
}

/// `(dq, dk, dv)` in f64 from the forward's exact weights: `dV = Pᵀ·dO`,
/// `dS = P ∘ (dO·Vᵀ − rowsum(P ∘ dO·Vᵀ))`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, each kv
/// head summing its query heads; with a softcap `c`, `dS` also takes the cap's derivative
/// `1 - tanh²(scale·q·k / c)`. Inputs are `(H, L, D)`-shaped, flattened.
fn chain_rule(
    arrays: [&ArrayD<f64>; 5],
    weights: &ArrayD<f64>,
    group: usize,
    scale: f64,
    softcap: Option<f64>,
) -> [Vec<f64>; 3] {
    let [q, k, v, grad_out, _] = arrays;
    let (heads, l, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (s, dv) = (k.shape()[1], v.shape()[2]);
    let (mut dq, mut dk, mut dvv) = (
        vec![0.0; heads * l * d],
        vec![0.0; k.len()],
        vec![0.0; v.len()],
    );
    for h in 0..heads {
        let kv = h / group;
        for i in 0..l {
            let p = |j: usize| weights[[h, i, j]];
            let dp: Vec<f64> = (0..s)
                .map(|j| (0..dv).map(|c| grad_out[[h, i, c]] * v[[kv, j, c]]).sum())
                .collect();
            let row: f64 = (0..s).map(|j| p(j) * dp[j]).sum();
            for j in 0..s {
                let cap_slope = softcap.map_or(1.0, |cap| {
                    let score: f64 = (0..d).map(|c| q[[h, i, c]] * k[[kv, j, c]]).sum();
                    1.0 - (scale * score / cap).tanh().powi(2)
                });
                let ds = p(j) * (dp[j] - row) * cap_slope;
                for c in 0..d {
                    dq[(h * l + i) * d + c] += scale * ds * k[[kv, j, c]];
                    dk[(kv * s + j) * d + c] += scale * ds * q[[h, i, c]];
                }
                for c in 0..dv {
                    dvv[(kv * s + j) * dv + c] += p(j) * grad_out[[h, i, c]];
                }
            }
        }
    }
    [dq, dk, dvv]
}

fn check<T: KernelElement>(heads: usize, kv_heads: usize, tolerance: f64, mods: &ScoreMods<'_>) {
    let (l, s, d, dv) = (70, 90, 12, 10);
    let q = filled::<T>(&[heads, l, d], 1);
    let k = filled::<T>(&[kv_heads, s, d], 2);
    let v = filled::<T>(&[kv_heads, s, dv], 3);
    let grad_out = filled::<T>(&[heads, l, dv], 4);
    let mask = ArrayD::from_shape_fn(IxDyn(&[l, s]), |index| (index[0] * 7 + index[1]) % 5 != 0);
    let options = AttentionOptions {
        is_causal: true,
        alignment: CausalAlignment::BottomRight,
        window: Some(Window {
            left: Some(40),
            right: None,
        }),
        scale: Some(0.4),
        enable_gqa: true,
        ..Default::default()
    };
    let forward = scaled_dot_product_attention_with_lse(
        q.view(),
        k.view(),
        v.view(),
        Mask::Bool(mask.view()),
        &options,
        mods,
    )
    .unwrap();
    let as_f64 = |a: &ArrayD<T>| a.mapv(|x| x.to_f64());
    let weights = scaled_dot_product_attention_with_mods(
        as_f64(&q).view(),
        as_f64(&k).view(),
        as_f64(&v).view(),
        Mask::Bool(mask.view()),
        &AttentionOptions {
            return_weights: true,
            ..options
        },
        mods,
    )
    .unwrap()
    .weights
    .unwrap();
    let arrays = [&q, &k, &v, &grad_out].map(as_f64);
    let out = as_f64(&forward.attention.output);
    let expected = chain_rule(
        [&arrays[0], &arrays[1], &arrays[2], &arrays[3], &out],
        &weights,
        heads / kv_heads,
        0.4,
        mods.softcap,
    );
    for level in SimdLevel::supported() {
        let mut first: Option<Vec<ArrayD<T>>> = None;
        for threads in [1, 2, 3] {
            let inputs = BackwardInputs {
                grad_out: grad_out.view(),
                query: q.view(),
                key: k.view(),
                value: v.view(),
                out: forward.attention.output.view(),
                lse: forward.lse.view(),
            };
            let options = AttentionOptions {
                num_threads: Some(threads),
                ..options
            };
            let grads =
                backward_at_level(level, inputs, Mask::Bool(mask.view()), &options, mods).unwrap();
            let grads = vec![grads.grad_query, grads.grad_key, grads.grad_value];
            for (got, want) in grads.iter().zip(&expected) {
                let largest = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                for (g, w) in got.iter().zip(want) {
                    let error = (g.to_f64() - w).abs();
                    assert!(error <= tolerance * largest, "{level:?} {g:?} vs {w}");
                }
            }
            match &first {
                None => first = Some(grads),
                Some(first) => assert!(first == &grads, "{level:?}: {threads} threads differ"),
            }
        }
    }
}

#[test]
fn two_passes_match_the_chain_rule_at_every_level() {
    let plain = ScoreMods::default();
    check::<f32>(4, 2, 1e-4, &plain);
    check::<f64>(4, 2, 1e-10, &plain);
}

#[test]
fn a_task_per_kv_head_matches_the_chain_rule_at_every_level() {
    let plain = ScoreMods::default();
    check::<f32>(16, 8, 1e-4, &plain);
    check::<f64>(8, 8, 1e-10, &plain);
}

/// One slope per query head, of both signs.
fn slopes(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| 0.3 - 0.1 * h as f64).collect()
}

#[test]
fn softcapped_scores_chain_through_the_cap_at_every_level() {
    // A cap of 1 with scores up to about 2 saturates tanh, where its derivative is smallest.
    let capped = ScoreMods {
        softcap: Some(1.0),
        alibi_slopes: None,
    };
    check::<f32>(4, 2, 1e-4, &capped);
    check::<f64>(4, 2, 1e-10, &capped);
    check::<f32>(16, 8, 1e-4, &capped);
    check::<f64>(8, 8, 1e-10, &capped);
}

#[test]
fn alibi_and_a_softcap_together_match_the_chain_rule_at_every_level() {
    for heads in [4, 16] {
        let slopes = slopes(heads);
        let both = ScoreMods {
            softcap: Some(2.5),
            alibi_slopes: Some(&slopes),
        };
        let alibi = ScoreMods {
            softcap: None,
            alibi_slopes: Some(&slopes),
        };
        for mods in [both, alibi] {
            check::<f32>(heads, heads / 2, 1e-4, &mods);
            check::<f64>(heads, heads / 2, 1e-10, &mods);
        }
    }
}
