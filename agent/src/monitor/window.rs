//! Monitoring windows: per-model-version aggregation that closes by time or by count.
//!
//! [`WindowAggregator::record`] is the hot path: a few counter increments plus one binary
//! search per reference feature over that feature's bin edges; it never allocates.
//! [`WindowAggregator::close`] builds the [`WindowSummary`] (drift scores included) and
//! resets the counters for the next window.

use outpost_protocol::release::{Histogram, ModelRelease};
use serde::{Deserialize, Serialize};

use super::MonitorError;
use super::drift::{DriftScore, drift};
use super::health::HealthSnapshot;
use super::latency::{LatencyHistogram, LatencySummary};
use super::proxies::ClassProxies;

/// Version of the [`WindowSummary`] JSON this crate writes.
pub const WINDOW_SUMMARY_SCHEMA: u32 = 1;
/// Bins of the fixed confidence histogram on `[0, 1]`.
pub const CONFIDENCE_BINS: usize = 10;
/// PSI above which a feature counts as drifted in [`FeatureDrift::drifted`].
pub const PSI_DRIFT_THRESHOLD: f64 = 0.25;

/// When windows close and what counts as low confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowConfig {
    /// Close after this many milliseconds (on the caller's clock).
    pub max_duration_ms: u64,
    /// Close after this many inferences (errors included).
    pub max_count: u64,
    /// Calibrated confidence below this is "low".
    pub low_confidence_threshold: f32,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            max_duration_ms: 60_000,
            max_count: 1000,
            low_confidence_threshold: 0.5,
        }
    }
}

/// Why a window closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// `max_count` inferences were seen.
    Count,
    /// `max_duration_ms` elapsed.
    Time,
    /// The caller flushed it (model swap, shutdown).
    Flush,
}

/// The model release a window belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    /// Model slot name.
    pub model: String,
    /// Release version string.
    pub version: String,
    /// Per-model release sequence.
    pub sequence: u64,
}

impl ModelId {
    /// The id of a release.
    pub fn of(release: &ModelRelease) -> Self {
        Self {
            model: release.model.clone(),
            version: release.version.clone(),
            sequence: release.sequence,
        }
    }
}

/// Label feedback joined during a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RealizedAccuracy {
    /// Labels joined to a known prediction.
    pub labels: u64,
    /// Of those, how many matched the prediction.
    pub correct: u64,
    /// `correct / labels`, when there were labels.
    pub accuracy: Option<f64>,
    /// Labels for prediction ids never seen (or evicted without trace).
    pub unknown: u64,
    /// Labels that arrived after the retention window.
    pub expired: u64,
    /// Joined labels whose outbox record was dropped because the label buffer was full.
    #[serde(default)]
    pub records_dropped: u64,
}

/// Observed histogram of one reference feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureWindow {
    /// Input tensor name.
    pub input: String,
    /// Flat index within one sample of that input.
    pub index: usize,
    /// Counts on the reference bins.
    pub counts: Vec<u64>,
    /// Drift against the reference frequencies (`None` without observations).
    pub drift: Option<DriftScore>,
}

/// Drift aggregated over features.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    /// Features with a score.
    pub scored: usize,
    /// Mean PSI over scored features.
    pub mean_psi: f64,
    /// Largest PSI.
    pub max_psi: f64,
    /// Mean JS divergence.
    pub mean_js: f64,
    /// Largest JS divergence.
    pub max_js: f64,
    /// Features with PSI above [`PSI_DRIFT_THRESHOLD`].
    pub drifted: usize,
}

/// All drift scores of a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftSummary {
    /// Input-feature drift aggregated over the reference features.
    pub features: Option<FeatureDrift>,
    /// Predicted-class distribution against the reference class prior.
    pub prediction: Option<DriftScore>,
    /// Raw top-1 confidence against the reference confidence histogram.
    pub confidence: Option<DriftScore>,
}

