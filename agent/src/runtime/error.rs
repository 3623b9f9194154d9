//! Errors of the inference runtime.

/// What went wrong loading or running a model.
///
/// Messages from tract are kept verbatim (with their context chain) in `message` fields.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The bytes are not an ONNX model tract can read (truncated, not protobuf, no graph).
    #[error("malformed model: {message}")]
    Malformed {
        /// tract's message.
        message: String,
    },
    /// The graph uses operators tract does not implement.
    #[error("unsupported operator(s) {ops:?}: {message}")]
    UnsupportedOp {
        /// ONNX op types without a tract implementation.
        ops: Vec<String>,
        /// tract's message.
        message: String,
    },
    /// tract could not type, optimize or plan the model with the given input facts.
    #[error("model does not compile: {message}")]
    Compile {
        /// tract's message.
        message: String,
    },
    /// The io spec and the model disagree (input or output names, input count).
    #[error("io spec does not match the model: {message}")]
    IoMismatch {
        /// What differs.
        message: String,
    },
    /// No dequantized variant exists for this model (it is not a QDQ model).
    #[error("no dequantized variant: {reason}")]
    NoDequantizedVariant {
        /// Why.
        reason: String,
    },
    /// No active model has this name.
    #[error("unknown model {name:?}")]
    UnknownModel {
        /// Name asked for.
        name: String,
    },
    /// An input name the model does not have.
    #[error("model {model:?} has no input {name:?} (inputs: {known:?})")]
    UnknownInput {
        /// Model name.
        model: String,
        /// Name given.
        name: String,
        /// The model's input names.
        known: Vec<String>,
    },
    /// The same input was given twice.
    #[error("input {name:?} given more than once")]
    DuplicateInput {
        /// Input name.
        name: String,
    },
    /// A model input was not given.
    #[error("model {model:?} needs input {name:?}")]
    MissingInput {
        /// Model name.
        model: String,
        /// Missing input name.
        name: String,
    },
    /// An input has the wrong element type.
    #[error("input {input:?} must be {expected}, got {got}")]
    WrongDtype {
        /// Input name.
        input: String,
        /// Expected element type.
        expected: &'static str,
        /// Given element type.
        got: &'static str,
    },
    /// An input has the wrong shape.
    #[error("input {input:?} must have shape {expected:?}, got {got:?}")]
    WrongShape {
        /// Input name.
        input: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Given shape.
        got: Vec<usize>,
    },
    /// An input's byte buffer does not match its shape and element type.
    #[error("input {input:?} needs {expected} bytes, got {got}")]
    WrongByteLength {
        /// Input name (empty when not known yet).
        input: String,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A shape whose byte length overflows `usize`.
    #[error("shape {shape:?} is too large")]
    ShapeOverflow {
        /// The shape.
        shape: Vec<usize>,
    },
    /// An element type the runtime does not carry.
    #[error("unsupported element type {0}")]
    UnsupportedDtype(String),
    /// tract failed while running the model.
    #[error("inference failed: {message}")]
    Run {
        /// tract's message.
        message: String,
    },
    /// tract panicked; the panic was caught (needs `panic = "unwind"`).
    #[error("tract panicked while {stage}: {message}")]
    Panic {
        /// What was running: `loading`, `compiling`, `running`.
        stage: &'static str,
        /// The panic payload, when it is a string.
        message: String,
    },
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
