//! Model release metadata: the `custom` field of a TUF target that is a model.
//!
//! A release says what a model file is (name, version, per-model sequence), how to feed it
//! ([`IoSpec`]), how to judge it on the device ([`GoldenSet`], [`Budgets`]) and how to watch it
//! once it serves ([`ReferenceStats`], [`Calibrator`]). The same JSON is the "release-info"
//! file that `outpostctl release sign --release-info FILE` reads and that the fixture
//! generator writes next to each model.
//!
//! Versioned by [`ModelRelease::schema`]; unknown fields anywhere are tolerated, and at the
//! top level they are kept in [`ModelRelease::extra`] so that re-signing preserves them.
//!
//! ```
//! use outpost_protocol::release::ModelRelease;
//! let json = r#"{"schema":1,"model":"digits","version":"1.0.0","sequence":1,
//!   "io":{"inputs":[{"name":"x","dtype":"f32","shape":[1,64]}],
//!         "outputs":[{"name":"logits","dtype":"f32","shape":[1,10],"kind":"class_logits"}]}}"#;
//! let release = ModelRelease::from_json(json.as_bytes()).unwrap();
//! assert_eq!(release.io.inputs[0].element_count(), 64);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema version this crate writes. Readers accept any version up to this one.
pub const RELEASE_SCHEMA_VERSION: u32 = 1;

/// Upper bound on a release document we are willing to parse (it rides inside signed
/// targets metadata, which is itself length-capped; this bounds the standalone file).
pub const MAX_RELEASE_JSON_BYTES: usize = 16 * 1024 * 1024;

/// Errors from reading or checking release metadata.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The bytes are not a release document.
    #[error("release metadata is not valid JSON for schema {RELEASE_SCHEMA_VERSION}: {0}")]
    Json(#[from] serde_json::Error),
    /// The document is larger than [`MAX_RELEASE_JSON_BYTES`].
    #[error("release metadata is {len} bytes, over the {max}-byte cap")]
    TooLarge {
        /// Length offered.
        len: usize,
        /// Cap.
        max: usize,
    },
    /// Written by a newer Outpost than this one.
    #[error("release schema {found} is newer than the supported {RELEASE_SCHEMA_VERSION}")]
    UnsupportedSchema {
        /// The schema version in the document.
        found: u32,
    },
    /// A structural rule is broken (shape/data mismatch, bad histogram, unknown tensor).
    #[error("invalid release metadata: {0}")]
    Invalid(String),
}