/// What one window saw; the JSON payload of an outbox record of class Window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    /// [`WINDOW_SUMMARY_SCHEMA`].
    pub schema: u32,
    /// Model release.
    #[serde(flatten)]
    pub model: ModelId,
    /// Index of this window since the aggregator was created (0-based).
    pub window_index: u64,
    /// Window start on the caller's clock (ms).
    pub start_ms: u64,
    /// Window end on the caller's clock (ms).
    pub end_ms: u64,
    /// Wall-clock end (Unix ms), set by the caller when it has a real-time clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_end_ms: Option<u64>,
    /// Why the window closed.
    pub closed_by: CloseReason,
    /// Successful inferences.
    pub count: u64,
    /// Failed inferences (runtime errors, unreadable outputs).
    pub error_count: u64,
    /// Latency of successful inferences.
    pub latency: LatencySummary,
    /// Raw top-1 probability in [`CONFIDENCE_BINS`] equal bins on `[0, 1]`.
    pub confidence_histogram: Vec<u64>,
    /// Threshold on calibrated confidence used for `low_confidence_rate`.
    pub low_confidence_threshold: f32,
    /// Share of classified inferences with calibrated confidence below the threshold.
    pub low_confidence_rate: Option<f64>,
    /// Count per predicted class.
    pub predicted_classes: Vec<u64>,
    /// CBPE: mean calibrated top-1 confidence (the expected accuracy).
    pub expected_accuracy: Option<f64>,
    /// Accuracy from labels joined during this window.
    pub realized: RealizedAccuracy,
    /// The reference accuracy the release states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_accuracy: Option<f64>,
    /// Per-feature histograms on the reference bins.
    pub features: Vec<FeatureWindow>,
    /// Feature lookups skipped because an input was shorter than the reference index.
    pub missing_features: u64,
    /// Drift scores.
    pub drift: DriftSummary,
    /// Low-confidence inputs offered to the sample reservoir and how many were kept.
    pub samples: SampleStats,
    /// Device health, attached by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSnapshot>,
}

/// Reservoir activity in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleStats {
    /// Inputs offered (low confidence, consent on).
    pub offered: u64,
    /// Inputs emitted with this window.
    pub kept: u64,
}

impl WindowSummary {
    /// JSON bytes for the outbox.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("window summaries always serialize")
    }
}

#[derive(Debug, Clone)]
struct FeatureSlot {
    input: usize,
    index: usize,
    /// Start of this feature's `bins + 1` edges in `FeatureBinner::edges`.
    edges_start: usize,
    bins: usize,
    counts_start: usize,
    /// Equal-width bins: the bin is guessed arithmetically, then checked against the edges.
    uniform: bool,
    lo: f64,
    inv_width: f64,
}

/// Per-feature binning compiled from the reference; edges and counts are flat arrays.
#[derive(Debug, Clone, Default)]
struct FeatureBinner {
    slots: Vec<FeatureSlot>,
    names: Vec<(String, usize)>,
    frequencies: Vec<Vec<f64>>,
    edges: Vec<f64>,
    counts: Vec<u64>,
    missing: u64,
}

impl FeatureBinner {
    fn new(release: &ModelRelease) -> Result<Self, MonitorError> {
        let mut b = FeatureBinner::default();
        let Some(reference) = &release.reference else {
            return Ok(b);
        };
        for f in &reference.features {
            let input = release
                .io
                .inputs
                .iter()
                .position(|t| t.name == f.input)
                .ok_or_else(|| MonitorError::InvalidReference {
                    reason: format!("feature names unknown input {:?}", f.input),
                })?;
            check_histogram(&f.histogram)?;
            let edges = &f.histogram.edges;
            let bins = f.histogram.frequencies.len();
            let (lo, hi) = (edges[0], edges[bins]);
            let width = (hi - lo) / bins as f64;
            let uniform = width.is_finite()
                && width > 0.0
                && edges
                    .iter()
                    .enumerate()
                    .all(|(i, e)| (e - (lo + i as f64 * width)).abs() <= 1e-6 * width);
            b.slots.push(FeatureSlot {
                input,
                index: f.index,
                edges_start: b.edges.len(),
                bins,
                counts_start: b.counts.len(),
                uniform,
                lo,
                inv_width: if uniform { 1.0 / width } else { 0.0 },
            });
            b.edges.extend_from_slice(edges);
            b.counts.resize(b.counts.len() + bins, 0);
            b.names.push((f.input.clone(), f.index));
            b.frequencies.push(f.histogram.frequencies.clone());
        }
        Ok(b)
    }

