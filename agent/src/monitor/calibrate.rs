//! Calibration of top-1 confidence: the release's [`Calibrator`] compiled for the hot path.
//!
//! - Temperature scaling divides logits by `T` before the softmax; for probability outputs
//!   the logits are taken as `ln p` (so the calibrated distribution is `p^(1/T)`, normalized).
//! - Isotonic calibration maps the raw top-1 probability through a piecewise-linear curve
//!   given by sorted knots; below the first knot it is `y[0]`, above the last `y[n-1]`.
//!
//! Calibrated values are clamped to `[0, 1]`.

use outpost_protocol::release::Calibrator;

use super::MonitorError;

/// A calibrator checked and converted for cheap evaluation.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Calibration {
    /// No calibrator: calibrated confidence is the raw top-1 probability.
    #[default]
    Identity,
    /// Temperature scaling; holds `1 / T`.
    Temperature {
        /// Reciprocal of the temperature (finite, > 0).
        inv_temperature: f64,
    },
    /// Piecewise-linear isotonic map from raw top-1 probability.
    Isotonic {
        /// Sorted knots (non-decreasing, finite).
        x: Vec<f64>,
        /// Calibrated value at each knot (finite).
        y: Vec<f64>,
    },
}

impl Calibration {
    /// Checks and compiles a release calibrator. `None` (and calibrator methods written by a
    /// newer Outpost) give [`Calibration::Identity`].
    pub fn from_release(calibrator: Option<&Calibrator>) -> Result<Self, MonitorError> {
        match calibrator {
            None => Ok(Calibration::Identity),
            Some(Calibrator::Temperature { temperature }) => {
                let t = *temperature;
                if !(t.is_finite() && t > 0.0) {
                    return Err(MonitorError::InvalidCalibrator {
                        reason: format!("temperature must be finite and > 0, got {t}"),
                    });
                }
                Ok(Calibration::Temperature {
                    inv_temperature: 1.0 / t,
                })
            }
            Some(Calibrator::Isotonic { x, y }) => {
                let sorted = x.windows(2).all(|w| w[0] <= w[1]);
                let finite = x.iter().chain(y.iter()).all(|v| v.is_finite());
                if x.is_empty() || x.len() != y.len() || !sorted || !finite {
                    return Err(MonitorError::InvalidCalibrator {
                        reason: "isotonic calibrator needs equally long, non-empty, sorted, finite x and y"
                            .into(),
                    });
                }
                Ok(Calibration::Isotonic {
                    x: x.clone(),
                    y: y.clone(),
                })
            }
            Some(_) => Ok(Calibration::Identity),
        }
    }

    /// The temperature reciprocal applied to logits (1 when not temperature scaling).
    pub(crate) fn inv_temperature(&self) -> Option<f64> {
        match self {
            Calibration::Temperature { inv_temperature } => Some(*inv_temperature),
            _ => None,
        }
    }

    /// Applies a post-hoc map to the raw top-1 probability (isotonic), else returns it.
    pub(crate) fn map_top1(&self, raw: f64) -> f64 {
        match self {
            Calibration::Isotonic { x, y } => isotonic(x, y, raw),
            _ => raw,
        }
        .clamp(0.0, 1.0)
    }
}

/// Piecewise-linear interpolation through `(x[i], y[i])`, constant outside the knots.
/// `x` must be sorted and as long as `y` (checked by [`Calibration::from_release`]).
fn isotonic(x: &[f64], y: &[f64], v: f64) -> f64 {
    if v.is_nan() {
        return y[0];
    }
    // i = number of knots <= v; the segment is (i-1, i) and x[i-1] <= v < x[i].
    let i = x.partition_point(|k| *k <= v);
    if i == 0 {
        return y[0];
    }
    if i == x.len() {
        return y[x.len() - 1];
    }
    let (x0, x1, y0, y1) = (x[i - 1], x[i], y[i - 1], y[i]);
    y0 + (y1 - y0) * (v - x0) / (x1 - x0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(x: &[f64], y: &[f64]) -> Calibration {
        Calibration::from_release(Some(&Calibrator::Isotonic {
            x: x.to_vec(),
            y: y.to_vec(),
        }))
        .unwrap()
    }

    #[test]
    fn isotonic_interpolates_between_knots() {
        let c = iso(&[0.2, 0.6, 1.0], &[0.1, 0.5, 0.9]);
        assert!((c.map_top1(0.4) - 0.3).abs() < 1e-12);
        assert!((c.map_top1(0.8) - 0.7).abs() < 1e-12);
        assert!((c.map_top1(0.6) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn isotonic_clamps_outside_knots_and_to_unit_interval() {
        let c = iso(&[0.2, 0.6], &[0.1, 0.5]);
        assert_eq!(c.map_top1(0.0), 0.1);
        assert_eq!(c.map_top1(0.99), 0.5);
        assert_eq!(c.map_top1(f64::NAN), 0.1);
        let wild = iso(&[0.0, 1.0], &[-0.5, 1.5]);
        assert_eq!(wild.map_top1(0.0), 0.0);
        assert_eq!(wild.map_top1(1.0), 1.0);
    }

    #[test]
    fn isotonic_with_repeated_knot_takes_the_later_value() {
        let c = iso(&[0.5, 0.5, 1.0], &[0.2, 0.4, 0.9]);
        assert!((c.map_top1(0.5) - 0.4).abs() < 1e-12);
        assert!((c.map_top1(0.75) - 0.65).abs() < 1e-12);
        assert_eq!(c.map_top1(0.4), 0.2);
    }

    #[test]
    fn rejects_non_positive_temperature_and_unsorted_knots() {
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                Calibration::from_release(Some(&Calibrator::Temperature { temperature: t })),
                Err(MonitorError::InvalidCalibrator { .. })
            ));
        }
        assert!(
            Calibration::from_release(Some(&Calibrator::Isotonic {
                x: vec![0.5, 0.2],
                y: vec![0.1, 0.2]
            }))
            .is_err()
        );
        assert!(
            Calibration::from_release(Some(&Calibrator::Isotonic {
                x: vec![],
                y: vec![]
            }))
            .is_err()
        );
    }
}
