//! Per-inference accuracy proxies from one classifier output row.
//!
//! For logits `z` (K classes) with `m = max z`, `S = Σ exp(z_i - m)`:
//! top-1 probability is `1 / S`, the runner-up's is `exp(z_2 - m) / S`, and the entropy
//! (nats) is `ln S - Σ exp(z_i - m)(z_i - m) / S`, which never exponentiates a positive
//! number. Probability outputs are renormalized to sum 1 (quantized heads drift a little).
//! Everything runs in two passes over the row without allocating.

use serde::{Deserialize, Serialize};

use super::MonitorError;
use super::calibrate::Calibration;

/// How to read a classifier output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// Unnormalized scores; softmax gives probabilities.
    Logits,
    /// Probabilities (renormalized if they do not sum to exactly 1).
    Probabilities,
}

/// Small negative probabilities (quantization noise) are read as 0; below this they are an error.
const NEGATIVE_PROBABILITY_TOLERANCE: f32 = 1e-3;

/// Accuracy proxies of one classifier prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassProxies {
    /// Predicted class (arg-max; the first one on ties).
    pub class: u32,
    /// Top-1 probability.
    pub top1: f32,
    /// Top-1 minus top-2 probability (top-1 when there is one class).
    pub margin: f32,
    /// Entropy of the class distribution in nats.
    pub entropy: f32,
    /// Entropy divided by `ln K` (in `[0, 1]`; 0 when K = 1).
    pub entropy_norm: f32,
    /// Calibrated top-1 confidence: the estimated probability that the prediction is right.
    pub calibrated: f32,
}