    #[inline]
    fn record(&mut self, inputs: &[&[f32]]) {
        for s in &self.slots {
            let Some(&v) = inputs.get(s.input).and_then(|x| x.get(s.index)) else {
                self.missing += 1;
                continue;
            };
            let edges = &self.edges[s.edges_start..s.edges_start + s.bins + 1];
            let bin = bin_of(s, edges, f64::from(v));
            self.counts[s.counts_start + bin] += 1;
        }
    }

    fn take(&mut self) -> (Vec<FeatureWindow>, u64) {
        let out = self
            .slots
            .iter()
            .zip(&self.names)
            .zip(&self.frequencies)
            .map(|((s, (input, index)), freq)| {
                let counts = self.counts[s.counts_start..s.counts_start + s.bins].to_vec();
                FeatureWindow {
                    input: input.clone(),
                    index: *index,
                    drift: drift(&counts, freq),
                    counts,
                }
            })
            .collect();
        self.counts.iter_mut().for_each(|c| *c = 0);
        (out, std::mem::take(&mut self.missing))
    }
}

/// Bin of `v` by the rule of `Histogram::bin`: the number of inner edges `<= v`, so values
/// outside the edges fall in the outer bins and NaN in bin 0. `edges` are all `bins + 1`.
#[inline]
fn bin_of(s: &FeatureSlot, edges: &[f64], v: f64) -> usize {
    let last = s.bins - 1;
    if !s.uniform {
        return edges[1..=last].partition_point(|e| *e <= v);
    }
    // Below the first inner edge, or NaN.
    if v.is_nan() || v < edges[1] {
        return 0;
    }
    // The guess can be off by one where rounding meets an edge; the loops correct it.
    let mut b = (((v - s.lo) * s.inv_width) as usize).min(last);
    while b > 0 && edges[b] > v {
        b -= 1;
    }
    while b < last && edges[b + 1] <= v {
        b += 1;
    }
    b
}

fn check_histogram(h: &Histogram) -> Result<(), MonitorError> {
    h.validate().map_err(|e| MonitorError::InvalidReference {
        reason: e.to_string(),
    })
}

/// Reference bins for the raw top-1 confidence.
#[derive(Debug, Clone)]
struct RefBins {
    histogram: Histogram,
    counts: Vec<u64>,
}

/// Aggregates one model release's inferences into windows.
#[derive(Debug, Clone)]
pub struct WindowAggregator {
    id: ModelId,
    config: WindowConfig,
    window_index: u64,
    start_ms: u64,
    count: u64,
    errors: u64,
    latency: LatencyHistogram,
    confidence: [u64; CONFIDENCE_BINS],
    classified: u64,
    low_confidence: u64,
    calibrated_sum: f64,
    classes: Vec<u64>,
    class_prior: Option<Vec<f64>>,
    confidence_ref: Option<RefBins>,
    reference_accuracy: Option<f64>,
    features: FeatureBinner,
    realized: RealizedAccuracy,
    samples: SampleStats,
}

