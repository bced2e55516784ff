//! How a KV cache stores its rows: in the compute type (float32 or float64), or compressed to
//! bfloat16, float16 or int8 blocks, converted once on the way in.
//!
//! int8 follows llama.cpp's q8_0: each row is cut into blocks of [`INT8_BLOCK`] values that
//! share one float32 scale (`max |x| / 127`), so a value costs 8 bits plus 32 bits per block
//! (9 bits). Every buffer holds `(heads, row_capacity, width)` rows; the cache moves whole rows
//! (growing, evicting) without ever decoding them.

use bytemuck::Zeroable;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayViewMut1};

pub use crate::kernel::decode::INT8_BLOCK;

use crate::element::Element;
use crate::error::AttnError;
use crate::kernel::decode::StoredRows;
use crate::memory::{advise_huge_pages, lazily_zeroed};

/// The precision keys and values are kept in; attention always accumulates in float32 (or
/// float64 for a float64 cache, which keeps its own precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// The cache's compute dtype itself.
    Native,
    BFloat16,
    Float16,
    Int8,
}

impl Storage {
    /// Every storage, the compute type first.
    pub const ALL: [Storage; 4] = [
        Storage::Native,
        Storage::BFloat16,
        Storage::Float16,
        Storage::Int8,
    ];

    /// Refuses values this storage cannot hold, before anything is written: int8 shares one
    /// scale per block of a row, so an inf or NaN would turn its whole block into NaN (and
    /// leak into outputs the value does not feed); float16 turns finite values past ±65,504
    /// into infinities. Native and bfloat16 storage hold every value of the compute type.
    pub(crate) fn check_values<T: Element>(
        self,
        name: &'static str,
        values: impl IntoIterator<Item = T>,
    ) -> Result<(), AttnError> {
        let refused = |x: f64| match self {
            Storage::Int8 => !x.is_finite(),
            Storage::Float16 => x.is_finite() && f16::from_f64(x).is_infinite(),
            Storage::Native | Storage::BFloat16 => false,
        };
        if matches!(self, Storage::Native | Storage::BFloat16) {
            return Ok(());
        }
        match values
            .into_iter()
            .map(Element::to_f64)
            .find(|&x| refused(x))
        {
            None => Ok(()),
            Some(bad) if self == Storage::Int8 => Err(AttnError::value(
                name,
                format!(
                    "holds {bad}, which int8 storage cannot keep (a block of {INT8_BLOCK} values \
                     shares one scale); store non-finite values as float32, bfloat16 or float16"
                ),
            )),
            Some(bad) => Err(AttnError::value(
                name,
                format!(
                    "holds {bad:e}, beyond float16's largest value (65504); use bfloat16 or \
                     float32 storage, or scale the values down"
                ),
            )),
        }
    }

    /// The storage called `name` for a cache computing in `T`. Compressed storage needs a
    /// float32 cache: a float64 cache exists to keep float64 precision.
    pub fn parse<T: Element>(name: &str) -> Result<Self, AttnError> {
        let storage = match name {
            "bfloat16" => Storage::BFloat16,
            "float16" => Storage::Float16,
            "int8" => Storage::Int8,
            _ if name == T::TYPE_NAME => Storage::Native,
            "float32" | "float64" => {
                return Err(AttnError::value(
                    "storage",
                    format!(
                        "a {} cache stores {} (or, for float32 caches, a compressed storage); \
                         got {name}",
                        T::TYPE_NAME,
                        T::TYPE_NAME
                    ),
                ))
            }
            _ => {
                return Err(AttnError::value(
                    "storage",
                    format!("must be float32, float64, bfloat16, float16 or int8, got {name:?}"),
                ))
            }
        };
        if storage != Storage::Native && T::TYPE_NAME != "float32" {
            return Err(AttnError::value(
                "storage",
                format!(
                    "{name} storage needs a float32 cache; a {} cache stores {}",
                    T::TYPE_NAME,
                    T::TYPE_NAME
                ),
            ));
        }
        Ok(storage)
    }

