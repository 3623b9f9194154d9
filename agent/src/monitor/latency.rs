//! Fixed log-spaced latency histogram in microseconds.
//!
//! Bins 0-3 hold 0, 1, 2 and 3 µs. From 4 µs on, every octave `[2^o, 2^(o+1))` is split into
//! four equal bins (so a bin is at most 25 % of its lower bound wide), up to octave
//! [`MAX_OCTAVE`]; anything longer lands in the last bin. Bin index is computed with integer
//! operations only. Quantiles are interpolated linearly inside the bin that holds the rank.

use serde::{Deserialize, Serialize};

/// Highest octave with its own bins: `2^27` µs is about 134 s.
pub const MAX_OCTAVE: u32 = 27;
/// Number of bins.
pub const LATENCY_BINS: usize = 4 + 4 * (MAX_OCTAVE as usize - 1);

/// Bin of a latency in µs.
pub fn bin_of(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros();
    if octave > MAX_OCTAVE {
        return LATENCY_BINS - 1;
    }
    let sub = (us >> (octave - 2)) & 3;
    4 + (octave as usize - 2) * 4 + sub as usize
}

/// Lower bound (inclusive) of a bin in µs.
pub fn bin_lower(bin: usize) -> u64 {
    if bin < 4 {
        return bin as u64;
    }
    let octave = (bin - 4) / 4 + 2;
    let sub = ((bin - 4) % 4) as u64;
    (4 + sub) << (octave - 2)
}

/// Upper bound (exclusive) of a bin in µs; the last bin is treated as one bin wide.
pub fn bin_upper(bin: usize) -> u64 {
    if bin + 1 < LATENCY_BINS {
        bin_lower(bin + 1)
    } else {
        bin_lower(bin) + (bin_lower(bin) >> 2)
    }
}

/// Counts per bin.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    counts: [u64; LATENCY_BINS],
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; LATENCY_BINS],
            total: 0,
        }
    }
}

/// Serialized latency histogram: non-empty bins and quantile estimates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Estimated median in µs (`None` without samples).
    pub p50_us: Option<f64>,
    /// Estimated 95th percentile in µs.
    pub p95_us: Option<f64>,
    /// Estimated 99th percentile in µs.
    pub p99_us: Option<f64>,
    /// Non-empty bins as `[lower_bound_us, count]`, ascending; the bin layout is fixed
    /// (see [`bin_lower`]), so the lower bound identifies the bin.
    pub bins: Vec<[u64; 2]>,
}

impl LatencyHistogram {
    /// Counts one latency.
    #[inline]
    pub fn record(&mut self, us: u64) {
        self.counts[bin_of(us)] += 1;
        self.total += 1;
    }

    /// Number of recorded latencies.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Estimated `q`-quantile (`0 < q <= 1`) in µs.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.total as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (bin, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (below + c) as f64 >= rank {
                let frac = (rank - below as f64) / c as f64;
                let (lo, hi) = (bin_lower(bin) as f64, bin_upper(bin) as f64);
                return Some(lo + frac * (hi - lo));
            }
            below += c;
        }
        None
    }

    /// Summary for the window record.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            p50_us: self.quantile(0.50),
            p95_us: self.quantile(0.95),
            p99_us: self.quantile(0.99),
            bins: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(b, c)| [bin_lower(b), *c])
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_contiguous_and_monotonic() {
        for b in 0..LATENCY_BINS - 1 {
            assert!(bin_lower(b) < bin_lower(b + 1), "bin {b}");
            assert_eq!(bin_of(bin_lower(b)), b);
            assert_eq!(bin_of(bin_lower(b + 1) - 1), b);
            // Widths stay within a quarter of the lower bound from 4 µs on.
            if b >= 4 {
                assert!((bin_upper(b) - bin_lower(b)) * 4 <= bin_lower(b));
            }
        }
        assert_eq!(bin_of(u64::MAX), LATENCY_BINS - 1);
        assert_eq!(bin_of(1 << 28), LATENCY_BINS - 1);
        assert_eq!(bin_of((1 << 28) - 1), LATENCY_BINS - 1);
    }

    #[test]
    fn quantiles_land_within_a_bin_of_the_truth() {
        let mut h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(us);
        }
        for (q, truth) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let est = h.quantile(q).unwrap();
            assert!((est - truth).abs() / truth < 0.25, "q{q}: {est} vs {truth}");
        }
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn summary_lists_only_non_empty_bins() {
        let mut h = LatencyHistogram::default();
        h.record(40);
        h.record(41);
        h.record(5000);
        let s = h.summary();
        assert_eq!(s.bins.len(), 2);
        assert_eq!(s.bins[0][1], 2);
        assert!(s.bins[0][0] <= 40 && s.bins[1][0] <= 5000);
        assert!(s.p99_us.unwrap() >= 4096.0);
    }
}
