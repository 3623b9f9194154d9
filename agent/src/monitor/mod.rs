//! Accuracy proxies, drift and monitoring windows for one model release (pure core).
//!
//! [`Monitor`] ties the parts together for one model:
//! - [`proxies`]: per-inference predicted class, top-1, margin, entropy, calibrated
//!   confidence (with [`calibrate`]);
//! - [`labels`]: joins late labels to predictions;
//! - [`window`]: aggregates inferences into [`WindowSummary`]s closed by time or count,
//!   with drift scores from [`drift`] and latency quantiles from [`latency`];
//! - [`reservoir`]: low-confidence inputs kept for retraining, only with consent;
//! - [`health`]: the device-health snapshot the caller attaches to a summary (the only
//!   I/O here).
//!
//! Time is passed in as milliseconds on the caller's (monotonic) clock; nothing here reads a
//! clock. [`Monitor::observe`] is on the inference path: it does not allocate, except when
//! a low-confidence input is copied into the sample reservoir (consent on).
//!
//! ```
//! use std::time::Duration;
//! use outpost_agent::monitor::{Monitor, MonitorConfig};
//! use outpost_protocol::release::ModelRelease;
//!
//! let release = ModelRelease::from_json(br#"{"schema":1,"model":"digits","version":"1.0.0",
//!   "sequence":1,"io":{"inputs":[{"name":"x","dtype":"f32","shape":[1,2]}],
//!   "outputs":[{"name":"y","dtype":"f32","shape":[1,3],"kind":"class_logits"}]}}"#).unwrap();
//! let mut monitor = Monitor::new(&release, MonitorConfig::default(), 0).unwrap();
//! let record = monitor
//!     .observe(1, &[&[0.2, 0.4]], &[0.1, 2.0, -1.0], Duration::from_micros(40), 5)
//!     .unwrap();
//! assert_eq!(record.class.unwrap().class, 1);
//! monitor.report_label(1, 1, 10);
//! let out = monitor.flush(20).unwrap();
//! assert_eq!(out.summary.count, 1);
//! assert_eq!(out.summary.realized.correct, 1);
//! ```

pub mod calibrate;
pub mod drift;
pub mod health;
pub mod labels;
pub mod latency;
pub mod proxies;
pub mod reservoir;
pub mod window;

use std::time::Duration;

use outpost_protocol::release::{ModelRelease, OutputKind};
use serde::{Deserialize, Serialize};

pub use calibrate::Calibration;
pub use health::{HealthProbe, HealthSnapshot};
pub use labels::{Join, LabelConfig, LabelJoin, LabelOutcome, LabelRecord};
pub use proxies::{ClassProxies, ScoreKind, class_proxies};
pub use reservoir::{Offer, Reservoir, ReservoirConfig, SampleRecord};
pub use window::{CloseReason, ModelId, WindowAggregator, WindowConfig, WindowSummary};

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// The output row does not have one value per class.
    #[error("output row has {got} values, expected {expected}")]
    OutputLength {
        /// Classes the release declares.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// The output row holds NaN or infinity.
    #[error("output value {index} is not finite")]
    NonFiniteOutput {
        /// Position of the first bad value.
        index: usize,
    },
    /// A probability output is negative or sums to zero.
    #[error("output value {index} is not a usable probability")]
    InvalidProbabilities {
        /// Position of the bad value.
        index: usize,
    },
    /// The release's calibrator cannot be used.
    #[error("invalid calibrator: {reason}")]
    InvalidCalibrator {
        /// What is wrong.
        reason: String,
    },
    /// The release's reference statistics cannot be used.
    #[error("invalid reference statistics: {reason}")]
    InvalidReference {
        /// What is wrong.
        reason: String,
    },
    /// The configured output is not in the release.
    #[error("output {name:?} is not in the release's io spec")]
    UnknownOutput {
        /// The name asked for.
        name: String,
    },
}

/// Configuration of a [`Monitor`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MonitorConfig {
    /// Window closing and low-confidence threshold.
    pub window: WindowConfig,
    /// Label join retention.
    pub labels: LabelConfig,
    /// Sample reservoir bounds and seed.
    pub reservoir: ReservoirConfig,
    /// The classifier output to read; `None` takes the first classifier output.
    pub output: Option<String>,
}