    /// The storage's name for a cache computing in `T`.
    pub fn name<T: Element>(self) -> &'static str {
        match self {
            Storage::Native => T::TYPE_NAME,
            Storage::BFloat16 => "bfloat16",
            Storage::Float16 => "float16",
            Storage::Int8 => "int8",
        }
    }

    /// Bytes one row of `width` values takes.
    pub fn row_bytes<T>(self, width: usize) -> usize {
        match self {
            Storage::Native => width * std::mem::size_of::<T>(),
            Storage::BFloat16 | Storage::Float16 => width * 2,
            Storage::Int8 => width + 4 * width.div_ceil(INT8_BLOCK),
        }
    }
}

/// A buffer of `(heads, row_capacity, per_row)` units with the row operations a cache needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowBuffer<U> {
    pub data: Vec<U>,
    pub per_row: usize,
}

impl<U> RowBuffer<U> {
    /// Units of global row `row`.
    pub fn row(&self, row: usize) -> &[U] {
        &self.data[row * self.per_row..(row + 1) * self.per_row]
    }

    /// The rows as the decoding kernel reads them.
    pub fn stored(&self) -> StoredRows<'_, U> {
        StoredRows {
            data: &self.data,
            per_row: self.per_row,
        }
    }
}

/// A move of every head's rows into new buffers: from `capacity` rows per head to
/// `new_capacity`, rows `held` of each head going to its start.
pub(crate) struct Relocation {
    pub heads: usize,
    pub capacity: usize,
    pub new_capacity: usize,
    pub held: std::ops::Range<usize>,
}

impl<U: Copy + Zeroable> RowBuffer<U> {
    /// `rows` zeroed rows of `per_row` units, left untouched until rows are written into them.
    fn new(rows: usize, per_row: usize) -> Result<Self, AttnError> {
        let len = rows
            .checked_mul(per_row)
            .ok_or_else(|| AttnError::value("capacity", "too many rows to hold"))?;
        let mut data = lazily_zeroed(len, "capacity")?;
        advise_huge_pages(&mut data);
        Ok(RowBuffer { data, per_row })
    }

    /// A copy laid out as `relocation` asks.
    fn relocated(&self, relocation: &Relocation) -> Result<Self, AttnError> {
        let Relocation {
            heads,
            capacity,
            new_capacity,
            ref held,
        } = *relocation;
        let rows = heads.checked_mul(new_capacity).ok_or_else(|| {
            AttnError::value(
                "capacity",
                format!("{new_capacity} tokens per head are too many to hold"),
            )
        })?;
        let mut grown = Self::new(rows, self.per_row)?;
        let width = self.per_row;
        // Nothing held, nothing to copy: the work must not follow a huge but empty head count.
        if held.is_empty() {
            return Ok(grown);
        }
        for head in 0..heads {
            let from = (head * capacity + held.start) * width;
            let to = head * new_capacity * width;
            let count = held.len() * width;
            grown.data[to..to + count].copy_from_slice(&self.data[from..from + count]);
        }
        Ok(grown)
    }

    /// Moves `count` rows of every head from row `from` to row `to` (ranges may overlap).
    fn move_rows(&mut self, heads: usize, capacity: usize, from: usize, to: usize, count: usize) {
        if count == 0 {
            return;
        }
        let width = self.per_row;
        for head in 0..heads {
            let base = head * capacity * width;
            self.data.copy_within(
                base + from * width..base + (from + count) * width,
                base + to * width,
            );
        }
    }
}

/// One buffer (keys or values) in its storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Rows<T> {
    Native(RowBuffer<T>),
    BFloat16(RowBuffer<bf16>),
    Float16(RowBuffer<f16>),
    /// `values` hold the int8 rows, `scales` one float32 per block of each row.
    Int8 {
        values: RowBuffer<i8>,
        scales: RowBuffer<f32>,
    },
}

