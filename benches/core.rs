//! The core timed without Python, one row per kind of call the engine sees: the tiny call
//! whose cost is all fixed overhead, a causal prefill, a sliding window, decoding one token
//! against a long cache (grouped heads), and the weights path.
//!
//! `cargo bench --bench core` (threads from `ATTNSCOPE_NUM_THREADS`, else every CPU);
//! `cargo bench --bench core -- tiny` runs the rows whose name contains "tiny".

use std::hint::black_box;

use attnscope::{scaled_dot_product_attention, AttentionOptions, Float, KvCache, Mask, Window};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array4, ArrayD};

/// Deterministic inputs in [-1, 1) without a random-number dependency.
fn filled<T: Float>(shape: [usize; 4], seed: u64) -> ArrayD<T> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    Array4::from_shape_simple_fn(shape, || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        T::from_f64((state >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
    })
    .into_dyn()
}

/// One SDPA row: `(B, H, L, D)` queries against `(B, Hkv, S, D)` keys and values, given as
/// `[B, H, Hkv, L, S, D]`.
fn sdpa_row(
    criterion: &mut Criterion,
    name: &str,
    [batch, heads, kv_heads, length, keys, depth]: [usize; 6],
    options: AttentionOptions,
) {
    let query = filled::<f32>([batch, heads, length, depth], 1);
    let key = filled::<f32>([batch, kv_heads, keys, depth], 2);
    let value = filled::<f32>([batch, kv_heads, keys, depth], 3);
    let mut group = criterion.benchmark_group("sdpa");
    group.throughput(Throughput::Elements((batch * heads * length * keys) as u64));
    group.bench_function(name, |bench| {
        bench.iter(|| {
            scaled_dot_product_attention(
                black_box(query.view()),
                key.view(),
                value.view(),
                Mask::None,
                &options,
            )
            .expect("valid inputs")
        })
    });
    group.finish();
}

fn attention(criterion: &mut Criterion) {
    let causal = AttentionOptions {
        is_causal: true,
        ..Default::default()
    };
    let window = AttentionOptions {
        window: Some(Window::symmetric(256)),
        ..causal
    };
    let weights = AttentionOptions {
        return_weights: true,
        ..Default::default()
    };
    let plain = AttentionOptions::default();
    let rows = [
        ("tiny B1 H4 L=S=16 D16", [1, 4, 4, 16, 16, 16], plain),
        (
            "causal B1 H8 L=S=2048 D64",
            [1, 8, 8, 2048, 2048, 64],
            causal,
        ),
        (
            "window 256 B1 H8 L=S=4096 D64",
            [1, 8, 8, 4096, 4096, 64],
            window,
        ),
        (
            "weights B1 H4 L=S=512 D64",
            [1, 4, 4, 512, 512, 64],
            weights,
        ),
    ];
    for (name, dims, options) in rows {
        sdpa_row(criterion, name, dims, options);
    }
}

fn decode(criterion: &mut Criterion) {
    let (kv_heads, heads, depth, tokens) = (8, 32, 128, 8192);
    let mut cache = KvCache::<f32>::new(kv_heads, depth, 1, tokens).expect("a cache");
    let keys = filled::<f32>([1, kv_heads, tokens, depth], 4);
    let keys = keys.into_dimensionality().expect("rank 4");
    cache
        .append(keys.view(), keys.view(), None)
        .expect("appends");
    let query = filled::<f32>([1, heads, 1, depth], 5);
    let options = attnscope::CacheAttendOptions {
        enable_gqa: true,
        ..Default::default()
    };
    let mut group = criterion.benchmark_group("decode");
    group.throughput(Throughput::Bytes(cache.nbytes() as u64));
    group.bench_function(
        "1 query, 32 heads over 8 kv heads x 128, 8192 tokens",
        |bench| {
            bench.iter(|| {
                cache
                    .attend(black_box(query.view()), Mask::None, &options)
                    .expect("valid inputs")
            })
        },
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300));
    targets = attention, decode
}
criterion_main!(benches);