/// What one inference looked like; returned to the caller of [`Monitor::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InferenceRecord {
    /// The caller's prediction id.
    pub prediction_id: u64,
    /// Inference latency in µs.
    pub latency_us: u64,
    /// When it ran (caller's clock, ms).
    pub at_ms: u64,
    /// Classifier proxies (`None` for models without a classifier output).
    pub class: Option<ClassProxies>,
}

/// Everything a closed window produces for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowOutput {
    /// Outbox class Window. Attach [`HealthSnapshot`] to `summary.health` before sending.
    pub summary: WindowSummary,
    /// Outbox class Sample (empty without consent).
    pub samples: Vec<SampleRecord>,
    /// Outbox class Label: labels joined since the last close or [`Monitor::take_labels`].
    pub labels: Vec<LabelRecord>,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    kind: ScoreKind,
    classes: usize,
}

/// Monitoring of one model release.
#[derive(Debug, Clone)]
pub struct Monitor {
    input_names: Vec<String>,
    class_labels: Vec<String>,
    head: Option<Head>,
    calibration: Calibration,
    window: WindowAggregator,
    labels: LabelJoin,
    label_records: Vec<LabelRecord>,
    max_label_records: usize,
    reservoir: Reservoir,
    offered: u64,
    consent: bool,
}

impl Monitor {
    /// A monitor for `release` whose first window starts at `now_ms`. Consent starts off.
    pub fn new(
        release: &ModelRelease,
        config: MonitorConfig,
        now_ms: u64,
    ) -> Result<Self, MonitorError> {
        let output = match &config.output {
            Some(name) => Some(
                release
                    .io
                    .output(name)
                    .ok_or_else(|| MonitorError::UnknownOutput { name: name.clone() })?,
            ),
            None => release
                .io
                .outputs
                .iter()
                .find(|o| o.class_count().is_some()),
        };
        let head = output.and_then(|o| {
            let kind = match o.kind {
                OutputKind::ClassLogits => ScoreKind::Logits,
                OutputKind::ClassProbabilities => ScoreKind::Probabilities,
                _ => return None,
            };
            let classes = o.class_count().filter(|k| *k > 0)?;
            Some(Head { kind, classes })
        });
        let classes = head.map_or(0, |h| h.classes);
        Ok(Self {
            input_names: release.io.inputs.iter().map(|t| t.name.clone()).collect(),
            class_labels: output.map(|o| o.labels.clone()).unwrap_or_default(),
            head,
            calibration: Calibration::from_release(release.calibrator.as_ref())?,
            window: WindowAggregator::new(release, classes, config.window, now_ms)?,
            labels: LabelJoin::new(config.labels),
            label_records: Vec::new(),
            max_label_records: config.labels.max_pending.max(1),
            reservoir: Reservoir::new(config.reservoir),
            offered: 0,
            consent: false,
        })
    }

    /// The release being monitored.
    pub fn model(&self) -> &ModelId {
        self.window.model()
    }