/// Runs `$body` with `$buffer` bound to every plane of `$rows` in turn.
macro_rules! each_plane {
    ($rows:expr, $buffer:ident => $body:expr) => {
        match $rows {
            Rows::Native($buffer) => $body,
            Rows::BFloat16($buffer) => $body,
            Rows::Float16($buffer) => $body,
            Rows::Int8 { values, scales } => {
                {
                    let $buffer = values;
                    $body
                }
                {
                    let $buffer = scales;
                    $body
                }
            }
        }
    };
}

/// One head's rows of one buffer ([`Rows::heads_mut`]), borrowed for writing.
pub(crate) enum HeadRowsMut<'a, T> {
    Native(&'a mut [T]),
    BFloat16(&'a mut [bf16]),
    Float16(&'a mut [f16]),
    Int8 {
        values: &'a mut [i8],
        scales: &'a mut [f32],
    },
}

impl<T: Element> HeadRowsMut<'_, T> {
    /// Stores `source` (one row of values, any layout) as this head's row `row`, converted to
    /// the storage through `staging`.
    pub fn write_row(&mut self, row: usize, source: ArrayView1<'_, T>, staging: &mut Vec<f32>) {
        let width = source.len();
        let span = row * width..(row + 1) * width;
        // A contiguous row (the usual case) is read as a slice, so the copy vectorises.
        if let HeadRowsMut::Native(rows) = self {
            ArrayViewMut1::from(&mut rows[span]).assign(&source);
            return;
        }
        staging.clear();
        match source.as_slice() {
            Some(slice) => staging.extend(slice.iter().map(|&x| x.to_f64() as f32)),
            None => staging.extend(source.iter().map(|&x| x.to_f64() as f32)),
        }
        match self {
            HeadRowsMut::Native(_) => unreachable!("handled above"),
            HeadRowsMut::BFloat16(rows) => rows[span].convert_from_f32_slice(staging),
            HeadRowsMut::Float16(rows) => rows[span].convert_from_f32_slice(staging),
            HeadRowsMut::Int8 { values, scales } => {
                let blocks = width.div_ceil(INT8_BLOCK);
                quantize_row(
                    staging,
                    &mut values[span],
                    &mut scales[row * blocks..(row + 1) * blocks],
                )
            }
        }
    }
}

impl<T: Element> Rows<T> {
    /// `rows` zeroed rows of `width` values.
    pub fn new(storage: Storage, rows: usize, width: usize) -> Result<Self, AttnError> {
        Ok(match storage {
            Storage::Native => Rows::Native(RowBuffer::new(rows, width)?),
            Storage::BFloat16 => Rows::BFloat16(RowBuffer::new(rows, width)?),
            Storage::Float16 => Rows::Float16(RowBuffer::new(rows, width)?),
            Storage::Int8 => Rows::Int8 {
                values: RowBuffer::new(rows, width)?,
                scales: RowBuffer::new(rows, width.div_ceil(INT8_BLOCK))?,
            },
        })
    }

    /// A copy laid out as `relocation` asks.
    pub fn relocated(&self, relocation: &Relocation) -> Result<Self, AttnError> {
        Ok(match self {
            Rows::Native(buffer) => Rows::Native(buffer.relocated(relocation)?),
            Rows::BFloat16(buffer) => Rows::BFloat16(buffer.relocated(relocation)?),
            Rows::Float16(buffer) => Rows::Float16(buffer.relocated(relocation)?),
            Rows::Int8 { values, scales } => Rows::Int8 {
                values: values.relocated(relocation)?,
                scales: scales.relocated(relocation)?,
            },
        })
    }

    /// Moves `count` rows of every head from row `from` to row `to`.
    pub fn move_rows(
        &mut self,
        heads: usize,
        capacity: usize,
        from: usize,
        to: usize,
        count: usize,
    ) {
        each_plane!(self, buffer => buffer.move_rows(heads, capacity, from, to, count));
    }

    /// Every head's `capacity` rows, borrowed for writing: heads are disjoint, so they can be
    /// written in parallel.
    pub fn heads_mut(&mut self, capacity: usize) -> Vec<HeadRowsMut<'_, T>> {
        // A zero-length chunk would panic; a buffer that holds nothing has no heads to write.
        fn heads<U>(buffer: &mut RowBuffer<U>, capacity: usize) -> std::slice::ChunksMut<'_, U> {
            let per_head = (capacity * buffer.per_row).max(1);
            buffer.data.chunks_mut(per_head)
        }
        match self {
            Rows::Native(buffer) => heads(buffer, capacity).map(HeadRowsMut::Native).collect(),
            Rows::BFloat16(buffer) => heads(buffer, capacity).map(HeadRowsMut::BFloat16).collect(),
            Rows::Float16(buffer) => heads(buffer, capacity).map(HeadRowsMut::Float16).collect(),
            Rows::Int8 { values, scales } => heads(values, capacity)
                .zip(heads(scales, capacity))
                .map(|(values, scales)| HeadRowsMut::Int8 { values, scales })
                .collect(),
        }
    }

    /// Global row `row` as float32 values (`target` holds one row).
    pub fn read_row(&self, row: usize, target: &mut [f32]) {
        match self {
            Rows::Native(buffer) => {
                for (slot, &x) in target.iter_mut().zip(buffer.row(row)) {
                    *slot = x.to_f64() as f32;
                }
            }
            Rows::BFloat16(buffer) => buffer.row(row).convert_to_f32_slice(target),
            Rows::Float16(buffer) => buffer.row(row).convert_to_f32_slice(target),
            Rows::Int8 { values, scales } => {
                dequantize_row(values.row(row), scales.row(row), target)
            }
        }
    }
}

