//! Linear projections `x·W + b` on the `gemm` crate, run on the engine's thread pool.

use ndarray::{Array2, ArrayView1, ArrayView2};
use rayon::ThreadPool;

use crate::error::AttnError;
use crate::kernel::KernelElement;
use crate::memory::zeroed;
use crate::threads::PROJECTION_INLINE_WORK;

/// `input · weight + bias`: `input` is `(rows, in)`, `weight` `(in, out)`, `bias` `(out,)`;
/// any strides; the product runs on `pool`. The caller has checked that the shapes fit.
/// `argument` names the result in an allocation error.
pub(crate) fn linear<T: KernelElement>(
    pool: &ThreadPool,
    input: ArrayView2<'_, T>,
    weight: ArrayView2<'_, T>,
    bias: Option<ArrayView1<'_, T>>,
    argument: &'static str,
) -> Result<Array2<T>, AttnError> {
    let (rows, inner) = input.dim();
    let outputs = weight.ncols();
    debug_assert_eq!(weight.nrows(), inner);
    let mut output = Array2::from_shape_vec((rows, outputs), zeroed(&[rows, outputs], argument)?)
        .expect("a buffer of rows x outputs elements");
    if let Some(bias) = bias {
        output
            .rows_mut()
            .into_iter()
            .for_each(|mut row| row.assign(&bias));
    }
    if rows == 0 || outputs == 0 || inner == 0 {
        return Ok(output);
    }
    let work = rows.saturating_mul(inner).saturating_mul(outputs);
    let threads = pool.current_num_threads();
    let (dst_row_stride, input_strides, weight_strides) =
        (outputs as isize, input.strides(), weight.strides());
    let multiply = |output: &mut Array2<T>, parallelism: gemm::Parallelism| {
        // SAFETY: the pointers and strides describe `output` (rows x outputs, row-major),
        // `input` (rows x inner) and `weight` (inner x outputs) exactly, all alive for the call,
        // and `output` does not overlap the inputs (it was just allocated).
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                inner,
                output.as_mut_ptr(),
                1,
                dst_row_stride,
                bias.is_some(),
                input.as_ptr(),
                input_strides[1],
                input_strides[0],
                weight.as_ptr(),
                weight_strides[1],
                weight_strides[0],
                T::ONE,
                T::ONE,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    if work <= PROJECTION_INLINE_WORK || threads == 1 {
        multiply(&mut output, gemm::Parallelism::None);
    } else {
        pool.install(|| multiply(&mut output, gemm::Parallelism::Rayon(threads)));
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2, ShapeBuilder};

    fn naive(input: &Array2<f64>, weight: &Array2<f64>, bias: Option<&Array1<f64>>) -> Array2<f64> {
        let mut out = Array2::zeros((input.nrows(), weight.ncols()));
        for r in 0..input.nrows() {
            for c in 0..weight.ncols() {
                let mut total = bias.map_or(0.0, |b| b[c]);
                for i in 0..input.ncols() {
                    total += input[[r, i]] * weight[[i, c]];
                }
                out[[r, c]] = total;
            }
        }
        out
    }

    #[test]
    fn matches_naive_for_any_layout_and_size() {
        for (rows, inner, outputs) in [(1, 1, 1), (3, 5, 7), (70, 33, 130), (300, 64, 96)] {
            let input =
                Array2::from_shape_fn((rows, inner), |(r, i)| ((r * 7 + i * 3) % 11) as f64 - 5.0);
            // A column-major weight exercises the strided path.
            let mut weight = Array2::zeros((inner, outputs).f());
            weight
                .indexed_iter_mut()
                .for_each(|((i, c), w)| *w = ((i * 5 + c) % 13) as f64 / 7.0 - 1.0);
            let bias = Array1::from_shape_fn(outputs, |c| c as f64 * 0.5);
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias);
                let pool = crate::threads::pool_for(Some(2)).unwrap();
                let got = linear(
                    &pool,
                    input.view(),
                    weight.view(),
                    b.map(|b| b.view()),
                    "out",
                )
                .unwrap();
                let want = naive(&input, &weight.as_standard_layout().to_owned(), b);
                let err = (&got - &want).iter().fold(0.0f64, |m, x| m.max(x.abs()));
                assert!(err < 1e-9, "{rows}x{inner}x{outputs}: {err}");
            }
        }
    }

    #[test]
    fn empty_inner_dimension_gives_the_bias() {
        let input = Array2::<f32>::zeros((4, 0));
        let weight = Array2::<f32>::zeros((0, 3));
        let bias = Array1::from(vec![1.0f32, 2.0, 3.0]);
        let pool = crate::threads::pool_for(Some(1)).unwrap();
        let got = linear(&pool, input.view(), weight.view(), Some(bias.view()), "out").unwrap();
        assert_eq!(got, Array2::from_shape_fn((4, 3), |(_, c)| c as f32 + 1.0));
    }
}