/// A model release: the `custom` metadata of a model target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRelease {
    /// Schema version, [`RELEASE_SCHEMA_VERSION`] when written by this crate.
    pub schema: u32,
    /// Model slot name, e.g. `digits-cnn`. Devices run one release per model name.
    pub model: String,
    /// Human version string, e.g. `1.2.0`. Not compared; `sequence` orders releases.
    pub version: String,
    /// Per-model release sequence, strictly increasing across releases of one model.
    pub sequence: u64,
    /// Inputs and outputs of the model.
    pub io: IoSpec,
    /// Reference statistics for drift, from the training or validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceStats>,
    /// Maps raw top-1 confidence to a probability of being right (for CBPE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrator: Option<Calibrator>,
    /// Golden vectors the device must reproduce before activating the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<GoldenSet>,
    /// Latency and memory budgets checked by the validation gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budgets: Option<Budgets>,
    /// Unknown top-level fields, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ModelRelease {
    /// Parses and checks a release document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        if bytes.len() > MAX_RELEASE_JSON_BYTES {
            return Err(ReleaseError::TooLarge {
                len: bytes.len(),
                max: MAX_RELEASE_JSON_BYTES,
            });
        }
        let release: ModelRelease = serde_json::from_slice(bytes)?;
        release.validate()?;
        Ok(release)
    }

    /// Parses a release from a JSON value (e.g. a TUF target's `custom`) and checks it.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, ReleaseError> {
        let release: ModelRelease = serde_json::from_value(value.clone())?;
        release.validate()?;
        Ok(release)
    }

    /// Checks the structural rules that serde cannot express.
    pub fn validate(&self) -> Result<(), ReleaseError> {
        if self.schema > RELEASE_SCHEMA_VERSION {
            return Err(ReleaseError::UnsupportedSchema { found: self.schema });
        }
        if self.model.is_empty() {
            return Err(ReleaseError::Invalid("model name is empty".into()));
        }
        if self.io.inputs.is_empty() || self.io.outputs.is_empty() {
            return Err(ReleaseError::Invalid(
                "io spec needs at least one input and one output".into(),
            ));
        }
        for out in &self.io.outputs {
            if !out.labels.is_empty() && out.labels.len() != out.class_count().unwrap_or(0) {
                return Err(ReleaseError::Invalid(format!(
                    "output {:?} has {} labels but {} classes",
                    out.name,
                    out.labels.len(),
                    out.class_count().unwrap_or(0)
                )));
            }
        }
        if let Some(reference) = &self.reference {
            for f in &reference.features {
                let input = self.io.input(&f.input).ok_or_else(|| {
                    ReleaseError::Invalid(format!("reference names unknown input {:?}", f.input))
                })?;
                if f.index >= input.element_count() {
                    return Err(ReleaseError::Invalid(format!(
                        "reference feature {}[{}] is outside the input's {} elements",
                        f.input,
                        f.index,
                        input.element_count()
                    )));
                }
                f.histogram.validate()?;
            }
            if let Some(prior) = &reference.class_prior {
                check_distribution("class_prior", prior)?;
            }
            if let Some(conf) = &reference.confidence {
                conf.validate()?;
            }
        }
        if let Some(Calibrator::Isotonic { x, y }) = &self.calibrator
            && (x.len() != y.len() || x.is_empty() || x.windows(2).any(|w| w[0] > w[1]))
        {
            return Err(ReleaseError::Invalid(
                "isotonic calibrator needs equally long, non-empty, sorted x and y".into(),
            ));
        }
        if let Some(golden) = &self.golden {
            for (i, v) in golden.vectors.iter().enumerate() {
                for (name, t) in v.inputs.iter().chain(v.outputs.iter()) {
                    t.validate().map_err(|e| {
                        ReleaseError::Invalid(format!("golden vector {i}, tensor {name:?}: {e}"))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Serializes to pretty JSON (the release-info file format).
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("release metadata always serializes")
    }
}

fn check_distribution(what: &str, p: &[f64]) -> Result<(), ReleaseError> {
    let sum: f64 = p.iter().sum();
    if p.is_empty() || p.iter().any(|v| !v.is_finite() || *v < 0.0) || (sum - 1.0).abs() > 1e-3 {
        return Err(ReleaseError::Invalid(format!(
            "{what} must be non-negative and sum to 1 (sums to {sum})"
        )));
    }
    Ok(())
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// Inputs and outputs of a model, in the order the model declares them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    /// Model inputs; their shapes become tract's input facts.
    pub inputs: Vec<TensorSpec>,
    /// Model outputs.
    pub outputs: Vec<OutputSpec>,
}

impl IoSpec {
    /// The input with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }
    /// The output with this name.
    pub fn output(&self, name: &str) -> Option<&OutputSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// A named tensor with a concrete shape (batch included).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name as in the ONNX graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Concrete shape, batch dimension included (e.g. `[1, 1, 8, 8]`).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An output tensor and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Tensor name as in the ONNX graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Concrete shape, batch dimension included.
    pub shape: Vec<usize>,
    /// What the values mean; drives the accuracy proxies.
    #[serde(default)]
    pub kind: OutputKind,
    /// Class labels, one per class, when `kind` is a classifier output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl OutputSpec {
    /// Number of classes (last dimension) for classifier outputs.
    pub fn class_count(&self) -> Option<usize> {
        match self.kind {
            OutputKind::ClassLogits | OutputKind::ClassProbabilities => self.shape.last().copied(),
            _ => None,
        }
    }
}

/// Meaning of an output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutputKind {
    /// Unnormalized class scores over the last dimension (softmax gives probabilities).
    ClassLogits,
    /// Class probabilities over the last dimension.
    ClassProbabilities,
    /// Anything else (regression, embeddings); no classifier proxies.
    #[default]
    Raw,
    /// A kind written by a newer Outpost; treated as [`OutputKind::Raw`].
    #[serde(other)]
    Unknown,
}

/// Reference statistics for drift, computed on the release's reference data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceStats {
    /// Number of reference samples the statistics were computed on.
    pub sample_count: u64,
    /// Per-input-feature histograms.
    #[serde(default)]
    pub features: Vec<FeatureReference>,
    /// Reference distribution of predicted classes (sums to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_prior: Option<Vec<f64>>,
    /// Reference histogram of top-1 confidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Histogram>,
    /// Top-1 accuracy on the reference data with labels, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// Histogram of one input element (feature) on the reference data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureReference {
    /// Input tensor name.
    pub input: String,
    /// Flat (row-major) index of the element within one sample of that input.
    pub index: usize,
    /// Bins and reference frequencies.
    pub histogram: Histogram,
}

/// Bins given by edges, with reference frequencies. Values below the first edge fall in
/// the first bin and values above the last edge in the last bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Sorted bin edges; `edges.len() == frequencies.len() + 1`.
    pub edges: Vec<f64>,
    /// Reference share of samples per bin (sums to 1).
    pub frequencies: Vec<f64>,
}

impl Histogram {
    /// Checks edges and frequencies.
    pub fn validate(&self) -> Result<(), ReleaseError> {
        if self.edges.len() != self.frequencies.len() + 1
            || self
                .edges
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(ReleaseError::Invalid(format!(
                "histogram needs strictly increasing edges, one more than {} frequencies",
                self.frequencies.len()
            )));
        }
        check_distribution("histogram frequencies", &self.frequencies)
    }

    /// Bin index of `value` (clamped to the outer bins; NaN goes to the first bin).
    pub fn bin(&self, value: f64) -> usize {
        let n = self.frequencies.len();
        // partition_point: number of inner edges <= value.
        let inner = &self.edges[1..n];
        inner.partition_point(|e| *e <= value).min(n - 1)
    }
}