impl WindowAggregator {
    /// An aggregator for `release` with `classes` output classes (0 for non-classifiers),
    /// whose first window starts at `now_ms`.
    pub fn new(
        release: &ModelRelease,
        classes: usize,
        config: WindowConfig,
        now_ms: u64,
    ) -> Result<Self, MonitorError> {
        let reference = release.reference.as_ref();
        let class_prior = reference.and_then(|r| r.class_prior.clone());
        if let Some(p) = &class_prior
            && p.len() != classes
        {
            return Err(MonitorError::InvalidReference {
                reason: format!("class_prior has {} entries for {classes} classes", p.len()),
            });
        }
        let confidence_ref = match reference.and_then(|r| r.confidence.as_ref()) {
            Some(h) => {
                check_histogram(h)?;
                Some(RefBins {
                    histogram: h.clone(),
                    counts: vec![0; h.frequencies.len()],
                })
            }
            None => None,
        };
        Ok(Self {
            id: ModelId::of(release),
            config,
            window_index: 0,
            start_ms: now_ms,
            count: 0,
            errors: 0,
            latency: LatencyHistogram::default(),
            confidence: [0; CONFIDENCE_BINS],
            classified: 0,
            low_confidence: 0,
            calibrated_sum: 0.0,
            classes: vec![0; classes],
            class_prior,
            confidence_ref,
            reference_accuracy: reference.and_then(|r| r.accuracy),
            features: FeatureBinner::new(release)?,
            realized: RealizedAccuracy::default(),
            samples: SampleStats::default(),
        })
    }

    /// The release this aggregator belongs to.
    pub fn model(&self) -> &ModelId {
        &self.id
    }

    /// The configuration.
    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    /// Counts one successful inference (hot path: no allocation).
    #[inline]
    pub fn record(&mut self, inputs: &[&[f32]], proxies: Option<&ClassProxies>, latency_us: u64) {
        self.count += 1;
        self.latency.record(latency_us);
        self.features.record(inputs);
        if let Some(p) = proxies {
            self.classified += 1;
            let top1 = f64::from(p.top1);
            let bin = ((top1 * CONFIDENCE_BINS as f64) as usize).min(CONFIDENCE_BINS - 1);
            self.confidence[bin] += 1;
            if p.calibrated < self.config.low_confidence_threshold {
                self.low_confidence += 1;
            }
            self.calibrated_sum += f64::from(p.calibrated);
            if let Some(c) = self.classes.get_mut(p.class as usize) {
                *c += 1;
            }
            if let Some(r) = &mut self.confidence_ref {
                r.counts[r.histogram.bin(top1)] += 1;
            }
        }
    }

    /// Counts one failed inference.
    pub fn record_error(&mut self) {
        self.errors += 1;
    }

    /// Counts a label joined to a prediction.
    pub fn record_label(&mut self, correct: bool) {
        self.realized.labels += 1;
        self.realized.correct += u64::from(correct);
    }

    /// Counts a label for an unknown prediction id.
    pub fn record_unknown_label(&mut self) {
        self.realized.unknown += 1;
    }

    /// Counts a label that arrived too late.
    pub fn record_expired_label(&mut self) {
        self.realized.expired += 1;
    }

    pub(crate) fn record_dropped_label_record(&mut self) {
        self.realized.records_dropped += 1;
    }

    pub(crate) fn record_samples(&mut self, offered: u64, kept: u64) {
        self.samples.offered += offered;
        self.samples.kept += kept;
    }

    /// Whether the current window is due, and why.
    #[inline]
    pub fn due(&self, now_ms: u64) -> Option<CloseReason> {
        if self.count + self.errors >= self.config.max_count {
            Some(CloseReason::Count)
        } else if now_ms.saturating_sub(self.start_ms) >= self.config.max_duration_ms {
            Some(CloseReason::Time)
        } else {
            None
        }
    }

    /// Whether nothing at all happened in the current window.
    pub fn is_empty(&self) -> bool {
        self.count == 0
            && self.errors == 0
            && self.realized.labels == 0
            && self.realized.unknown == 0
            && self.realized.expired == 0
    }

