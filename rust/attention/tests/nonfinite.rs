//! The non-finite rule at every instruction set and on every kernel path: NaN in what a query
//! sees (its query row, a visible key, value or mask cell) makes its output and weights row
//! NaN, what it cannot see never reaches it, and a scale that overflows the type is refused.

use ndarray::{s, ArrayD, IxDyn};

use crate::attention::attention_at_level;
use crate::attention::schedule::KV_CHUNK;
use crate::attention::{Attention, AttentionOptions, Mask};
use crate::bounds::CausalAlignment;
use crate::error::AttnError;
use crate::kernel::KernelElement;
use crate::simd::SimdLevel;

/// (L, S): one row by dot products, a few rows over split keys, tiled, tiled over split keys.
const SHAPES: [(usize, usize); 4] = [
    (1, 10),
    (3, KV_CHUNK + 300),
    (70, 300),
    (40, KV_CHUNK + 300),
];
const DEPTH: usize = 8;

fn levels() -> Vec<SimdLevel> {
    SimdLevel::supported()
}

/// Smooth values in [-1, 1] that differ from cell to cell.
fn wave<T: KernelElement>(shape: &[usize], phase: f64) -> ArrayD<T> {
    let mut n = 0.0;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        n += 1.0;
        T::from_f64((n * 0.618 + phase).sin())
    })
}

#[derive(Clone, Copy, Debug)]
enum Poison {
    Query,
    Key,
    Value,
    MaskNan,
    MaskInf,
}

/// Poisons one query row or key `j`, which bottom-right causal attention shows to the rows from
/// `L / 2` on; checks that exactly the rows that see it are NaN, on both kernel paths.
fn check_poison<T: KernelElement>(level: SimdLevel, (l, s): (usize, usize), poison: Poison) {
    let nan = T::from_f64(f64::NAN);
    let (q_shape, kv_shape) = ([2, l, DEPTH], [2, s, DEPTH]);
    let (mut q, mut k, mut v) = (
        wave::<T>(&q_shape, 0.0),
        wave(&kv_shape, 1.0),
        wave(&kv_shape, 2.0),
    );
    let mut mask = ArrayD::from_elem(IxDyn(&[l, s]), T::ZERO);
    let (poisoned_key, first_seeing) = (s - l + l / 2, l / 2);
    match poison {
        Poison::Query => q.slice_mut(s![.., first_seeing, 0]).fill(nan),
        Poison::Key => k.slice_mut(s![.., poisoned_key, 0]).fill(nan),
        Poison::Value => v.slice_mut(s![.., poisoned_key, 0]).fill(nan),
        Poison::MaskNan => mask.slice_mut(s![.., poisoned_key]).fill(nan),
        Poison::MaskInf => mask
            .slice_mut(s![.., poisoned_key])
            .fill(T::from_f64(f64::INFINITY)),
    }
    let sees = |row: usize| match poison {
        Poison::Query => row == first_seeing,
        _ => row >= first_seeing,
    };
    for return_weights in [false, true] {
        let options = AttentionOptions {
            is_causal: true,
            alignment: CausalAlignment::BottomRight,
            return_weights,
            ..Default::default()
        };
        let result = attention_at_level(
            level,
            q.view(),
            k.view(),
            v.view(),
            Mask::Additive(mask.view()),
            &options,
        )
        .unwrap();
        let case = format!("{level:?} {l}x{s} {poison:?} weights={return_weights}");
        for row in 0..l {
            let out = result.output.slice(s![.., row, ..]);
            if !sees(row) {
                assert!(out.iter().all(|x| x.is_finite()), "{case}: row {row}");
            } else if matches!(poison, Poison::Value) {
                let column = result.output.slice(s![.., row, 0]);
                assert!(
                    column.iter().all(|x| x.to_f64().is_nan()),
                    "{case}: row {row}"
                );
            } else {
                assert!(out.iter().all(|x| x.to_f64().is_nan()), "{case}: row {row}");
            }
            if let Some(weights) = &result.weights {
                let weights = weights.slice(s![.., row, ..]);
                if sees(row) && !matches!(poison, Poison::Value) {
                    assert!(
                        weights.iter().all(|x| x.to_f64().is_nan()),
                        "{case}: row {row}"
                    );
                } else {
                    assert!(weights.iter().all(|x| x.is_finite()), "{case}: row {row}");
                }
            }
        }
    }
}

#[test]
fn nan_reaches_exactly_the_rows_that_see_it() {
    for level in levels() {
        for shape in SHAPES {
            for poison in [
                Poison::Query,
                Poison::Key,
                Poison::Value,
                Poison::MaskNan,
                Poison::MaskInf,
            ] {
                check_poison::<f32>(level, shape, poison);
                check_poison::<f64>(level, shape, poison);
            }
        }
    }
}

#[test]
fn a_nan_mask_cell_at_a_causally_hidden_key_stays_hidden() {
    let (l, s) = (70, 300);
    let (q, k, v) = (
        wave::<f32>(&[l, DEPTH], 0.0),
        wave::<f32>(&[s, DEPTH], 1.0),
        wave::<f32>(&[s, DEPTH], 2.0),
    );
    // Key 299 is hidden from every row by top-left causal attention.
    let mask = ArrayD::from_shape_fn(IxDyn(&[l, s]), |i| if i[1] == 299 { f32::NAN } else { 0.0 });
    for level in levels() {
        for return_weights in [false, true] {
            let options = AttentionOptions {
                is_causal: true,
                return_weights,
                ..Default::default()
            };
            let mask = Mask::Additive(mask.view());
            let result =
                attention_at_level(level, q.view(), k.view(), v.view(), mask, &options).unwrap();
            assert!(result.output.iter().all(|x| x.is_finite()), "{level:?}");
        }
    }
}

#[test]
fn a_scale_that_overflows_the_element_type_is_refused() {
    let (q, k, v) = (
        wave::<f32>(&[4, DEPTH], 0.0),
        wave::<f32>(&[6, DEPTH], 1.0),
        wave::<f32>(&[6, DEPTH], 2.0),
    );
    let options = AttentionOptions {
        scale: Some(1e39),
        ..Default::default()
    };
    let result = unmasked_portable(&q, &k, &v, &options);
    assert!(
        matches!(
            result,
            Err(AttnError::Value {
                argument: "scale",
                ..
            })
        ),
        "{:?}",
        result.err()
    );
    let (q, k, v) = (q.mapv(f64::from), k.mapv(f64::from), v.mapv(f64::from));
    let result = unmasked_portable(&q, &k, &v, &options).unwrap();
    assert!(result.output.iter().all(|x| x.is_finite()));
}

/// Attention without a mask at the portable level.
fn unmasked_portable<T: KernelElement>(
    q: &ArrayD<T>,
    k: &ArrayD<T>,
    v: &ArrayD<T>,
    options: &AttentionOptions,
) -> Result<Attention<T>, AttnError> {
    attention_at_level(
        SimdLevel::Portable,
        q.view(),
        k.view(),
        v.view(),
        Mask::None,
        options,
    )
}
