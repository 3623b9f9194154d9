//! Accuracy proxies per model version, aggregated over devices from the window summaries
//! they upload as telemetry (records of class `window`, payload: the agent's
//! `WindowSummary`): `GET /api/v1/models/{name}/quality` and the demo's summary.
//!
//! ```
//! use outpost_server::quality::Aggregator;
//! let mut agg = Aggregator::new("digits");
//! agg.add("dev-1", "window", &serde_json::json!({
//!     "model": "digits", "version": "1.0", "sequence": 1, "count": 200,
//!     "expected_accuracy": 0.97, "realized": {"labels": 100, "correct": 98},
//! }));
//! let q = agg.finish();
//! assert_eq!(q["1.0"].realized_accuracy(), Some(0.98));
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

/// What the windows of one model version say, over every device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct VersionQuality {
    /// Release sequence.
    pub sequence: u64,
    /// Devices that sent window summaries of this version.
    pub devices: u64,
    /// Window summaries.
    pub windows: u64,
    /// Successful inferences in them.
    pub inferences: u64,
    /// Failed inferences.
    pub errors: u64,
    /// CBPE: mean calibrated confidence, weighted by each window's inference count.
    pub expected_accuracy: Option<f64>,
    /// Labels joined to predictions.
    pub labels: u64,
    /// Of those, correct.
    pub correct: u64,
    /// Mean over windows of the mean input-feature PSI.
    pub mean_psi: Option<f64>,
    /// Mean over windows of the mean input-feature Jensen-Shannon divergence.
    pub mean_js: Option<f64>,
    /// The accuracy the release states for its reference data.
    pub reference_accuracy: Option<f64>,
}

impl VersionQuality {
    /// Realized accuracy from labels.
    pub fn realized_accuracy(&self) -> Option<f64> {
        (self.labels > 0).then(|| self.correct as f64 / self.labels as f64)
    }
}

#[derive(Debug, Default)]
struct Sums {
    q: VersionQuality,
    devices: BTreeSet<String>,
    expected: (f64, u64),
    psi: (f64, u64),
    js: (f64, u64),
}

/// Accumulates telemetry records of one model, per version.
#[derive(Debug)]
pub struct Aggregator {
    model: String,
    sums: BTreeMap<String, Sums>,
}

impl Aggregator {
    /// An empty aggregate for `model`.
    pub fn new(model: &str) -> Aggregator {
        Aggregator {
            model: model.to_owned(),
            sums: BTreeMap::new(),
        }
    }

    /// Adds one record of `device`. Records of other classes or models, and fields that
    /// are absent or not numbers, are skipped (payloads are untrusted device input).
    pub fn add(&mut self, device: &str, class: &str, p: &Value) {
        if class != "window" || p["model"] != self.model.as_str() {
            return;
        }
        let Some(version) = p["version"].as_str() else {
            return;
        };
        let s = self.sums.entry(version.to_owned()).or_default();
        if !s.devices.contains(device) {
            s.devices.insert(device.to_owned());
        }
        let count = p["count"].as_u64().unwrap_or(0);
        s.q.sequence = p["sequence"].as_u64().unwrap_or(s.q.sequence);
        s.q.windows += 1;
        s.q.inferences = s.q.inferences.saturating_add(count);
        s.q.errors =
            s.q.errors
                .saturating_add(p["error_count"].as_u64().unwrap_or(0));
        if let Some(e) = p["expected_accuracy"].as_f64().filter(|e| e.is_finite()) {
            s.expected.0 += e * count as f64;
            s.expected.1 = s.expected.1.saturating_add(count);
        }
        let labels = p["realized"]["labels"].as_u64().unwrap_or(0);
        let correct = p["realized"]["correct"].as_u64().unwrap_or(0).min(labels);
        s.q.labels = s.q.labels.saturating_add(labels);
        s.q.correct = s.q.correct.saturating_add(correct);
        let features = &p["drift"]["features"];
        if let Some(v) = features["mean_psi"].as_f64().filter(|v| v.is_finite()) {
            s.psi.0 += v;
            s.psi.1 += 1;
        }
        if let Some(v) = features["mean_js"].as_f64().filter(|v| v.is_finite()) {
            s.js.0 += v;
            s.js.1 += 1;
        }
        if let Some(a) = p["reference_accuracy"].as_f64() {
            s.q.reference_accuracy = Some(a);
        }
    }

