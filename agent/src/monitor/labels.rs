//! Label feedback: joins late ground-truth labels to the predictions they grade.
//!
//! Every prediction is remembered (class, calibrated confidence, time) in a table bounded
//! by count and by age. Entries leave in insertion order: the oldest one goes when the
//! table is full, and entries older than the retention are dropped as new ones arrive.
//! The map is allocated once with room for twice the count bound, so that in steady state
//! inserting never allocates (the hash table rehashes in place instead of growing).
//!
//! A label for an id that is no longer held is `Expired` if the id is at most the largest
//! id evicted so far, else `Unknown`. This is exact for increasing prediction ids (what the
//! agent hands out) and a best guess otherwise. Each prediction joins at most one label.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use super::window::ModelId;

/// Version of the [`LabelRecord`] JSON this crate writes.
pub const LABEL_RECORD_SCHEMA: u32 = 1;

/// Bounds of the join table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelConfig {
    /// How long a prediction waits for its label (ms on the caller's clock).
    pub retention_ms: u64,
    /// Most predictions held at once.
    pub max_pending: usize,
}

impl Default for LabelConfig {
    fn default() -> Self {
        Self {
            retention_ms: 10 * 60 * 1000,
            max_pending: 1024,
        }
    }
}

/// What happened to a reported label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum LabelOutcome {
    /// Joined to its prediction.
    Joined {
        /// Whether the label equals the predicted class.
        correct: bool,
    },
    /// No such prediction (never seen, or already labelled).
    Unknown,
    /// The prediction left the retention window before the label came.
    Expired,
}

/// A joined label: the JSON payload of an outbox record of class Label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    /// [`LABEL_RECORD_SCHEMA`].
    pub schema: u32,
    /// Model release that made the prediction.
    #[serde(flatten)]
    pub model: ModelId,
    /// The caller's prediction id.
    pub prediction_id: u64,
    /// Predicted class.
    pub predicted_class: u32,
    /// The reported true class.
    pub label: u32,
    /// `label == predicted_class`.
    pub correct: bool,
    /// Calibrated confidence of the prediction.
    pub calibrated: f32,
    /// When the prediction was made (caller's clock, ms).
    pub predicted_at_ms: u64,
    /// When the label arrived (caller's clock, ms).
    pub labelled_at_ms: u64,
}

impl LabelRecord {
    /// JSON bytes for the outbox.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("label records always serialize")
    }
}

/// A remembered prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    /// Predicted class.
    pub predicted: u32,
    /// Calibrated confidence.
    pub calibrated: f32,
    /// When it was made.
    pub at_ms: u64,
    seq: u64,
}

/// Result of [`LabelJoin::join`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Join {
    /// The prediction, now removed from the table.
    Joined(Pending),
    /// See [`LabelOutcome::Unknown`].
    Unknown,
    /// See [`LabelOutcome::Expired`].
    Expired,
}

