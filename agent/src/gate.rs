//! The validation gate: whether a model may become active, and on which [`ExecPath`].
//!
//! [`validate`] compiles the model as shipped and, for quantized models (QDQ, dynamic,
//! QOperator), its [dequantized](crate::runtime::dequant) float variant, and for each:
//! 1. it must load and compile;
//! 2. every golden vector must match: `|got - want| <= abs + rel * |want|` per element, and
//!    the arg-max of classifier outputs must match when `top1_must_match`;
//! 3. latency is timed over the golden vectors, repeated (single thread).
//!
//! The fastest passing variant is chosen (the reason is recorded in words). Its p95
//! latency must then be within `budgets.latency_p95_ms`, and its memory within
//! `budgets.memory_bytes`.
//!
//! Memory is what the optimized plan holds: its constants (weights, packed or not) plus
//! every intermediate tensor it computes, counted as if none were freed (an upper bound of
//! its scratch memory; tract frees each tensor after its last reader). The growth of the
//! process's resident set (`VmRSS` in `/proc/self/status`) across compile + first run is
//! recorded too, and enforced only with [`GateOptions::enforce_rss_delta`]: it is
//! process-wide, so other threads' allocations inflate it (a test process running models
//! on 8 threads adds 100+ MB) and allocator reuse of freed pages hides some of ours.
//!
//! Golden vectors are numbered from 0 in reports, in release order.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::release::{GoldenSet, ModelRelease, OutputKind, Tolerance};

use crate::runtime::dequant::Activations;
use crate::runtime::{ExecPath, HostTensor, Model, OnnxSource, Quantization, RuntimeError};

/// The largest share of the golden tolerance the unrounded dequantized variant of a
/// dynamic or QOperator model may use; past it the variant that rounds activations as
/// the integer operators do is evaluated instead. Eight golden vectors sample the error
/// of dropping that rounding thinly: on the fixtures, a variant using 60% of the
/// tolerance on them exceeds it on held-out inputs. (QDQ tolerances are derived from the
/// output quantization step, which bounds the unrounded rewrite's error.)
pub const UNROUNDED_TOLERANCE_SHARE: f64 = 0.5;

/// Why a model was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The model does not load or compile.
    #[error("model does not load: {0}")]
    Load(#[from] RuntimeError),
    /// The release carries no golden vectors and the options require them.
    #[error("release has no golden vectors")]
    NoGoldenVectors,
    /// A golden vector could not be run (its inputs do not fit the model).
    #[error("golden vector {vector}: {source}")]
    GoldenRun {
        /// Golden vector index.
        vector: usize,
        /// The runtime's error.
        source: RuntimeError,
    },
    /// A golden vector names an output the model does not produce.
    #[error("golden vector {vector}: model has no output {output:?}")]
    MissingOutput {
        /// Golden vector index.
        vector: usize,
        /// Output name.
        output: String,
    },
    /// An output has a different number of elements than the golden one.
    #[error("golden vector {vector} output {output:?}: got shape {got:?}, want {want:?}")]
    OutputShape {
        /// Golden vector index.
        vector: usize,
        /// Output name.
        output: String,
        /// Shape produced.
        got: Vec<usize>,
        /// Shape expected.
        want: Vec<usize>,
    },
    /// An output element is outside the tolerance.
    #[error(
        "golden vector {vector} output {output:?}[{index}]: got {got:.6}, want {want:.6}, |diff| {diff:.6} > tolerance {tolerance:.6}"
    )]
    GoldenMismatch {
        /// Golden vector index.
        vector: usize,
        /// Output name.
        output: String,
        /// Flat index of the first offending element.
        index: usize,
        /// Value produced.
        got: f64,
        /// Value expected.
        want: f64,
        /// `|got - want|`.
        diff: f64,
        /// `abs + rel * |want|`.
        tolerance: f64,
    },
    /// A classifier output's arg-max differs from the golden one.
    #[error("golden vector {vector} output {output:?} row {row}: top-1 class {got}, want {want}")]
    Top1Mismatch {
        /// Golden vector index.
        vector: usize,
        /// Output name.
        output: String,
        /// Row (all but the last dimension, flattened).
        row: usize,
        /// Class produced.
        got: usize,
        /// Class expected.
        want: usize,
    },
    /// p95 latency is over the budget.
    #[error("{path} p95 latency {p95_ms:.3} ms is over the {budget_ms} ms budget")]
    LatencyOverBudget {
        /// Path measured.
        path: ExecPath,
        /// Measured p95.
        p95_ms: f64,
        /// Budget.
        budget_ms: f64,
    },
    /// Memory is over the budget.
    #[error("{path} needs {measured} bytes ({how}), over the {budget}-byte budget")]
    MemoryOverBudget {
        /// Path measured.
        path: ExecPath,
        /// Bytes measured.
        measured: u64,
        /// Which measurement: `plan constants + scratch` or `rss delta`.
        how: &'static str,
        /// Budget.
        budget: u64,
    },
}