/// Computes the proxies of one output row (length K >= 1).
pub fn class_proxies(
    row: &[f32],
    kind: ScoreKind,
    calibration: &Calibration,
) -> Result<ClassProxies, MonitorError> {
    if row.is_empty() {
        return Err(MonitorError::OutputLength {
            expected: 1,
            got: 0,
        });
    }
    // Pass 1: finiteness, arg-max and runner-up.
    let (mut i1, mut i2) = (0usize, usize::MAX);
    for (i, &v) in row.iter().enumerate() {
        if !v.is_finite() {
            return Err(MonitorError::NonFiniteOutput { index: i });
        }
        if i == 0 {
            continue;
        }
        if v > row[i1] {
            i2 = i1;
            i1 = i;
        } else if i2 == usize::MAX || v > row[i2] {
            i2 = i;
        }
    }
    let k = row.len();
    let (top1, top2, entropy, calibrated_raw) = match kind {
        ScoreKind::Logits => logits_stats(row, i1, i2, calibration.inv_temperature()),
        ScoreKind::Probabilities => probability_stats(row, i1, i2, calibration.inv_temperature())?,
    };
    let entropy = entropy.max(0.0);
    let entropy_norm = if k > 1 {
        (entropy / (k as f64).ln()).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Ok(ClassProxies {
        class: i1 as u32,
        top1: top1 as f32,
        margin: (top1 - top2).max(0.0) as f32,
        entropy: entropy as f32,
        entropy_norm: entropy_norm as f32,
        calibrated: calibration.map_top1(calibrated_raw) as f32,
    })
}

/// Returns (top1, top2, entropy, top1 after temperature scaling or top1).
fn logits_stats(row: &[f32], i1: usize, i2: usize, inv_t: Option<f64>) -> (f64, f64, f64, f64) {
    // Exponentials in f32 (the logits are f32 already; `d <= 0` so `exp(d)` is in (0, 1]),
    // sums in f64: about twice as fast as f64 `exp`, with relative error ~1e-7.
    let m = row[i1];
    let inv_t32 = inv_t.unwrap_or(1.0) as f32;
    let (mut s, mut a, mut s_t) = (0.0f64, 0.0f64, 0.0f64);
    for &v in row {
        let d = v - m;
        let e = f64::from(d.exp());
        s += e;
        a += e * f64::from(d);
        if inv_t.is_some() {
            s_t += f64::from((d * inv_t32).exp());
        }
    }
    let top1 = 1.0 / s;
    let top2 = if i2 == usize::MAX {
        0.0
    } else {
        f64::from((row[i2] - m).exp()) / s
    };
    let entropy = s.ln() - a / s;
    let cal = if inv_t.is_some() { 1.0 / s_t } else { top1 };
    (top1, top2, entropy, cal)
}

fn probability_stats(
    row: &[f32],
    i1: usize,
    i2: usize,
    inv_t: Option<f64>,
) -> Result<(f64, f64, f64, f64), MonitorError> {
    let mut sum = 0.0f64;
    for (i, &v) in row.iter().enumerate() {
        if v < -NEGATIVE_PROBABILITY_TOLERANCE {
            return Err(MonitorError::InvalidProbabilities { index: i });
        }
        sum += f64::from(v.max(0.0));
    }
    if sum <= 0.0 {
        return Err(MonitorError::InvalidProbabilities { index: 0 });
    }
    let pmax = f64::from(row[i1].max(0.0));
    let (mut entropy, mut s_t) = (0.0f64, 0.0f64);
    for &v in row {
        let p = f64::from(v.max(0.0)) / sum;
        if p > 0.0 {
            entropy -= p * p.ln();
        }
        if let Some(inv_t) = inv_t {
            // softmax(ln p / T) = p^(1/T) / Σ p^(1/T); divided by pmax^(1/T) to stay in range.
            s_t += (f64::from(v.max(0.0)) / pmax).powf(inv_t);
        }
    }
    let top1 = pmax / sum;
    let top2 = if i2 == usize::MAX {
        0.0
    } else {
        f64::from(row[i2].max(0.0)) / sum
    };
    let cal = if inv_t.is_some() { 1.0 / s_t } else { top1 };
    Ok((top1, top2, entropy, cal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::release::Calibrator;

    fn close(a: f32, b: f64, tol: f64) -> bool {
        (f64::from(a) - b).abs() < tol
    }

    #[test]
    fn softmax_of_known_logits() {
        // softmax([0, ln 2, ln 5]) = [1/8, 2/8, 5/8].
        let row = [0.0, 2f32.ln(), 5f32.ln()];
        let p = class_proxies(&row, ScoreKind::Logits, &Calibration::Identity).unwrap();
        assert_eq!(p.class, 2);
        assert!(close(p.top1, 0.625, 1e-6));
        assert!(close(p.margin, 0.375, 1e-6));
        let h = -(0.125f64 * 0.125f64.ln() + 0.25 * 0.25f64.ln() + 0.625 * 0.625f64.ln());
        assert!(close(p.entropy, h, 1e-6));
        assert!(close(p.entropy_norm, h / 3f64.ln(), 1e-6));
        assert_eq!(p.calibrated, p.top1);
    }

    #[test]
    fn huge_logits_do_not_overflow() {
        let row = [1000.0, 999.0, -1000.0];
        let p = class_proxies(&row, ScoreKind::Logits, &Calibration::Identity).unwrap();
        let e = (-1f64).exp();
        assert!(close(p.top1, 1.0 / (1.0 + e), 1e-6));
        assert!(close(p.margin, (1.0 - e) / (1.0 + e), 1e-6));
        assert!(p.entropy.is_finite());
    }

    #[test]
    fn uniform_logits_have_max_entropy_and_zero_margin() {
        let row = [3.0f32; 4];
        let p = class_proxies(&row, ScoreKind::Logits, &Calibration::Identity).unwrap();
        assert_eq!(p.class, 0);
        assert!(close(p.top1, 0.25, 1e-7));
        assert!(close(p.margin, 0.0, 1e-7));
        assert!(close(p.entropy, 4f64.ln(), 1e-6));
        assert!(close(p.entropy_norm, 1.0, 1e-6));
    }

    #[test]
    fn probabilities_are_renormalized() {
        // Sums to 2: read as [0.1, 0.2, 0.7].
        let row = [0.2, 0.4, 1.4];
        let p = class_proxies(&row, ScoreKind::Probabilities, &Calibration::Identity).unwrap();
        assert_eq!(p.class, 2);
        assert!(close(p.top1, 0.7, 1e-6));
        assert!(close(p.margin, 0.5, 1e-6));
        let h = -(0.1f64 * 0.1f64.ln() + 0.2 * 0.2f64.ln() + 0.7 * 0.7f64.ln());
        assert!(close(p.entropy, h, 1e-6));
    }

    #[test]
    fn one_hot_probabilities_have_zero_entropy() {
        let p = class_proxies(
            &[0.0, 1.0, 0.0],
            ScoreKind::Probabilities,
            &Calibration::Identity,
        )
        .unwrap();
        assert_eq!(p.entropy, 0.0);
        assert_eq!(p.margin, 1.0);
    }

    #[test]
    fn temperature_scaling_softens_logits() {
        // logits [0, ln 4] at T=2 -> softmax([0, ln 2]) = [1/3, 2/3].
        let cal =
            Calibration::from_release(Some(&Calibrator::Temperature { temperature: 2.0 })).unwrap();
        let p = class_proxies(&[0.0, 4f32.ln()], ScoreKind::Logits, &cal).unwrap();
        assert!(close(p.top1, 0.8, 1e-6));
        assert!(close(p.calibrated, 2.0 / 3.0, 1e-6));
        // The same distribution given as probabilities calibrates identically.
        let q = class_proxies(&[0.2, 0.8], ScoreKind::Probabilities, &cal).unwrap();
        assert!(close(q.calibrated, 2.0 / 3.0, 1e-6));
    }

    #[test]
    fn isotonic_calibration_maps_raw_top1() {
        let cal = Calibration::from_release(Some(&Calibrator::Isotonic {
            x: vec![0.5, 1.0],
            y: vec![0.3, 0.9],
        }))
        .unwrap();
        // top1 = 0.625 -> 0.3 + 0.6 * 0.25 = 0.45.
        let row = [0.0, 2f32.ln(), 5f32.ln()];
        let p = class_proxies(&row, ScoreKind::Logits, &cal).unwrap();
        assert!(close(p.calibrated, 0.45, 1e-6));
    }

    #[test]
    fn rejects_nan_output_and_negative_probabilities() {
        assert!(matches!(
            class_proxies(&[0.1, f32::NAN], ScoreKind::Logits, &Calibration::Identity),
            Err(MonitorError::NonFiniteOutput { index: 1 })
        ));
        assert!(matches!(
            class_proxies(
                &[0.5, -0.5],
                ScoreKind::Probabilities,
                &Calibration::Identity
            ),
            Err(MonitorError::InvalidProbabilities { index: 1 })
        ));
        assert!(matches!(
            class_proxies(
                &[0.0, 0.0],
                ScoreKind::Probabilities,
                &Calibration::Identity
            ),
            Err(MonitorError::InvalidProbabilities { .. })
        ));
        assert!(class_proxies(&[], ScoreKind::Logits, &Calibration::Identity).is_err());
    }

    #[test]
    fn single_class_is_certain() {
        let p = class_proxies(&[-3.0], ScoreKind::Logits, &Calibration::Identity).unwrap();
        assert_eq!(
            (p.class, p.top1, p.margin, p.entropy_norm),
            (0, 1.0, 1.0, 0.0)
        );
    }
}