    /// The aggregate per version.
    pub fn finish(self) -> BTreeMap<String, VersionQuality> {
        let mean = |(sum, n): (f64, u64)| (n > 0).then(|| sum / n as f64);
        self.sums
            .into_iter()
            .map(|(v, s)| {
                let mut q = s.q;
                q.devices = s.devices.len() as u64;
                q.expected_accuracy = mean(s.expected);
                q.mean_psi = mean(s.psi);
                q.mean_js = mean(s.js);
                (v, q)
            })
            .collect()
    }
}

/// Aggregates records as the telemetry API returns them (`{class, payload}`), all from
/// one device.
pub fn by_version<'a>(
    model: &str,
    device: &str,
    records: impl IntoIterator<Item = &'a Value>,
) -> BTreeMap<String, VersionQuality> {
    let mut agg = Aggregator::new(model);
    for r in records {
        agg.add(device, r["class"].as_str().unwrap_or(""), &r["payload"]);
    }
    agg.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn window(version: &str, count: u64, expected: f64, labels: u64, correct: u64) -> Value {
        json!({"seq": 1, "class": "window", "payload": {
            "schema": 1, "model": "m", "version": version, "sequence": 2,
            "count": count, "error_count": 0, "expected_accuracy": expected,
            "realized": {"labels": labels, "correct": correct},
            "drift": {"features": {"mean_psi": 0.2, "mean_js": 0.01}},
            "reference_accuracy": 0.97,
        }})
    }

    #[test]
    fn expected_accuracy_is_weighted_by_window_size_and_realized_pools_labels() {
        let records = [
            window("1.0", 300, 0.9, 10, 9),
            window("1.0", 100, 0.5, 30, 15),
            window("1.1", 50, 0.95, 0, 0),
        ];
        let q = by_version("m", "d", &records);
        let v = &q["1.0"];
        assert_eq!(
            (v.windows, v.inferences, v.labels, v.correct),
            (2, 400, 40, 24)
        );
        assert!((v.expected_accuracy.unwrap() - 0.8).abs() < 1e-12);
        assert!((v.realized_accuracy().unwrap() - 0.6).abs() < 1e-12);
        assert!((v.mean_psi.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(v.reference_accuracy, Some(0.97));
        assert_eq!(q["1.1"].realized_accuracy(), None);
    }

    #[test]
    fn devices_are_counted_once_and_inflated_correct_counts_are_capped() {
        let mut agg = Aggregator::new("m");
        let mut lying = window("1.0", 10, 0.9, 5, 50);
        agg.add("a", "window", &lying["payload"]);
        lying["payload"]["realized"]["correct"] = json!(1);
        agg.add("a", "window", &lying["payload"]);
        agg.add("b", "window", &window("1.0", 10, 0.9, 0, 0)["payload"]);
        let q = agg.finish();
        assert_eq!(q["1.0"].devices, 2);
        assert_eq!((q["1.0"].labels, q["1.0"].correct), (10, 6));
    }

    #[test]
    fn other_models_classes_and_malformed_payloads_are_skipped() {
        let mut other_model = window("1.0", 10, 0.9, 1, 1);
        other_model["payload"]["model"] = json!("other");
        let mut label = window("1.0", 10, 0.9, 1, 1);
        label["class"] = json!("label");
        let no_version = json!({"class": "window", "payload": {"model": "m", "count": 5}});
        let garbage = json!({"class": "window", "payload": "not a summary"});
        let q = by_version("m", "d", &[other_model, label, no_version, garbage]);
        assert!(q.is_empty(), "{q:?}");
    }
}
