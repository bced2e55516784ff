//! Core tests: the tiled kernel at every instruction set against a naive float64 attention,
//! on the tiling edge cases (lengths off the tile sizes, L != S, one row, one key).

use ndarray::{ArrayD, IxDyn};

use crate::attention::schedule::KV_CHUNK;
use crate::attention::{attention_at_level, attention_with_mods_at_level, ScoreMods};
use crate::attention::{AttentionOptions, Mask};
use crate::bounds::{Bounds, CausalAlignment, Window};
use crate::error::AttnError;
use crate::kernel::KernelElement;
use crate::kernel::{KEY_BLOCK, QUERY_BLOCK};
use crate::simd::SimdLevel;

/// Deterministic pseudo-random numbers in [-2, 2) (no dependency needed for tests).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
    }

    fn array<T: KernelElement>(&mut self, shape: &[usize]) -> ArrayD<T> {
        ArrayD::from_shape_fn(IxDyn(shape), |_| T::from_f64(self.next()))
    }
}

/// Naive attention in f64 for one head: weights (L x S) and output (L x Dv).
fn naive_head(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: (usize, usize, usize, usize),
    bounds: &Bounds,
    scale: f64,
    visible_mask: &dyn Fn(usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let (l, s, d, dv) = dims;
    let mut weights = vec![0.0; l * s];
    let mut out = vec![0.0; l * dv];
    for i in 0..l {
        let visible: Vec<usize> = bounds.row_keys(i).filter(|&j| visible_mask(i, j)).collect();
        if visible.is_empty() {
            continue;
        }
        let scores: Vec<f64> = visible
            .iter()
            .map(|&j| (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() * scale)
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for (&j, e) in visible.iter().zip(&exps) {
            weights[i * s + j] = e / total;
            for c in 0..dv {
                out[i * dv + c] += e / total * v[j * dv + c];
            }
        }
    }
    (weights, out)
}

fn levels() -> Vec<SimdLevel> {
    SimdLevel::supported()
}

fn to_f64<T: KernelElement>(array: &ArrayD<T>) -> Vec<f64> {
    array.iter().map(|x| x.to_f64()).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Checks one (L, S, D, Dv, options) case on one head at every level, with and without weights.
fn check_case<T: KernelElement>(
    l: usize,
    s: usize,
    d: usize,
    dv: usize,
    options: AttentionOptions,
    tolerance: f64,
) {
    let mut rng = Lcg(((l * 131 + s) * 31 + d) as u64);
    let q = rng.array::<T>(&[l, d]);
    let k = rng.array::<T>(&[s, d]);
    let v = rng.array::<T>(&[s, dv]);
    let bounds = Bounds::new(l, s, options.is_causal, options.alignment, options.window);
    let scale = options.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (expected_weights, expected_out) = naive_head(
        &to_f64(&q),
        &to_f64(&k),
        &to_f64(&v),
        (l, s, d, dv),
        &bounds,
        scale,
        &|_, _| true,
    );
    for level in levels() {
        for return_weights in [false, true] {
            let options = AttentionOptions {
                return_weights,
                ..options
            };
            let result =
                attention_at_level(level, q.view(), k.view(), v.view(), Mask::None, &options)
                    .unwrap();
            assert_eq!(result.output.shape(), &[l, dv]);
            let error = max_abs_diff(&to_f64(&result.output), &expected_out);
            assert!(
                error <= tolerance,
                "{level:?} L={l} S={s} D={d} Dv={dv} weights={return_weights}: error {error}"
            );
            if let Some(weights) = result.weights {
                let error = max_abs_diff(&to_f64(&weights), &expected_weights);
                assert!(error <= tolerance, "{level:?} weights error {error}");
            }
        }
    }
}

#[test]
fn tiling_edge_cases_match_naive() {
    let lengths = [1, 3, QUERY_BLOCK - 1, QUERY_BLOCK + 1, KEY_BLOCK + 5];
    for &l in &lengths {
        for &s in &[1, 2, KEY_BLOCK - 1, KEY_BLOCK + 17] {
            for causal in [false, true] {
                let options = AttentionOptions {
                    is_causal: causal,
                    alignment: CausalAlignment::BottomRight,
                    ..Default::default()
                };
                check_case::<f32>(l, s, 20, 36, options, 2e-5);
            }
        }
    }
}

#[test]
fn head_dims_off_the_vector_width() {
    for (d, dv) in [(1, 1), (7, 17), (64, 64), (128, 80), (33, 130)] {
        check_case::<f32>(70, 90, d, dv, AttentionOptions::default(), 2e-5);
        check_case::<f64>(70, 90, d, dv, AttentionOptions::default(), 1e-12);
    }
}

#[test]
fn windows_and_alignments() {
    for alignment in [CausalAlignment::TopLeft, CausalAlignment::BottomRight] {
        for window in [
            Window::symmetric(1),
            Window::symmetric(40),
            Window {
                left: Some(300),
                right: Some(0),
            },
            Window {
                left: None,
                right: Some(5),
            },
        ] {
            let options = AttentionOptions {
                is_causal: true,
                alignment,
                window: Some(window),
                scale: Some(0.3),
                ..Default::default()
            };
            check_case::<f32>(150, 600, 16, 16, options, 2e-5);
            check_case::<f64>(
                150,
                600,
                16,
                16,
                AttentionOptions {
                    is_causal: false,
                    ..options
                },
                1e-12,
            );
        }
    }
}

#[test]
fn decode_splits_keys_and_matches() {
    // One query against more keys than one chunk: the split-and-merge path.
    let s = 2 * KV_CHUNK + 100;
    check_case::<f32>(1, s, 32, 32, AttentionOptions::default(), 2e-5);
    let options = AttentionOptions {
        is_causal: true,
        alignment: CausalAlignment::BottomRight,
        window: Some(Window::symmetric(KV_CHUNK + 7)),
        ..Default::default()
    };
    check_case::<f64>(3, s, 8, 8, options, 1e-12);
}

#[test]
fn masks_hide_keys_and_nan_does_not_leak() {
    let (l, s, d) = (70, 300, 16);
    let mut rng = Lcg(7);
    let q = rng.array::<f32>(&[2, l, d]);
    let mut k = rng.array::<f32>(&[2, s, d]);
    let mut v = rng.array::<f32>(&[2, s, d]);
    // Key 5 is hidden from every query by the mask, and holds NaN in both K and V.
    let mask = ArrayD::from_shape_fn(IxDyn(&[l, s]), |index| index[1] != 5 && index[0] != 9);
    for head in 0..2 {
        for c in 0..d {
            k[[head, 5, c]] = f32::NAN;
            v[[head, 5, c]] = f32::NAN;
        }
    }
    let additive = mask.mapv(|keep| if keep { 0.0f32 } else { f32::NEG_INFINITY });
    for level in levels() {
        for return_weights in [false, true] {
            let options = AttentionOptions {
                return_weights,
                ..Default::default()
            };
            for mask in [Mask::Bool(mask.view()), Mask::Additive(additive.view())] {
                let result =
                    attention_at_level(level, q.view(), k.view(), v.view(), mask, &options)
                        .unwrap();
                assert!(result.output.iter().all(|x| x.is_finite()), "{level:?}");
                // Row 9 sees nothing: zeros.
                assert!(result
                    .output
                    .slice(ndarray::s![.., 9, ..])
                    .iter()
                    .all(|&x| x == 0.0));
                if let Some(weights) = result.weights {
                    assert!(weights.iter().all(|x| x.is_finite()));
                    assert!(weights
                        .slice(ndarray::s![.., .., 5])
                        .iter()
                        .all(|&x| x == 0.0));
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Lcg(11);
    let q = rng.array::<f32>(&[2, 3, 200, 24]);
    let k = rng.array::<f32>(&[2, 3, 700, 24]);
    let v = rng.array::<f32>(&[2, 3, 700, 24]);
    let options = AttentionOptions {
        is_causal: true,
        ..Default::default()
    };
    let run = |threads: usize| {
        crate::threads::set_num_threads(threads).unwrap();
        crate::attention::scaled_dot_product_attention(
            q.view(),
            k.view(),
            v.view(),
            Mask::None,
            &options,
        )
        .unwrap()
        .output
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(5));
}

#[test]
fn empty_sequences_give_empty_or_zero_output() {
    for (l, s) in [(0, 5), (5, 0), (0, 0)] {
        let q = ArrayD::<f32>::zeros(IxDyn(&[2, l, 8]));
        let k = ArrayD::<f32>::zeros(IxDyn(&[2, s, 8]));
        let v = ArrayD::<f32>::zeros(IxDyn(&[2, s, 4]));
        let options = AttentionOptions {
            return_weights: true,
            ..Default::default()
        };
        let result = crate::attention::scaled_dot_product_attention(
            q.view(),
            k.view(),
            v.view(),
            Mask::None,
            &options,
        )
        .unwrap();
        assert_eq!(result.output.shape(), &[2, l, 4]);
        assert!(result.output.iter().all(|&x| x == 0.0));
        assert_eq!(result.weights.unwrap().shape(), &[2, l, s]);
    }
}

#[test]
fn shape_errors_name_the_argument() {
    let q = ArrayD::<f32>::zeros(IxDyn(&[2, 4, 8]));
    let bad_depth = ArrayD::<f32>::zeros(IxDyn(&[2, 4, 7]));
    let fewer_heads = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 8]));
    let error_of = |key: &ArrayD<f32>, value: &ArrayD<f32>, mask: Mask<'_, f32>| {
        let options = AttentionOptions::default();
        crate::attention::scaled_dot_product_attention(
            q.view(),
            key.view(),
            value.view(),
            mask,
            &options,
        )
        .err()
        .unwrap()
    };
    let error = error_of(&bad_depth, &q, Mask::None);
    assert!(
        matches!(
            error,
            AttnError::Shape {
                argument: "key",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("(2, 4, 7)"));
    let error = error_of(&fewer_heads, &fewer_heads, Mask::None);
    assert!(error.to_string().contains("enable_gqa"), "{error}");
    let mask = ArrayD::from_elem(IxDyn(&[3, 4, 4]), true);
    let error = error_of(&q, &q, Mask::Bool(mask.view()));
    assert!(
        matches!(
            error,
            AttnError::Shape {
                argument: "attn_mask",
                ..
            }
        ),
        "{error}"
    );
}

/// The output of one head with scores `cap·tanh(s / cap)`, in f64.
fn naive_softcapped(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dims: (usize, usize, usize),
    cap: f64,
) -> Vec<f64> {
    let (l, s, d) = dims;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; l * d];
    for i in 0..l {
        let scores: Vec<f64> = (0..s)
            .map(|j| {
                let score = (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() * scale;
                cap * (score / cap).tanh()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for (j, e) in exps.iter().enumerate() {
            for c in 0..d {
                out[i * d + c] += e / total * v[j * d + c];
            }
        }
    }
    out
}

fn check_softcap<T: KernelElement>(cap: f64, tolerance: f64) {
    let (l, s, d) = (9, 37, 16);
    let mut rng = Lcg(7);
    let (q, k, v) = (
        rng.array::<T>(&[l, d]),
        rng.array::<T>(&[s, d]),
        rng.array::<T>(&[s, d]),
    );
    let expected = naive_softcapped(&to_f64(&q), &to_f64(&k), &to_f64(&v), (l, s, d), cap);
    let mods = ScoreMods {
        softcap: Some(cap),
        alibi_slopes: None,
    };
    let options = AttentionOptions::default();
    for level in levels() {
        let result = attention_with_mods_at_level(
            level,
            q.view(),
            k.view(),
            v.view(),
            Mask::None,
            &options,
            &mods,
        )
        .unwrap();
        let error = max_abs_diff(&to_f64(&result.output), &expected);
        assert!(
            error <= tolerance,
            "{level:?} {} cap {cap:e}: error {error}",
            T::TYPE_NAME
        );
    }
}

/// Softcapping is exact for every cap a type can carry: tanh written with exponentials cancels
/// once `s / cap` is small (a cap of 1e8 used to flatten float32 attention to uniform), so
/// small ratios take tanh's series. Caps of both kinds of score (saturated and linear) are
/// checked at every level.
#[test]
fn softcap_is_accurate_for_every_cap() {
    for cap in [0.3, 2.0, 30.0, 1e4, 1e6, 1e8, 1e15, 1e30] {
        check_softcap::<f32>(cap, 2e-6);
        check_softcap::<f64>(cap, 1e-13);
    }
    check_softcap::<f64>(1e300, 1e-13);
}

/// A softcap or ALiBi slope the type cannot carry is refused, naming the argument, as an
/// overflowing scale is, instead of giving NaN.
#[test]
fn out_of_range_softcaps_and_slopes_are_refused() {
    let mut rng = Lcg(3);
    let (q, k) = (rng.array::<f32>(&[2, 4, 8]), rng.array::<f32>(&[2, 4, 8]));
    let call = |mods: &ScoreMods<'_>| {
        attention_with_mods_at_level(
            SimdLevel::Portable,
            q.view(),
            k.view(),
            k.view(),
            Mask::None,
            &AttentionOptions::default(),
            mods,
        )
    };
    for cap in [1e39, 1e-39] {
        let mods = ScoreMods {
            softcap: Some(cap),
            alibi_slopes: None,
        };
        let error = call(&mods).err().expect("refused").to_string();
        assert!(
            error.contains("softcap") && error.contains("float32"),
            "{error}"
        );
    }
    let with_slopes = |slopes: &[f64]| {
        call(&ScoreMods {
            softcap: None,
            alibi_slopes: Some(slopes),
        })
    };
    let error = with_slopes(&[0.5, 1e38])
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("alibi_slopes") && error.contains("1e38"),
        "{error}"
    );
    let finite = with_slopes(&[0.5, 1e30]).unwrap();
    assert!(finite.output.iter().all(|x| x.is_finite()));
}