/// Maps raw top-1 confidence to a calibrated probability of being correct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Calibrator {
    /// Temperature scaling: probabilities are `softmax(logits / temperature)`.
    Temperature {
        /// Temperature (> 0).
        temperature: f64,
    },
    /// Piecewise-linear isotonic map from raw confidence `x` to accuracy `y`.
    Isotonic {
        /// Sorted raw-confidence knots.
        x: Vec<f64>,
        /// Calibrated accuracy at each knot.
        y: Vec<f64>,
    },
}

/// Golden vectors and the tolerance they are checked with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenSet {
    /// How close the device's outputs must be.
    pub tolerance: Tolerance,
    /// Input/expected-output pairs (expected outputs from onnxruntime on the float or
    /// shipped model, as the release says).
    pub vectors: Vec<GoldenVector>,
}

/// Closeness rule for golden outputs: `|got - want| <= abs + rel * |want|` per element.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Absolute tolerance.
    pub abs: f64,
    /// Relative tolerance.
    #[serde(default)]
    pub rel: f64,
    /// For classifier outputs, the arg-max must also match.
    #[serde(default)]
    pub top1_must_match: bool,
}

/// One golden vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenVector {
    /// Inputs by name.
    pub inputs: BTreeMap<String, TensorData>,
    /// Expected outputs by name.
    pub outputs: BTreeMap<String, TensorData>,
}

/// A small tensor inline in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values in row-major order (integers are exact in f64).
    pub data: Vec<f64>,
}

