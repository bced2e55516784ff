//! The two element types the engine computes in, and the few scalar operations it needs.

use std::fmt::Debug;

pub trait Element:
    Copy
    + bytemuck::Zeroable
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// The largest finite value.
    const MAX: Self;
    /// The NumPy name of the type, for messages.
    const TYPE_NAME: &'static str;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp2(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
    /// The same elements as float32 when they are float32 (the decoding kernel's type).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// float32 elements as this type.
    fn from_f32(values: Vec<f32>) -> Vec<Self>;
}

macro_rules! impl_element {
    ($t:ty, $name:expr, $as_f32:expr, $from_f32:expr) => {
        impl Element for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const MAX: Self = <$t>::MAX;
            const TYPE_NAME: &'static str = $name;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp2(self) -> Self {
                <$t>::exp2(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn as_f32(values: &[Self]) -> Option<&[f32]> {
                $as_f32(values)
            }
            fn from_f32(values: Vec<f32>) -> Vec<Self> {
                $from_f32(values)
            }
        }
    };
}

impl_element!(f32, "float32", Some, |values| values);
impl_element!(f64, "float64", |_| None, |values: Vec<f32>| values
    .into_iter()
    .map(f64::from)
    .collect());