/// q8_0-style quantisation of one row: per block of [`INT8_BLOCK`] values, the scale
/// `max |x| / 127` and `round(x / scale)`. The cache refuses non-finite values before they
/// get here ([`Storage::check_values`]); were one to arrive, its block gets a NaN scale.
pub(crate) fn quantize_row(row: &[f32], values: &mut [i8], scales: &mut [f32]) {
    for ((block, quantized), scale) in row
        .chunks(INT8_BLOCK)
        .zip(values.chunks_mut(INT8_BLOCK))
        .zip(scales.iter_mut())
    {
        // Without the sign bit, the bits of non-negative floats order as the floats do, and
        // every inf or NaN lies above every finite value: one integer max (which vectorises,
        // unlike `f32::max`) gives both the largest magnitude and whether the block is finite.
        let largest_bits = block
            .iter()
            .map(|x| x.to_bits() & !SIGN_BIT)
            .max()
            .unwrap_or(0);
        if largest_bits >= f32::INFINITY.to_bits() {
            *scale = f32::NAN;
            quantized.fill(0);
            continue;
        }
        let largest = f32::from_bits(largest_bits);
        *scale = largest / 127.0;
        let inverse = if largest > 0.0 { 127.0 / largest } else { 0.0 };
        for (q, &x) in quantized.iter_mut().zip(block) {
            *q = round_half_away(x * inverse).clamp(-127, 127) as i8;
        }
    }
}

/// The sign bit of an f32.
const SIGN_BIT: u32 = 1 << 31;

/// `x` rounded to the nearest integer, halves away from zero, as `f32::round` does. In f64,
/// `|x| + 0.5` is exact for any float32 in the quantised range, so truncating it rounds; this
/// keeps the hot loop free of a `roundf` library call per value (x86 has no such instruction).
#[inline]
fn round_half_away(x: f32) -> i32 {
    let x = f64::from(x);
    (x + 0.5f64.copysign(x)) as i32
}