impl TensorData {
    /// Checks that `data` has as many values as `shape` says.
    pub fn validate(&self) -> Result<(), String> {
        let n: usize = self.shape.iter().product();
        if n != self.data.len() {
            return Err(format!(
                "shape {:?} holds {n} values but data has {}",
                self.shape,
                self.data.len()
            ));
        }
        Ok(())
    }
}

/// Budgets the validation gate enforces on the device.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Budgets {
    /// Maximum p95 latency of one inference, single thread, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p95_ms: Option<f64>,
    /// Maximum memory the loaded model may add to the process, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "schema": 1, "model": "digits", "version": "1.0.0", "sequence": 3,
            "io": {
                "inputs": [{"name": "x", "dtype": "f32", "shape": [1, 64]}],
                "outputs": [{"name": "y", "dtype": "f32", "shape": [1, 3],
                             "kind": "class_logits", "labels": ["a", "b", "c"]}]
            }
        })
    }

    #[test]
    fn unknown_fields_are_kept_and_unknown_kinds_tolerated() {
        let mut v = minimal();
        v["future_field"] = serde_json::json!({"x": 1});
        v["io"]["outputs"][0]["kind"] = "segmentation_mask".into();
        v["io"]["outputs"][0]["labels"] = serde_json::json!([]);
        v["io"]["outputs"][0]["extra"] = 5.into();
        let r = ModelRelease::from_value(&v).unwrap();
        assert_eq!(r.io.outputs[0].kind, OutputKind::Unknown);
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["future_field"], serde_json::json!({"x": 1}));
    }

    #[test]
    fn rejects_newer_schema() {
        let mut v = minimal();
        v["schema"] = 2.into();
        assert!(matches!(
            ModelRelease::from_value(&v),
            Err(ReleaseError::UnsupportedSchema { found: 2 })
        ));
    }

    #[test]
    fn rejects_label_count_mismatch_and_bad_histogram() {
        let mut v = minimal();
        v["io"]["outputs"][0]["labels"] = serde_json::json!(["a"]);
        assert!(matches!(
            ModelRelease::from_value(&v),
            Err(ReleaseError::Invalid(_))
        ));

        let mut v = minimal();
        v["reference"] = serde_json::json!({"sample_count": 10, "features": [
            {"input": "x", "index": 3, "histogram": {"edges": [0.0, 1.0, 0.5], "frequencies": [0.5, 0.5]}}
        ]});
        assert!(matches!(
            ModelRelease::from_value(&v),
            Err(ReleaseError::Invalid(_))
        ));
        v["reference"]["features"][0]["histogram"]["edges"] = serde_json::json!([0.0, 0.5, 1.0]);
        ModelRelease::from_value(&v).unwrap();
        v["reference"]["features"][0]["index"] = 64.into();
        assert!(matches!(
            ModelRelease::from_value(&v),
            Err(ReleaseError::Invalid(_))
        ));
    }

    #[test]
    fn histogram_bins_clamp_to_outer_bins() {
        let h = Histogram {
            edges: vec![0.0, 1.0, 2.0, 3.0],
            frequencies: vec![0.2, 0.3, 0.5],
        };
        assert_eq!(h.bin(-5.0), 0);
        assert_eq!(h.bin(0.5), 0);
        assert_eq!(h.bin(1.0), 1);
        assert_eq!(h.bin(2.5), 2);
        assert_eq!(h.bin(99.0), 2);
        assert_eq!(h.bin(f64::NAN), 0);
    }

    #[test]
    fn golden_tensor_shape_must_match_data() {
        let mut v = minimal();
        v["golden"] = serde_json::json!({"tolerance": {"abs": 1e-4}, "vectors": [
            {"inputs": {"x": {"dtype": "f32", "shape": [1, 2], "data": [1.0]}}, "outputs": {}}
        ]});
        assert!(matches!(
            ModelRelease::from_value(&v),
            Err(ReleaseError::Invalid(_))
        ));
    }
}
