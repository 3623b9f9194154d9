//! Retraining samples: a uniform reservoir of low-confidence inputs under a byte budget.
//!
//! Algorithm R (Vitter): the n-th eligible input replaces a random slot with probability
//! `k / n`, where `k` is the number of slots. Slots are limited both by `max_count` and by
//! `max_bytes`: while both allow it, inputs are appended; after that `k` is the number of
//! samples held. With equally sized inputs (one model, fixed shapes) every eligible input
//! of a window is kept with the same probability. A replacement that would break the byte
//! budget is skipped. The random source is `fastrand` seeded by the caller, so a given
//! seed and stream always keep the same samples.
//!
//! The reservoir holds data only while data-collection consent is on; the [`super::Monitor`]
//! clears it when consent is withdrawn.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::window::ModelId;

/// Version of the [`SampleRecord`] JSON this crate writes.
pub const SAMPLE_RECORD_SCHEMA: u32 = 1;
/// Bytes charged per sample on top of its input data (ids, proxies, bookkeeping).
pub const SAMPLE_OVERHEAD_BYTES: usize = 64;

/// Bounds and seed of a reservoir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservoirConfig {
    /// Most samples kept per window.
    pub max_count: usize,
    /// Most bytes kept per window (input data plus [`SAMPLE_OVERHEAD_BYTES`] each).
    pub max_bytes: usize,
    /// Seed of the random source.
    pub seed: u64,
}

impl Default for ReservoirConfig {
    fn default() -> Self {
        Self {
            max_count: 32,
            max_bytes: 256 * 1024,
            seed: 0x5eed,
        }
    }
}

/// One kept input.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The caller's prediction id.
    pub prediction_id: u64,
    /// Predicted class.
    pub predicted_class: u32,
    /// Calibrated confidence.
    pub calibrated: f32,
    /// Raw top-1 probability.
    pub top1: f32,
    /// When it was seen (caller's clock, ms).
    pub at_ms: u64,
    /// Input tensors in io-spec order, flattened.
    pub inputs: Vec<Vec<f32>>,
}

impl Sample {
    /// Bytes this sample is charged against the budget.
    pub fn charged_bytes(&self) -> usize {
        charged(self.inputs.iter().map(Vec::len))
    }
}

fn charged(lens: impl Iterator<Item = usize>) -> usize {
    lens.map(|n| n.saturating_mul(4))
        .fold(SAMPLE_OVERHEAD_BYTES, usize::saturating_add)
}

/// The metadata of an input offered to the reservoir.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer {
    /// The caller's prediction id.
    pub prediction_id: u64,
    /// Predicted class.
    pub predicted_class: u32,
    /// Calibrated confidence.
    pub calibrated: f32,
    /// Raw top-1 probability.
    pub top1: f32,
    /// When it was seen.
    pub at_ms: u64,
}

/// A reservoir sampler.
#[derive(Debug, Clone)]
pub struct Reservoir {
    config: ReservoirConfig,
    rng: fastrand::Rng,
    seen: u64,
    bytes: usize,
    items: Vec<Sample>,
}

impl Reservoir {
    /// An empty reservoir.
    pub fn new(config: ReservoirConfig) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            seen: 0,
            bytes: 0,
            items: Vec::new(),
        }
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes held (as charged).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Eligible inputs offered since the last drain.
    pub fn offered(&self) -> u64 {
        self.seen
    }

    /// Offers an input; returns whether it was kept. Inputs larger than the whole budget
    /// are refused without counting.
    pub fn offer(&mut self, meta: Offer, inputs: &[&[f32]]) -> bool {
        let size = charged(inputs.iter().map(|x| x.len()));
        if size > self.config.max_bytes || self.config.max_count == 0 {
            return false;
        }
        self.seen += 1;
        if self.items.len() < self.config.max_count && self.bytes + size <= self.config.max_bytes {
            self.items.push(Sample {
                prediction_id: meta.prediction_id,
                predicted_class: meta.predicted_class,
                calibrated: meta.calibrated,
                top1: meta.top1,
                at_ms: meta.at_ms,
                inputs: inputs.iter().map(|x| x.to_vec()).collect(),
            });
            self.bytes += size;
            return true;
        }
        let j = self.rng.u64(0..self.seen);
        let Some(slot) = usize::try_from(j).ok().and_then(|j| self.items.get_mut(j)) else {
            return false;
        };
        let old = slot.charged_bytes();
        if self.bytes - old + size > self.config.max_bytes {
            return false;
        }
        slot.prediction_id = meta.prediction_id;
        slot.predicted_class = meta.predicted_class;
        slot.calibrated = meta.calibrated;
        slot.top1 = meta.top1;
        slot.at_ms = meta.at_ms;
        // Reuse the evicted sample's buffers.
        slot.inputs.resize_with(inputs.len(), Vec::new);
        for (dst, src) in slot.inputs.iter_mut().zip(inputs) {
            dst.clear();
            dst.extend_from_slice(src);
        }
        self.bytes = self.bytes - old + size;
        true
    }

    /// Takes the kept samples and starts over (the random source continues).
    pub fn drain(&mut self) -> Vec<Sample> {
        self.seen = 0;
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }

    /// Forgets everything held (consent withdrawn).
    pub fn clear(&mut self) {
        self.items = Vec::new();
        self.seen = 0;
        self.bytes = 0;
    }
}

