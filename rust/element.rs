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
}

macro_rules! impl_element {
    ($t:ty, $name:expr) => {
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
        }
    };
}

impl_element!(f32, "float32");
impl_element!(f64, "float64");
