//! Distribution drift scores: Population Stability Index and Jensen-Shannon divergence.
//!
//! Both compare an observed histogram `a` (counts, normalized here) with a reference
//! distribution `e` on the same bins.
//!
//! - **PSI** `= Σ (a_i - e_i) · ln(a_i / e_i)` on smoothed distributions
//!   `x_i' = (x_i + ε) / (1 + K·ε)` with `ε = `[`PSI_EPSILON`], so that empty bins give a large
//!   but finite term. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift.
//! - **JS** `= ½ Σ a_i log2(a_i / m_i) + ½ Σ e_i log2(e_i / m_i)` with `m = (a + e) / 2`, on the
//!   unsmoothed distributions (terms with `a_i = 0` or `e_i = 0` contribute 0). Base 2
//!   bounds it to `[0, 1]`: 0 for identical distributions, 1 for disjoint ones.

use serde::{Deserialize, Serialize};

/// Smoothing mass added to every bin before PSI.
pub const PSI_EPSILON: f64 = 1e-4;

/// PSI and JS of one histogram against its reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DriftScore {
    /// Population Stability Index (>= 0).
    pub psi: f64,
    /// Jensen-Shannon divergence, base 2, in `[0, 1]`.
    pub js: f64,
}

/// Drift of observed `counts` against reference frequencies `expected` (same bins).
/// `None` when there is nothing to compare: no observations, mismatched bin counts, or a
/// reference without mass.
pub fn drift(counts: &[u64], expected: &[f64]) -> Option<DriftScore> {
    let total: u64 = counts.iter().sum();
    let e_total: f64 = expected.iter().filter(|v| v.is_finite() && **v > 0.0).sum();
    if total == 0 || counts.len() != expected.len() || e_total <= 0.0 {
        return None;
    }
    let k = counts.len() as f64;
    let norm = 1.0 + k * PSI_EPSILON;
    let (mut psi, mut js) = (0.0f64, 0.0f64);
    for (&c, &e) in counts.iter().zip(expected) {
        let a = c as f64 / total as f64;
        let e = if e.is_finite() && e > 0.0 {
            e / e_total
        } else {
            0.0
        };
        let (as_, es) = ((a + PSI_EPSILON) / norm, (e + PSI_EPSILON) / norm);
        psi += (as_ - es) * (as_ / es).ln();
        let m = 0.5 * (a + e);
        if a > 0.0 {
            js += 0.5 * a * (a / m).log2();
        }
        if e > 0.0 {
            js += 0.5 * e * (e / m).log2();
        }
    }
    Some(DriftScore {
        psi: psi.max(0.0),
        js: js.clamp(0.0, 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_score_zero() {
        let d = drift(&[10, 30, 60], &[0.1, 0.3, 0.6]).unwrap();
        assert!(d.psi.abs() < 1e-12, "{d:?}");
        assert!(d.js.abs() < 1e-12, "{d:?}");
    }

    #[test]
    fn disjoint_distributions_have_js_one_and_large_psi() {
        let d = drift(&[0, 0, 5], &[0.5, 0.5, 0.0]).unwrap();
        assert!((d.js - 1.0).abs() < 1e-12, "{d:?}");
        // a = [0, 0, 1], e = [0.5, 0.5, 0]: with ε smoothing PSI is about
        // 2 · 0.5·ln(0.5/ε) + 1·ln(1/ε) = ln(5000) + ln(10000) = 17.73.
        let by_hand = (0.5f64 / PSI_EPSILON).ln() + (1.0 / PSI_EPSILON).ln();
        assert!((d.psi - by_hand).abs() < 0.05, "{d:?} vs {by_hand}");
    }

    #[test]
    fn worked_psi_example() {
        // a = [0.5, 0.5], e = [0.25, 0.75]:
        // PSI = 0.25·ln(2) + (-0.25)·ln(2/3) = 0.25·(0.693147 + 0.405465) = 0.274653.
        let d = drift(&[50, 50], &[0.25, 0.75]).unwrap();
        assert!((d.psi - 0.274653).abs() < 1e-3, "{d:?}");
        // JS by hand: m = [0.375, 0.625];
        // ½[0.5·log2(0.5/0.375) + 0.5·log2(0.5/0.625) + 0.25·log2(0.25/0.375) + 0.75·log2(0.75/0.625)]
        let js = 0.5
            * (0.5 * (0.5f64 / 0.375).log2()
                + 0.5 * (0.5f64 / 0.625).log2()
                + 0.25 * (0.25f64 / 0.375).log2()
                + 0.75 * (0.75f64 / 0.625).log2());
        assert!((d.js - js).abs() < 1e-12, "{d:?} vs {js}");
        assert!((d.js - 0.048795).abs() < 1e-5, "{d:?}");
    }

    #[test]
    fn nothing_to_compare_gives_none() {
        assert_eq!(drift(&[0, 0], &[0.5, 0.5]), None);
        assert_eq!(drift(&[1, 2], &[0.2, 0.3, 0.5]), None);
        assert_eq!(drift(&[1, 2], &[0.0, 0.0]), None);
    }
}
