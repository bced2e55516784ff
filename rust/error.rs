//! The one error type of the core. Every message names the argument at fault and its shape.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttnError {
    /// An argument has a shape that does not fit the others.
    Shape {
        argument: &'static str,
        message: String,
    },
    /// An argument has a value outside its domain.
    Value {
        argument: &'static str,
        message: String,
    },
    /// The attention weights asked for would pass the configured memory limit.
    WeightsTooLarge {
        shape: Vec<usize>,
        bytes: u128,
        limit: u64,
    },
}

impl AttnError {
    pub(crate) fn shape(argument: &'static str, message: impl Into<String>) -> Self {
        AttnError::Shape {
            argument,
            message: message.into(),
        }
    }

    pub(crate) fn value(argument: &'static str, message: impl Into<String>) -> Self {
        AttnError::Value {
            argument,
            message: message.into(),
        }
    }
}

impl fmt::Display for AttnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttnError::Shape { argument, message } | AttnError::Value { argument, message } => {
                write!(f, "{argument}: {message}")
            }
            AttnError::WeightsTooLarge {
                shape,
                bytes,
                limit,
            } => write!(
                f,
                "return_weights: the weights array {shape:?} would take {bytes} bytes, over the \
                 limit of {limit} bytes; ask for fewer queries/keys, or raise the limit with \
                 set_weights_memory_limit() or ATTNSCOPE_WEIGHTS_LIMIT_BYTES"
            ),
        }
    }
}

impl std::error::Error for AttnError {}

/// Formats a shape the way NumPy prints it: `(2, 3)`, `(5,)`, `()`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}