/// The float32 values of one quantised row.
pub(crate) fn dequantize_row(values: &[i8], scales: &[f32], target: &mut [f32]) {
    for ((block, quantized), &scale) in target
        .chunks_mut(INT8_BLOCK)
        .zip(values.chunks(INT8_BLOCK))
        .zip(scales)
    {
        for (x, &q) in block.iter_mut().zip(quantized) {
            *x = f32::from(q) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(len: usize, amplitude: f32) -> Vec<f32> {
        (0..len)
            .map(|i| amplitude * ((i as f32) * 0.77).sin() + 0.01 * i as f32)
            .collect()
    }

    #[test]
    fn rounding_halves_away_from_zero_matches_f32_round() {
        let mut cases = vec![0.5f32, -0.5, 1.5, -2.5, 126.5, -126.5, 0.0, -0.0];
        // The largest float below one half, whose `+ 0.5` in float32 would round up to 1.
        cases.extend([0.5f32.next_down(), -0.5f32.next_down(), 127.0, -127.0]);
        cases.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.012_7));
        for x in cases {
            assert_eq!(round_half_away(x), x.round() as i32, "{x}");
        }
    }

    #[test]
    fn int8_round_trip_stays_within_half_a_step_per_block() {
        for width in [1, 31, 32, 33, 64, 100] {
            let row = wave(width, 3.5);
            let blocks = width.div_ceil(INT8_BLOCK);
            let (mut values, mut scales) = (vec![0i8; width], vec![0f32; blocks]);
            quantize_row(&row, &mut values, &mut scales);
            let mut back = vec![0f32; width];
            dequantize_row(&values, &scales, &mut back);
            for (i, (&x, &y)) in row.iter().zip(&back).enumerate() {
                let scale = scales[i / INT8_BLOCK];
                assert!(
                    (x - y).abs() <= 0.5 * scale * 1.0001,
                    "width {width} at {i}: {x} -> {y}"
                );
            }
            // The largest value of each block is exact up to float rounding.
            let largest = row[..width.min(32)]
                .iter()
                .fold(0.0f32, |m, x| m.max(x.abs()));
            assert!((scales[0] * 127.0 - largest).abs() <= largest * 1e-6);
        }
    }

    #[test]
    fn int8_zero_block_and_non_finite_block() {
        let mut row = vec![0.0f32; 64];
        row[40] = f32::INFINITY;
        let (mut values, mut scales) = (vec![1i8; 64], vec![0f32; 2]);
        quantize_row(&row, &mut values, &mut scales);
        assert_eq!(scales[0], 0.0);
        assert!(values[..32].iter().all(|&q| q == 0));
        assert!(scales[1].is_nan());
        let mut back = vec![0f32; 64];
        dequantize_row(&values, &scales, &mut back);
        assert!(back[..32].iter().all(|&x| x == 0.0));
        assert!(back[32..].iter().all(|x| x.is_nan()));
    }

    #[test]
    fn sixteen_bit_rows_round_trip_within_their_precision() {
        let row = wave(70, 100.0);
        for (storage, bound) in [
            (Storage::BFloat16, 1.0 / 256.0),
            (Storage::Float16, 1.0 / 2048.0),
            (Storage::Int8, 1.0 / 127.0),
        ] {
            let mut rows = Rows::<f32>::new(storage, 2, 70).unwrap();
            let mut staging = Vec::new();
            rows.heads_mut(2)[0].write_row(1, ArrayView1::from(&row), &mut staging);
            let mut back = vec![0f32; 70];
            rows.read_row(1, &mut back);
            let largest = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (&x, &y) in row.iter().zip(&back) {
                let allowed = match storage {
                    Storage::Int8 => bound * largest,
                    _ => bound * x.abs(),
                };
                assert!((x - y).abs() <= allowed, "{storage:?}: {x} -> {y}");
            }
        }
    }

    #[test]
    fn names_parse_and_refuse() {
        assert_eq!(Storage::parse::<f32>("float32").unwrap(), Storage::Native);
        assert_eq!(Storage::parse::<f64>("float64").unwrap(), Storage::Native);
        assert_eq!(Storage::parse::<f32>("int8").unwrap(), Storage::Int8);
        for (bad, word) in [("float64", "float32"), ("int4", "must be")] {
            let message = Storage::parse::<f32>(bad).unwrap_err().to_string();
            assert!(
                message.contains(word) && message.contains("storage"),
                "{message}"
            );
        }
        let message = Storage::parse::<f64>("bfloat16").unwrap_err().to_string();
        assert!(message.contains("float32 cache"), "{message}");
        assert_eq!(Storage::Int8.row_bytes::<f32>(128), 128 + 16);
        assert_eq!(Storage::Native.row_bytes::<f64>(3), 24);
    }
}