    /// Class index of a label name from the release's output labels.
    pub fn class_index(&self, label: &str) -> Option<u32> {
        self.class_labels
            .iter()
            .position(|l| l == label)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Whether data collection is allowed.
    pub fn consent(&self) -> bool {
        self.consent
    }

    /// Turns data collection on or off; turning it off discards every held sample.
    pub fn set_consent(&mut self, on: bool) {
        self.consent = on;
        if !on {
            self.reservoir.clear();
            self.offered = 0;
        }
    }

    /// Records one successful inference. `inputs` are the input tensors flattened, in the
    /// release's input order; `output` is the classifier output row (batch 1). An unreadable
    /// output counts as an error in the window and is returned as one.
    pub fn observe(
        &mut self,
        prediction_id: u64,
        inputs: &[&[f32]],
        output: &[f32],
        latency: Duration,
        now_ms: u64,
    ) -> Result<InferenceRecord, MonitorError> {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let class = match self.head {
            Some(head) => {
                let proxies = if output.len() == head.classes {
                    class_proxies(output, head.kind, &self.calibration)
                } else {
                    Err(MonitorError::OutputLength {
                        expected: head.classes,
                        got: output.len(),
                    })
                };
                match proxies {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.window.record_error();
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        self.window.record(inputs, class.as_ref(), latency_us);
        if let Some(p) = &class {
            self.labels
                .remember(prediction_id, p.class, p.calibrated, now_ms);
            if self.consent && p.calibrated < self.window.config().low_confidence_threshold {
                self.offered += 1;
                let offer = Offer {
                    prediction_id,
                    predicted_class: p.class,
                    calibrated: p.calibrated,
                    top1: p.top1,
                    at_ms: now_ms,
                };
                self.reservoir.offer(offer, inputs);
            }
        }
        Ok(InferenceRecord {
            prediction_id,
            latency_us,
            at_ms: now_ms,
            class,
        })
    }

    /// Records a failed inference.
    pub fn observe_error(&mut self) {
        self.window.record_error();
    }

    /// Joins a ground-truth class to an earlier prediction. Joined labels count into the
    /// current window's realized accuracy and are emitted as [`LabelRecord`]s.
    pub fn report_label(&mut self, prediction_id: u64, label: u32, now_ms: u64) -> LabelOutcome {
        match self.labels.join(prediction_id, now_ms) {
            Join::Joined(p) => {
                let correct = p.predicted == label;
                self.window.record_label(correct);
                if self.label_records.len() < self.max_label_records {
                    self.label_records.push(LabelRecord {
                        schema: labels::LABEL_RECORD_SCHEMA,
                        model: self.window.model().clone(),
                        prediction_id,
                        predicted_class: p.predicted,
                        label,
                        correct,
                        calibrated: p.calibrated,
                        predicted_at_ms: p.at_ms,
                        labelled_at_ms: now_ms,
                    });
                } else {
                    self.window.record_dropped_label_record();
                }
                LabelOutcome::Joined { correct }
            }
            Join::Unknown => {
                self.window.record_unknown_label();
                LabelOutcome::Unknown
            }
            Join::Expired => {
                self.window.record_expired_label();
                LabelOutcome::Expired
            }
        }
    }

    /// Label records joined since the last close, for callers that send them at once.
    pub fn take_labels(&mut self) -> Vec<LabelRecord> {
        std::mem::take(&mut self.label_records)
    }

    /// Whether the current window is due at `now_ms` (cheap; call after each inference).
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.window.due(now_ms).is_some()
    }

    /// Closes the current window if it is due by count or time. Call it after inferences
    /// and also from a periodic timer, so that a quiet model's window still closes on time.
    pub fn maybe_close(&mut self, now_ms: u64) -> Option<WindowOutput> {
        let reason = self.window.due(now_ms)?;
        self.close(now_ms, reason)
    }

    /// Closes the current window now (model swap, shutdown). `None` if it saw nothing.
    pub fn flush(&mut self, now_ms: u64) -> Option<WindowOutput> {
        self.close(now_ms, CloseReason::Flush)
    }

    fn close(&mut self, now_ms: u64, reason: CloseReason) -> Option<WindowOutput> {
        self.labels.expire(now_ms);
        let samples = self.reservoir.drain();
        self.window
            .record_samples(std::mem::take(&mut self.offered), samples.len() as u64);
        let summary = self.window.close(now_ms, reason)?;
        let model = self.window.model();
        let samples = samples
            .into_iter()
            .map(|s| SampleRecord::new(model, &self.input_names, s))
            .collect();
        Some(WindowOutput {
            summary,
            samples,
            labels: std::mem::take(&mut self.label_records),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(kind: &str) -> ModelRelease {
        let labels: &[&str] = if kind == "raw" {
            &[]
        } else {
            &["cat", "dog", "eel"]
        };
        ModelRelease::from_value(&serde_json::json!({
            "schema": 1, "model": "m", "version": "2.0.0", "sequence": 2,
            "io": {
                "inputs": [{"name": "x", "dtype": "f32", "shape": [1, 4]}],
                "outputs": [{"name": "y", "dtype": "f32", "shape": [1, 3], "kind": kind,
                             "labels": labels}]
            }
        }))
        .unwrap()
    }

    fn monitor() -> Monitor {
        let config = MonitorConfig {
            reservoir: ReservoirConfig {
                max_count: 4,
                max_bytes: 1 << 16,
                seed: 1,
            },
            ..MonitorConfig::default()
        };
        Monitor::new(&release("class_logits"), config, 0).unwrap()
    }

    const X: [f32; 4] = [0.1, 0.2, 0.3, 0.4];
    const UNSURE: [f32; 3] = [0.0, 0.1, 0.0];
    const SURE: [f32; 3] = [0.0, 9.0, 0.0];

    fn observe(m: &mut Monitor, id: u64, out: &[f32]) -> Result<InferenceRecord, MonitorError> {
        m.observe(id, &[&X], out, Duration::from_micros(50), id)
    }

    #[test]
    fn consent_off_collects_no_samples() {
        let mut m = monitor();
        for id in 0..10 {
            observe(&mut m, id, &UNSURE).unwrap();
        }
        let out = m.flush(100).unwrap();
        assert!(out.samples.is_empty());
        assert_eq!(out.summary.samples.offered, 0);
        assert_eq!(out.summary.low_confidence_rate, Some(1.0));
    }

    #[test]
    fn consent_withdrawn_clears_held_samples() {
        let mut m = monitor();
        m.set_consent(true);
        for id in 0..10 {
            observe(&mut m, id, &UNSURE).unwrap();
            observe(&mut m, 100 + id, &SURE).unwrap();
        }
        m.set_consent(false);
        assert!(m.flush(100).unwrap().samples.is_empty());
        // With consent, only the low-confidence inputs are kept.
        m.set_consent(true);
        for id in 0..10 {
            observe(&mut m, id, &UNSURE).unwrap();
            observe(&mut m, 100 + id, &SURE).unwrap();
        }
        let out = m.flush(200).unwrap();
        assert_eq!(out.samples.len(), 4);
        assert_eq!(out.summary.samples.offered, 10);
        assert!(out.samples.iter().all(|s| s.prediction_id < 100));
        assert_eq!(out.samples[0].inputs["x"], X.to_vec());
        assert_eq!(out.samples[0].model.version, "2.0.0");
    }

    #[test]
    fn unreadable_outputs_count_as_errors() {
        let mut m = monitor();
        assert!(matches!(
            observe(&mut m, 1, &[0.0, 1.0]),
            Err(MonitorError::OutputLength {
                expected: 3,
                got: 2
            })
        ));
        assert!(matches!(
            observe(&mut m, 2, &[0.0, f32::NAN, 1.0]),
            Err(MonitorError::NonFiniteOutput { index: 1 })
        ));
        m.observe_error();
        observe(&mut m, 3, &SURE).unwrap();
        let s = m.flush(10).unwrap().summary;
        assert_eq!((s.count, s.error_count), (1, 3));
        // Failed inferences are not joinable.
        assert_eq!(m.report_label(2, 1, 11), LabelOutcome::Unknown);
    }

    #[test]
    fn raw_output_model_still_counts_latency_without_proxies() {
        let mut m = Monitor::new(&release("raw"), MonitorConfig::default(), 0).unwrap();
        let r = m
            .observe(1, &[&X], &[0.5, f32::NAN], Duration::from_micros(7), 1)
            .unwrap();
        assert_eq!(r.class, None);
        let s = m.flush(2).unwrap().summary;
        assert_eq!(s.count, 1);
        assert_eq!(s.expected_accuracy, None);
        assert!(s.predicted_classes.is_empty());
    }

    #[test]
    fn labels_join_by_class_name_and_are_emitted_once() {
        let mut m = monitor();
        observe(&mut m, 5, &SURE).unwrap();
        let dog = m.class_index("dog").unwrap();
        assert_eq!(m.class_index("yak"), None);
        assert_eq!(
            m.report_label(5, dog, 20),
            LabelOutcome::Joined { correct: true }
        );
        let labels = m.take_labels();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].labelled_at_ms, 20);
        let out = m.flush(30).unwrap();
        assert!(out.labels.is_empty());
        assert_eq!(out.summary.realized.correct, 1);
    }

    #[test]
    fn rejects_unknown_output_name() {
        let config = MonitorConfig {
            output: Some("nope".into()),
            ..MonitorConfig::default()
        };
        assert!(matches!(
            Monitor::new(&release("class_logits"), config, 0),
            Err(MonitorError::UnknownOutput { .. })
        ));
    }
}
