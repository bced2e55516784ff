//! The attention call's tests: every SIMD level against the float64 reference.

mod backward;
mod forward;
mod nonfinite;