    /// Ends the current window at `now_ms` and starts the next one. An empty window
    /// restarts silently and yields `None`.
    pub fn close(&mut self, now_ms: u64, reason: CloseReason) -> Option<WindowSummary> {
        if self.is_empty() {
            self.start_ms = now_ms;
            return None;
        }
        let (features, missing_features) = self.features.take();
        let feature_drift = aggregate(&features);
        let prediction = self
            .class_prior
            .as_ref()
            .and_then(|p| drift(&self.classes, p));
        let confidence = self.confidence_ref.as_mut().and_then(|r| {
            let d = drift(&r.counts, &r.histogram.frequencies);
            r.counts.iter_mut().for_each(|c| *c = 0);
            d
        });
        let mut realized = std::mem::take(&mut self.realized);
        realized.accuracy =
            (realized.labels > 0).then(|| realized.correct as f64 / realized.labels as f64);
        let classified = self.classified;
        let summary = WindowSummary {
            schema: WINDOW_SUMMARY_SCHEMA,
            model: self.id.clone(),
            window_index: self.window_index,
            start_ms: self.start_ms,
            end_ms: now_ms,
            unix_end_ms: None,
            closed_by: reason,
            count: self.count,
            error_count: self.errors,
            latency: self.latency.summary(),
            confidence_histogram: self.confidence.to_vec(),
            low_confidence_threshold: self.config.low_confidence_threshold,
            low_confidence_rate: (classified > 0)
                .then(|| self.low_confidence as f64 / classified as f64),
            predicted_classes: self.classes.clone(),
            expected_accuracy: (classified > 0).then(|| self.calibrated_sum / classified as f64),
            realized,
            reference_accuracy: self.reference_accuracy,
            features,
            missing_features,
            drift: DriftSummary {
                features: feature_drift,
                prediction,
                confidence,
            },
            samples: std::mem::take(&mut self.samples),
            health: None,
        };
        self.window_index += 1;
        self.start_ms = now_ms;
        self.count = 0;
        self.errors = 0;
        self.latency = LatencyHistogram::default();
        self.confidence = [0; CONFIDENCE_BINS];
        self.classified = 0;
        self.low_confidence = 0;
        self.calibrated_sum = 0.0;
        self.classes.iter_mut().for_each(|c| *c = 0);
        Some(summary)
    }
}