/// Knobs of the gate.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// Also evaluate the dequantized variant of quantized models and choose it when it
    /// is faster and both paths pass the golden vectors.
    pub try_dequantized: bool,
    /// Accept the dequantized variant when the model *as shipped* fails its golden
    /// vectors but the variant passes. Off by default: the signed graph is what operators
    /// validated, and a graph that computes differently on this runtime (tract's
    /// quantized-Softmax bug) is rejected and reported, not silently repaired.
    pub repair_with_dequantized: bool,
    /// Refuse releases without golden vectors.
    pub require_golden: bool,
    /// Timed runs per path, at least (golden vectors are cycled).
    pub min_timed_runs: usize,
    /// Stop timing a path after this long (after at least one pass over the vectors).
    pub max_timing: Duration,
    /// Also hold the resident-set growth to the memory budget (only meaningful when
    /// nothing else in the process allocates meanwhile).
    pub enforce_rss_delta: bool,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            try_dequantized: true,
            repair_with_dequantized: false,
            require_golden: true,
            min_timed_runs: 50,
            max_timing: Duration::from_secs(2),
            enforce_rss_delta: false,
        }
    }
}

/// Latency percentiles of one path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyStats {
    /// Runs timed.
    pub samples: usize,
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl LatencyStats {
    /// Nearest-rank percentiles of `samples` (`None` when empty).
    pub fn from_samples(mut samples: Vec<Duration>) -> Option<LatencyStats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let at = |q: f64| {
            samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Some(LatencyStats {
            samples: samples.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        })
    }
}

/// How one path fared.
#[derive(Debug)]
pub struct PathReport {
    /// The path.
    pub path: ExecPath,
    /// Compile + first run.
    pub cold_start: Duration,
    /// Resident-set growth across compile + first run (Linux only).
    pub rss_delta_bytes: Option<u64>,
    /// Bytes of plan constants.
    pub weight_bytes: u64,
    /// Upper bound of plan scratch bytes.
    pub scratch_bytes: u64,
    /// Largest `|got - want|` over all golden elements (when it passed).
    pub max_abs_diff: f64,
    /// Largest `|got - want| / (abs + rel * |want|)` over all golden elements: the share
    /// of the tolerance used (when it passed).
    pub tolerance_share: f64,
    /// Latency (when it passed).
    pub latency: Option<LatencyStats>,
    /// What the dequantizing rewrite did, for [`ExecPath::Dequantized`] (when it compiled).
    pub dequant: Option<crate::runtime::DequantStats>,
    /// Why it failed, if it did.
    pub failure: Option<GateError>,
}

/// The gate's account of a validation.
#[derive(Debug)]
pub struct GateReport {
    /// The path chosen.
    pub path: ExecPath,
    /// Why, in words.
    pub reason: String,
    /// Every path evaluated, chosen one included.
    pub paths: Vec<PathReport>,
}