/// A kept input: the JSON payload of an outbox record of class Sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// [`SAMPLE_RECORD_SCHEMA`].
    pub schema: u32,
    /// Model release that saw the input.
    #[serde(flatten)]
    pub model: ModelId,
    /// The caller's prediction id (labels may still join to it server-side).
    pub prediction_id: u64,
    /// Why it was kept: `low_confidence`.
    pub reason: String,
    /// Predicted class.
    pub predicted_class: u32,
    /// Calibrated confidence.
    pub calibrated: f32,
    /// Raw top-1 probability.
    pub top1: f32,
    /// When it was seen (caller's clock, ms).
    pub at_ms: u64,
    /// Inputs by name, flattened row-major.
    pub inputs: BTreeMap<String, Vec<f32>>,
}

impl SampleRecord {
    /// Builds the record of a kept sample; `names` are the input names in io-spec order.
    pub fn new(model: &ModelId, names: &[String], sample: Sample) -> Self {
        Self {
            schema: SAMPLE_RECORD_SCHEMA,
            model: model.clone(),
            prediction_id: sample.prediction_id,
            reason: "low_confidence".into(),
            predicted_class: sample.predicted_class,
            calibrated: sample.calibrated,
            top1: sample.top1,
            at_ms: sample.at_ms,
            inputs: names.iter().cloned().zip(sample.inputs).collect(),
        }
    }

    /// JSON bytes for the outbox.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("sample records always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: u64) -> Offer {
        Offer {
            prediction_id: id,
            predicted_class: 0,
            calibrated: 0.1,
            top1: 0.2,
            at_ms: id,
        }
    }

    #[test]
    fn reservoir_respects_byte_budget() {
        // 16 floats = 64 bytes + 64 overhead = 128 bytes per sample; budget fits 3.
        let mut r = Reservoir::new(ReservoirConfig {
            max_count: 100,
            max_bytes: 3 * 128 + 127,
            seed: 1,
        });
        let x = [0.5f32; 16];
        for id in 0..1000 {
            r.offer(offer(id), &[&x]);
            assert!(r.bytes() <= 3 * 128 + 127);
            assert!(r.len() <= 3);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.offered(), 1000);
        // An input larger than the whole budget is refused outright.
        let big = [0.0f32; 200];
        assert!(!r.offer(offer(5000), &[&big]));
        assert_eq!(r.offered(), 1000);
    }

    #[test]
    fn reservoir_respects_count_bound() {
        let mut r = Reservoir::new(ReservoirConfig {
            max_count: 5,
            max_bytes: 1 << 20,
            seed: 2,
        });
        for id in 0..100 {
            r.offer(offer(id), &[&[1.0, 2.0]]);
        }
        assert_eq!(r.len(), 5);
        let s = r.drain();
        assert_eq!(s.len(), 5);
        assert!(r.is_empty());
        assert_eq!((r.offered(), r.bytes()), (0, 0));
    }

    #[test]
    fn reservoir_keeps_every_position_about_equally_often() {
        // 4000 runs of a 100-item stream into 10 slots: each item is kept with p = 0.1,
        // i.e. 400 times in expectation (sd ~19). Bounds are 5 sd wide.
        let (runs, n, k) = (4000u64, 100u64, 10usize);
        let mut kept = vec![0u32; n as usize];
        let mut seeds = fastrand::Rng::with_seed(42);
        for _ in 0..runs {
            let mut r = Reservoir::new(ReservoirConfig {
                max_count: k,
                max_bytes: 1 << 20,
                seed: seeds.u64(..),
            });
            for id in 0..n {
                r.offer(offer(id), &[&[id as f32]]);
            }
            for s in r.drain() {
                assert_eq!(s.inputs[0][0], s.prediction_id as f32);
                kept[s.prediction_id as usize] += 1;
            }
        }
        for (id, c) in kept.iter().enumerate() {
            assert!((305..=495).contains(c), "item {id} kept {c} times");
        }
        let first: u32 = kept[..50].iter().sum();
        let second: u32 = kept[50..].iter().sum();
        assert!(first.abs_diff(second) < 1000, "{first} vs {second}");
    }

    #[test]
    fn same_seed_same_samples() {
        let run = |seed| {
            let mut r = Reservoir::new(ReservoirConfig {
                max_count: 4,
                max_bytes: 1 << 20,
                seed,
            });
            for id in 0..500 {
                r.offer(offer(id), &[&[0.0]]);
            }
            r.drain()
                .iter()
                .map(|s| s.prediction_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn clear_forgets_samples() {
        let mut r = Reservoir::new(ReservoirConfig::default());
        r.offer(offer(1), &[&[1.0]]);
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.drain(), Vec::<Sample>::new());
    }
}