fn aggregate(features: &[FeatureWindow]) -> Option<FeatureDrift> {
    let scores: Vec<DriftScore> = features.iter().filter_map(|f| f.drift).collect();
    if scores.is_empty() {
        return None;
    }
    let n = scores.len() as f64;
    Some(FeatureDrift {
        scored: scores.len(),
        mean_psi: scores.iter().map(|s| s.psi).sum::<f64>() / n,
        max_psi: scores.iter().map(|s| s.psi).fold(0.0, f64::max),
        mean_js: scores.iter().map(|s| s.js).sum::<f64>() / n,
        max_js: scores.iter().map(|s| s.js).fold(0.0, f64::max),
        drifted: scores
            .iter()
            .filter(|s| s.psi > PSI_DRIFT_THRESHOLD)
            .count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn release() -> ModelRelease {
        ModelRelease::from_value(&serde_json::json!({
            "schema": 1, "model": "m", "version": "1.0.0", "sequence": 4,
            "io": {
                "inputs": [{"name": "x", "dtype": "f32", "shape": [1, 2]}],
                "outputs": [{"name": "y", "dtype": "f32", "shape": [1, 2], "kind": "class_logits"}]
            },
            "reference": {
                "sample_count": 100,
                "features": [
                    {"input": "x", "index": 0, "histogram": {"edges": [0.0, 0.5, 1.0], "frequencies": [0.5, 0.5]}},
                    {"input": "x", "index": 1, "histogram": {"edges": [0.0, 0.5, 1.0], "frequencies": [0.5, 0.5]}}
                ],
                "class_prior": [0.5, 0.5],
                "confidence": {"edges": [0.0, 0.75, 1.0], "frequencies": [0.5, 0.5]},
                "accuracy": 0.9
            }
        }))
        .unwrap()
    }

    fn proxies(class: u32, top1: f32, calibrated: f32) -> ClassProxies {
        ClassProxies {
            class,
            top1,
            margin: 0.0,
            entropy: 0.0,
            entropy_norm: 0.0,
            calibrated,
        }
    }

    fn config(max_count: u64, max_duration_ms: u64) -> WindowConfig {
        WindowConfig {
            max_count,
            max_duration_ms,
            ..WindowConfig::default()
        }
    }

    #[test]
    fn window_closes_by_count() {
        let mut w = WindowAggregator::new(&release(), 2, config(3, 60_000), 0).unwrap();
        let p = proxies(0, 0.9, 0.9);
        for i in 0..2 {
            w.record(&[&[0.1, 0.1]], Some(&p), 10);
            assert_eq!(w.due(i), None);
        }
        w.record(&[&[0.1, 0.1]], Some(&p), 10);
        assert_eq!(w.due(5), Some(CloseReason::Count));
        let s = w.close(5, CloseReason::Count).unwrap();
        assert_eq!(
            (s.count, s.start_ms, s.end_ms, s.window_index),
            (3, 0, 5, 0)
        );
        assert_eq!(w.due(6), None);
    }

    #[test]
    fn window_closes_by_time_passed_in() {
        let mut w = WindowAggregator::new(&release(), 2, config(1000, 60_000), 1_000).unwrap();
        w.record(&[&[0.1, 0.1]], Some(&proxies(0, 0.9, 0.9)), 10);
        assert_eq!(w.due(60_999), None);
        assert_eq!(w.due(61_000), Some(CloseReason::Time));
        let s = w.close(61_000, CloseReason::Time).unwrap();
        assert_eq!(
            (s.start_ms, s.end_ms, s.closed_by),
            (1_000, 61_000, CloseReason::Time)
        );
        // The next window starts where this one ended.
        assert_eq!(w.due(120_999), None);
        assert_eq!(w.due(121_000), Some(CloseReason::Time));
        // Nothing happened in it: no summary, but the window restarts.
        assert_eq!(w.close(121_000, CloseReason::Time), None);
        assert_eq!(w.due(121_001), None);
    }

    #[test]
    fn summary_counts_and_cbpe_is_mean_calibrated_confidence() {
        let mut w = WindowAggregator::new(&release(), 2, config(1000, 60_000), 0).unwrap();
        // calibrated: 0.9, 0.4, 0.8, 0.3 -> CBPE 0.6; low (< 0.5): 2 of 4.
        w.record(&[&[0.1, 0.9]], Some(&proxies(0, 0.95, 0.9)), 10);
        w.record(&[&[0.2, 0.8]], Some(&proxies(1, 0.55, 0.4)), 20);
        w.record(&[&[0.6, 0.7]], Some(&proxies(1, 0.85, 0.8)), 30);
        w.record(&[&[0.7, 0.1]], Some(&proxies(1, 0.52, 0.3)), 40);
        w.record_error();
        w.record_label(true);
        w.record_label(false);
        w.record_label(true);
        w.record_unknown_label();
        let s = w.close(100, CloseReason::Flush).unwrap();
        assert!((s.expected_accuracy.unwrap() - 0.6).abs() < 1e-6);
        assert_eq!(s.low_confidence_rate, Some(0.5));
        assert_eq!(s.predicted_classes, vec![1, 3]);
        assert_eq!((s.count, s.error_count), (4, 1));
        assert_eq!(s.confidence_histogram[9], 1);
        assert_eq!(s.confidence_histogram[5], 2);
        assert_eq!(s.confidence_histogram[8], 1);
        assert_eq!(s.features[0].counts, vec![2, 2]);
        assert_eq!(s.features[1].counts, vec![1, 3]);
        assert_eq!(s.realized.labels, 3);
        assert_eq!(s.realized.correct, 2);
        assert_eq!(s.realized.unknown, 1);
        assert!((s.realized.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.reference_accuracy, Some(0.9));
        // Feature 0 matches its reference exactly: no drift.
        assert!(s.features[0].drift.unwrap().js.abs() < 1e-12);
        assert!(s.features[1].drift.unwrap().psi > 0.0);
        // Predictions [0.25, 0.75] vs prior [0.5, 0.5]: PSI 0.2747 (see drift.rs).
        assert!((s.drift.prediction.unwrap().psi - 0.2747).abs() < 1e-3);
        // Top-1 on the reference bins [0, 0.75, 1]: [2, 2] vs [0.5, 0.5], no drift.
        assert!(s.drift.confidence.unwrap().psi.abs() < 1e-9);
        assert_eq!(s.drift.features.unwrap().scored, 2);
        // Everything resets for the next window.
        w.record(&[&[0.1, 0.1]], None, 10);
        let t = w.close(200, CloseReason::Flush).unwrap();
        assert_eq!((t.count, t.error_count, t.realized.labels), (1, 0, 0));
        assert_eq!(t.features[0].counts, vec![1, 0]);
        assert_eq!(t.expected_accuracy, None);
        assert_eq!(t.window_index, 1);
    }

    #[test]
    fn short_input_counts_missing_features_instead_of_panicking() {
        let mut w = WindowAggregator::new(&release(), 2, config(1000, 60_000), 0).unwrap();
        w.record(&[&[0.1]], None, 10);
        w.record(&[], None, 10);
        let s = w.close(1, CloseReason::Flush).unwrap();
        assert_eq!(s.missing_features, 3);
        assert_eq!(s.features[0].counts, vec![1, 0]);
    }

    #[test]
    fn feature_binning_matches_histogram_bin_on_edges_and_outliers() {
        let uniform = Histogram {
            edges: (0..=10).map(|i| f64::from(i) / 10.0).collect(),
            frequencies: vec![0.1; 10],
        };
        let skewed = Histogram {
            edges: vec![-1.0, 0.0, 0.01, 0.5, 3.0],
            frequencies: vec![0.25; 4],
        };
        let single = Histogram {
            edges: vec![0.0, 1.0],
            frequencies: vec![1.0],
        };
        let mut r = release();
        r.io.inputs[0].shape = vec![1, 3];
        let reference = r.reference.as_mut().unwrap();
        reference.features.clear();
        for (i, h) in [&uniform, &skewed, &single].into_iter().enumerate() {
            reference
                .features
                .push(outpost_protocol::release::FeatureReference {
                    input: "x".into(),
                    index: i,
                    histogram: h.clone(),
                });
        }
        let binner = FeatureBinner::new(&r).unwrap();
        assert!(binner.slots[0].uniform && !binner.slots[1].uniform);
        let mut values: Vec<f32> = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
        values.extend((0..=10).map(|i| i as f32 / 10.0));
        values.extend([
            0.3f32, 0.7, 0.29999998, 0.70000005, 0.01, 0.5, 3.0, -1.0, 1.0,
        ]);
        let mut rng = fastrand::Rng::with_seed(3);
        values.extend((0..2000).map(|_| rng.f32() * 5.0 - 2.0));
        for (slot, h) in binner.slots.iter().zip([&uniform, &skewed, &single]) {
            let edges = &binner.edges[slot.edges_start..slot.edges_start + slot.bins + 1];
            for &v in &values {
                let v = f64::from(v);
                assert_eq!(
                    bin_of(slot, edges, v),
                    h.bin(v),
                    "value {v} edges {:?}",
                    h.edges
                );
            }
        }
    }

    #[test]
    fn rejects_class_prior_of_wrong_length() {
        assert!(matches!(
            WindowAggregator::new(&release(), 3, WindowConfig::default(), 0),
            Err(MonitorError::InvalidReference { .. })
        ));
    }

    #[test]
    fn summary_json_round_trips_with_schema() {
        let mut w = WindowAggregator::new(&release(), 2, WindowConfig::default(), 0).unwrap();
        w.record(&[&[0.1, 0.9]], Some(&proxies(0, 0.95, 0.9)), 10);
        let s = w.close(10, CloseReason::Flush).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.to_json_bytes()).unwrap();
        assert_eq!(v["schema"], WINDOW_SUMMARY_SCHEMA);
        assert_eq!(v["model"], "m");
        assert_eq!(v["sequence"], 4);
        let back: WindowSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