/// Multiplicative hash for prediction ids. The ids come from the app on this device, not
/// from the network, so a DoS-resistant (and slower) SipHash buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0 ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fold the high half in so ids differing only there still spread; the odd multiplier
        // is a bijection that also fills the high bits hashbrown uses for its tags.
        self.0 = (n ^ (n >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The bounded prediction table.
#[derive(Debug, Clone)]
pub struct LabelJoin {
    config: LabelConfig,
    pending: HashMap<u64, Pending, BuildHasherDefault<IdHasher>>,
    /// Insertion order: (id, seq, at_ms). Entries whose id was joined (or re-inserted) are
    /// stale and skipped when they reach the front.
    order: VecDeque<(u64, u64, u64)>,
    next_seq: u64,
    max_evicted: Option<u64>,
}

impl LabelJoin {
    /// An empty table (`max_pending` is raised to at least 1).
    pub fn new(config: LabelConfig) -> Self {
        let config = LabelConfig {
            max_pending: config.max_pending.max(1),
            ..config
        };
        Self {
            pending: HashMap::with_capacity_and_hasher(config.max_pending * 2, Default::default()),
            order: VecDeque::with_capacity(config.max_pending),
            config,
            next_seq: 0,
            max_evicted: None,
        }
    }

    /// Predictions currently held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no prediction is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Remembers a prediction (hot path: amortized O(1), no allocation in steady state).
    #[inline]
    pub fn remember(&mut self, id: u64, predicted: u32, calibrated: f32, now_ms: u64) {
        self.expire(now_ms);
        while self.order.len() >= self.config.max_pending {
            self.evict_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((id, seq, now_ms));
        self.pending.insert(
            id,
            Pending {
                predicted,
                calibrated,
                at_ms: now_ms,
                seq,
            },
        );
    }

    /// Drops predictions older than the retention.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(_, _, at)) = self.order.front() {
            if now_ms.saturating_sub(at) <= self.config.retention_ms {
                break;
            }
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        if let Some((id, seq, _)) = self.order.pop_front()
            && self.pending.get(&id).is_some_and(|p| p.seq == seq)
        {
            self.pending.remove(&id);
            self.max_evicted = Some(self.max_evicted.map_or(id, |m| m.max(id)));
        }
    }

    /// Looks up and removes the prediction a label is for.
    pub fn join(&mut self, id: u64, now_ms: u64) -> Join {
        match self.pending.remove(&id) {
            Some(p) if now_ms.saturating_sub(p.at_ms) > self.config.retention_ms => {
                self.max_evicted = Some(self.max_evicted.map_or(id, |m| m.max(id)));
                Join::Expired
            }
            Some(p) => Join::Joined(p),
            None if self.max_evicted.is_some_and(|m| id <= m) => Join::Expired,
            None => Join::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(retention_ms: u64, max_pending: usize) -> LabelJoin {
        LabelJoin::new(LabelConfig {
            retention_ms,
            max_pending,
        })
    }

    #[test]
    fn label_within_retention_joins_once() {
        let mut t = table(1000, 10);
        t.remember(7, 3, 0.8, 100);
        match t.join(7, 1100) {
            Join::Joined(p) => assert_eq!((p.predicted, p.calibrated, p.at_ms), (3, 0.8, 100)),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.join(7, 1100), Join::Unknown);
        assert_eq!(t.join(8, 1100), Join::Unknown);
    }

    #[test]
    fn label_after_retention_is_expired() {
        let mut t = table(1000, 10);
        t.remember(1, 0, 0.5, 0);
        assert_eq!(t.join(1, 1001), Join::Expired);
        // Expired also when the entry was already purged by a later insert.
        let mut t = table(1000, 10);
        t.remember(1, 0, 0.5, 0);
        t.remember(2, 0, 0.5, 2000);
        assert_eq!(t.len(), 1);
        assert_eq!(t.join(1, 2000), Join::Expired);
        assert!(matches!(t.join(2, 2000), Join::Joined(_)));
    }

    #[test]
    fn count_bound_evicts_oldest_first() {
        let mut t = table(u64::MAX, 3);
        for id in 0..5 {
            t.remember(id, id as u32, 0.9, id);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.join(0, 10), Join::Expired);
        assert_eq!(t.join(1, 10), Join::Expired);
        assert!(matches!(t.join(2, 10), Join::Joined(p) if p.predicted == 2));
        assert!(matches!(t.join(4, 10), Join::Joined(_)));
        assert_eq!(t.join(99, 10), Join::Unknown);
    }

    #[test]
    fn table_memory_stays_bounded_under_a_long_stream() {
        let mut t = table(50, 64);
        for id in 0..100_000u64 {
            t.remember(id, 0, 0.5, id);
            if id % 3 == 0 {
                let _ = t.join(id, id);
            }
        }
        assert!(t.len() <= 64);
        assert!(t.order.len() <= 64);
        assert!(t.pending.capacity() <= 4 * 128);
    }
}