/// A model that passed the gate, ready for [`Runtime::activate`](crate::runtime::Runtime::activate).
#[derive(Debug)]
pub struct Validated {
    /// The compiled model on the chosen path, with its release attached.
    pub model: Model,
    /// What the gate measured.
    pub report: GateReport,
}

/// Validates `bytes` against `release` (see the [module docs](self)).
pub fn validate(
    bytes: &[u8],
    release: &ModelRelease,
    options: &GateOptions,
) -> Result<Validated, GateError> {
    let source = OnnxSource::decode(bytes)?;
    let empty = GoldenSet {
        tolerance: Tolerance {
            abs: 0.0,
            rel: 0.0,
            top1_must_match: false,
        },
        vectors: vec![],
    };
    let golden = match &release.golden {
        Some(g) if !g.vectors.is_empty() => g,
        _ if options.require_golden => return Err(GateError::NoGoldenVectors),
        _ => &empty,
    };
    let golden_inputs = golden
        .vectors
        .iter()
        .enumerate()
        .map(|(vector, v)| {
            v.inputs
                .iter()
                .map(|(name, t)| Ok((name.clone(), HostTensor::from_tensor_data(t)?)))
                .collect::<Result<Vec<_>, RuntimeError>>()
                .map_err(|source| GateError::GoldenRun { vector, source })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut paths = vec![ExecPath::AsShipped];
    let quantization = source.quantization();
    let why_single = if quantization == Quantization::Float {
        "float model".to_string()
    } else if !options.try_dequantized {
        "dequantized variant disabled".into()
    } else if golden.vectors.is_empty() {
        "no golden vectors to check a dequantized variant against".into()
    } else if let Some(reason) = crate::runtime::dequant::dequantize_reason(&source) {
        format!("no dequantized variant ({reason})")
    } else {
        paths.push(ExecPath::Dequantized);
        String::new()
    };
    let mut reports = Vec::new();
    let mut models = Vec::new();
    // Why the unrounded dequantized variant was passed over, if it was.
    let mut unrounded_note = None;
    for path in paths {
        let eval = |activations| {
            evaluate(
                &source,
                release,
                path,
                activations,
                golden,
                &golden_inputs,
                options,
            )
        };
        let (mut report, mut model) = eval(Activations::Float);
        let needs_margin = matches!(
            quantization,
            Quantization::Dynamic | Quantization::QOperator
        );
        if path == ExecPath::Dequantized && needs_margin {
            let why = match &report.failure {
                Some(e) => Some(format!("unrounded variant fails ({e})")),
                None if report.tolerance_share > UNROUNDED_TOLERANCE_SHARE => Some(format!(
                    "unrounded variant uses {:.0}% of the golden tolerance, over {:.0}%",
                    report.tolerance_share * 100.0,
                    UNROUNDED_TOLERANCE_SHARE * 100.0
                )),
                None => None,
            };
            if let Some(why) = why {
                let (r, m) = eval(Activations::Rounded);
                if r.failure.is_none() || report.failure.is_some() {
                    (report, model) = (r, m);
                    unrounded_note = Some(why);
                }
            }
        }
        reports.push(report);
        models.push(model);
    }

    if reports[0].failure.is_some() && !options.repair_with_dequantized {
        let first = reports.swap_remove(0);
        return Err(first.failure.unwrap_or(GateError::NoGoldenVectors));
    }
    let best = reports
        .iter()
        .enumerate()
        .filter(|(_, r)| r.failure.is_none())
        .min_by_key(|(_, r)| r.latency.map(|l| l.p50).unwrap_or_default())
        .map(|(i, _)| i);
    let Some(best) = best else {
        let first = reports.swap_remove(0);
        return Err(first.failure.unwrap_or(GateError::NoGoldenVectors));
    };
    let chosen = &reports[best];
    let us = |r: &PathReport| {
        r.latency
            .map(|l| format!("{}us", l.p50.as_micros()))
            .unwrap_or_else(|| "untimed".into())
    };
    // "dequantized (dynamic)": which rewrite ran.
    let label = |p: ExecPath| match (p, &unrounded_note) {
        (ExecPath::Dequantized, None) => format!("{p} ({quantization})"),
        (ExecPath::Dequantized, Some(_)) => {
            format!("{p} ({quantization}, activations rounded)")
        }
        (ExecPath::AsShipped, _) => p.to_string(),
    };
    let reason = if reports.len() == 1 {
        format!("{}: {}", chosen.path, why_single)
    } else {
        let other = &reports[1 - best];
        match &other.failure {
            None => format!(
                "{}: p50 {} vs {} {}, both within tolerance",
                label(chosen.path),
                us(chosen),
                label(other.path),
                us(other)
            ),
            Some(e) => format!(
                "{}: {} fails ({e}); {} within tolerance, p50 {}",
                label(chosen.path),
                label(other.path),
                chosen.path,
                us(chosen)
            ),
        }
    };
    let reason = match &unrounded_note {
        Some(note) => format!("{reason}; {note}"),
        None => reason,
    };
    let path = chosen.path;

    if let (Some(budget_ms), Some(lat)) = (
        release.budgets.and_then(|b| b.latency_p95_ms),
        chosen.latency,
    ) {
        let p95_ms = lat.p95.as_secs_f64() * 1e3;
        if p95_ms > budget_ms {
            return Err(GateError::LatencyOverBudget {
                path,
                p95_ms,
                budget_ms,
            });
        }
    }
    if let Some(budget) = release.budgets.and_then(|b| b.memory_bytes) {
        let plan = chosen.weight_bytes + chosen.scratch_bytes;
        let rss = chosen
            .rss_delta_bytes
            .filter(|_| options.enforce_rss_delta)
            .unwrap_or(0);
        let (measured, how) = if rss > plan {
            (rss, "rss delta")
        } else {
            (plan, "plan constants + scratch")
        };
        if measured > budget {
            return Err(GateError::MemoryOverBudget {
                path,
                measured,
                how,
                budget,
            });
        }
    }

    let mut model = models
        .swap_remove(best)
        .expect("a path without failure has a model");
    model.set_reason(reason.clone());
    model.set_release(Arc::new(release.clone()));
    Ok(Validated {
        model,
        report: GateReport {
            path,
            reason,
            paths: reports,
        },
    })
}

fn evaluate(
    source: &OnnxSource,
    release: &ModelRelease,
    path: ExecPath,
    activations: Activations,
    golden: &GoldenSet,
    inputs: &[Vec<(String, HostTensor)>],
    options: &GateOptions,
) -> (PathReport, Option<Model>) {
    let mut report = PathReport {
        path,
        cold_start: Duration::ZERO,
        rss_delta_bytes: None,
        weight_bytes: 0,
        scratch_bytes: 0,
        max_abs_diff: 0.0,
        tolerance_share: 0.0,
        latency: None,
        dequant: None,
        failure: None,
    };
    let rss_before = rss_bytes();
    let start = Instant::now();
    let compiled = match path {
        ExecPath::Dequantized => {
            source.compile_dequantized(&release.model, &release.io.inputs, activations)
        }
        ExecPath::AsShipped => source.compile(&release.model, &release.io.inputs, path),
    };
    let model = match compiled {
        Ok(m) => m,
        Err(e) => {
            report.failure = Some(e.into());
            return (report, None);
        }
    };
    report.dequant = model.dequant_stats();
    report.weight_bytes = model.weight_bytes();
    report.scratch_bytes = model.scratch_bytes();
    if let Some(missing) = release
        .io
        .outputs
        .iter()
        .find(|o| !model.outputs().contains(&o.name))
    {
        report.failure = Some(GateError::Load(RuntimeError::IoMismatch {
            message: format!(
                "release names output {:?}, model outputs are {:?}",
                missing.name,
                model.outputs()
            ),
        }));
        return (report, None);
    }
    let mut first = true;
    for (vector, (v, ins)) in golden.vectors.iter().zip(inputs).enumerate() {
        let outputs = match model.run(ins.iter().map(|(n, t)| (n.as_str(), t))) {
            Ok(o) => o,
            Err(source) => {
                report.failure = Some(GateError::GoldenRun { vector, source });
                return (report, None);
            }
        };
        if first {
            report.cold_start = start.elapsed();
            report.rss_delta_bytes =
                rss_before.and_then(|b| rss_bytes().map(|a| a.saturating_sub(b)));
            first = false;
        }
        for (name, want) in &v.outputs {
            let kind = release
                .io
                .output(name)
                .map(|o| o.kind)
                .unwrap_or(OutputKind::Raw);
            let Some((_, got)) = outputs.iter().find(|(n, _)| n == name) else {
                report.failure = Some(GateError::MissingOutput {
                    vector,
                    output: name.clone(),
                });
                return (report, None);
            };
            match compare(vector, name, kind, got, want, &golden.tolerance) {
                Ok(d) => {
                    report.max_abs_diff = report.max_abs_diff.max(d);
                    report.tolerance_share =
                        report
                            .tolerance_share
                            .max(tolerance_share(got, want, &golden.tolerance));
                }
                Err(e) => {
                    report.failure = Some(e);
                    return (report, None);
                }
            }
        }
    }
    if !inputs.is_empty() {
        let mut samples = Vec::new();
        let timing = Instant::now();
        for ins in inputs.iter().cycle() {
            if samples.len() >= inputs.len()
                && (samples.len() >= options.min_timed_runs
                    || timing.elapsed() > options.max_timing)
            {
                break;
            }
            let t = Instant::now();
            if let Err(source) = model.run(ins.iter().map(|(n, t)| (n.as_str(), t))) {
                report.failure = Some(GateError::GoldenRun {
                    vector: samples.len() % inputs.len(),
                    source,
                });
                return (report, None);
            }
            samples.push(t.elapsed());
        }
        report.latency = LatencyStats::from_samples(samples);
    }
    (report, Some(model))
}

/// Checks one output against its golden value; returns the largest `|got - want|`.
pub fn compare(
    vector: usize,
    output: &str,
    kind: OutputKind,
    got: &HostTensor,
    want: &outpost_protocol::release::TensorData,
    tolerance: &Tolerance,
) -> Result<f64, GateError> {
    let got_values = got.to_f64_vec();
    if got_values.len() != want.data.len() {
        return Err(GateError::OutputShape {
            vector,
            output: output.to_string(),
            got: got.shape.clone(),
            want: want.shape.clone(),
        });
    }
    let mut max_diff = 0.0f64;
    for (index, (&g, &w)) in got_values.iter().zip(&want.data).enumerate() {
        let diff = (g - w).abs();
        let tol = tolerance.abs + tolerance.rel * w.abs();
        // NaN compares as neither, so it fails too.
        if !matches!(
            diff.partial_cmp(&tol),
            Some(Ordering::Less | Ordering::Equal)
        ) {
            return Err(GateError::GoldenMismatch {
                vector,
                output: output.to_string(),
                index,
                got: g,
                want: w,
                diff,
                tolerance: tol,
            });
        }
        max_diff = max_diff.max(diff);
    }
    let classifier = matches!(
        kind,
        OutputKind::ClassLogits | OutputKind::ClassProbabilities
    );
    if tolerance.top1_must_match && classifier {
        let classes = want.shape.last().copied().unwrap_or(0);
        if classes > 0 {
            for (row, (g, w)) in got_values
                .chunks(classes)
                .zip(want.data.chunks(classes))
                .enumerate()
            {
                let (got, want) = (argmax(g), argmax(w));
                if got != want {
                    return Err(GateError::Top1Mismatch {
                        vector,
                        output: output.to_string(),
                        row,
                        got,
                        want,
                    });
                }
            }
        }
    }
    Ok(max_diff)
}

/// Largest `|got - want| / (abs + rel * |want|)` over the elements (infinite where the
/// tolerance is 0 and the values differ).
fn tolerance_share(
    got: &HostTensor,
    want: &outpost_protocol::release::TensorData,
    tolerance: &Tolerance,
) -> f64 {
    got.to_f64_vec()
        .iter()
        .zip(&want.data)
        .map(|(g, w)| {
            let diff = (g - w).abs();
            let tol = tolerance.abs + tolerance.rel * w.abs();
            if diff == 0.0 { 0.0 } else { diff / tol }
        })
        .fold(0.0, f64::max)
}

/// Index of the first largest value.
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Resident set size of this process (`VmRSS`), Linux only.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:")
}

/// Peak resident set size of this process (`VmHWM`), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:")
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::release::{DType, TensorData};

    fn want(data: Vec<f64>) -> TensorData {
        TensorData {
            dtype: DType::F32,
            shape: vec![1, data.len()],
            data,
        }
    }

    fn tol(abs: f64, rel: f64, top1: bool) -> Tolerance {
        Tolerance {
            abs,
            rel,
            top1_must_match: top1,
        }
    }

    #[test]
    fn mismatch_names_vector_output_index_and_distance() {
        let got = HostTensor::from_f32(vec![1, 3], &[0.1, 0.998, 0.2]).unwrap();
        let err = compare(
            3,
            "logits",
            OutputKind::Raw,
            &got,
            &want(vec![0.1, 0.112, 0.2]),
            &tol(0.001, 0.001, false),
        )
        .unwrap_err();
        let GateError::GoldenMismatch {
            vector,
            index,
            diff,
            tolerance,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((*vector, *index), (3, 1));
        assert!((diff - 0.886).abs() < 1e-3 && (tolerance - 0.001112).abs() < 1e-9);
        let text = err.to_string();
        assert!(
            text.starts_with("golden vector 3 output \"logits\"[1]: got 0.998"),
            "{text}"
        );
    }

    #[test]
    fn nan_output_is_a_mismatch() {
        let got = HostTensor::from_f32(vec![1, 2], &[f32::NAN, 0.0]).unwrap();
        assert!(matches!(
            compare(
                0,
                "y",
                OutputKind::Raw,
                &got,
                &want(vec![0.0, 0.0]),
                &tol(1.0, 0.0, false)
            ),
            Err(GateError::GoldenMismatch { index: 0, .. })
        ));
    }

    #[test]
    fn top1_flip_within_tolerance_is_caught_only_when_required() {
        let got = HostTensor::from_f32(vec![1, 3], &[0.50, 0.49, 0.0]).unwrap();
        let w = want(vec![0.49, 0.50, 0.0]);
        assert!(
            compare(
                0,
                "p",
                OutputKind::ClassProbabilities,
                &got,
                &w,
                &tol(0.05, 0.0, false)
            )
            .is_ok()
        );
        assert!(matches!(
            compare(
                0,
                "p",
                OutputKind::ClassProbabilities,
                &got,
                &w,
                &tol(0.05, 0.0, true)
            ),
            Err(GateError::Top1Mismatch {
                got: 0,
                want: 1,
                ..
            })
        ));
        assert!(compare(0, "p", OutputKind::Raw, &got, &w, &tol(0.05, 0.0, true)).is_ok());
    }

    #[test]
    fn wrong_output_size_is_a_shape_error() {
        let got = HostTensor::from_f32(vec![1, 2], &[0.0, 0.0]).unwrap();
        assert!(matches!(
            compare(
                0,
                "y",
                OutputKind::Raw,
                &got,
                &want(vec![0.0; 3]),
                &tol(1.0, 0.0, false)
            ),
            Err(GateError::OutputShape { .. })
        ));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = LatencyStats::from_samples(s).unwrap();
        assert_eq!(
            (l.p50, l.p95, l.p99),
            (
                Duration::from_micros(50),
                Duration::from_micros(95),
                Duration::from_micros(99)
            )
        );
        assert!(LatencyStats::from_samples(vec![]).is_none());
    }
}
