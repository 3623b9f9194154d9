//! Simulated app traffic for `outpost-agent run --simulate-inputs FILE.npy`: a testing and
//! demo feature of the binary (not of the library), standing in for the app that would
//! call `infer` and report labels on a real device.
//!
//! Rows of an `.npy` (first axis) are fed to [`Agent::infer`] in a loop at a fixed rate
//! on a thread of their own, against whatever model the agent serves at that moment
//! (nothing happens until a model is installed). With `--simulate-labels`, the true
//! class of a share of the predictions is reported back with [`Agent::report_label`],
//! so that windows carry realized accuracy next to the expected one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use outpost_agent::monitor::labels::LabelOutcome;
use outpost_agent::npy;
use outpost_agent::runtime::HostTensor;
use outpost_agent::{Agent, AgentError};
use outpost_protocol::release::{ModelRelease, TensorSpec};

/// Command-line options of the traffic simulation (all off unless `--simulate-inputs`).
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// TESTING/DEMO: feed `infer` from the rows of this .npy (first axis) on a thread,
    /// as an app would.
    #[arg(long, value_name = "FILE.npy")]
    pub simulate_inputs: Option<PathBuf>,
    /// TESTING/DEMO: true class of each input row (integer .npy, same row count); a
    /// share of the predictions gets its label reported.
    #[arg(long, value_name = "FILE.npy", requires = "simulate_inputs")]
    pub simulate_labels: Option<PathBuf>,
    /// TESTING/DEMO: simulated inferences per second.
    #[arg(long, default_value_t = 50.0, value_name = "N_PER_SEC")]
    pub simulate_rate: f64,
    /// TESTING/DEMO: share of predictions whose label is reported, in [0, 1].
    #[arg(long, default_value_t = 0.5, value_name = "SHARE")]
    pub simulate_label_share: f64,
}

/// Loaded simulation inputs.
#[derive(Debug)]
pub struct Traffic {
    rows: Vec<HostTensor>,
    labels: Option<Vec<u32>>,
    period: Duration,
    share: f64,
    /// First row: devices started together should not all see the same inputs.
    start: usize,
}

/// What the simulation did (printed when the daemon stops).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrafficStats {
    /// Successful inferences.
    pub inferences: u64,
    /// Failed inferences (other than "no model installed yet").
    pub errors: u64,
    /// Labels reported.
    pub labels: u64,
    /// Of those, joined to a prediction that matched.
    pub correct: u64,
}

/// Splits a tensor along its first axis.
fn split_rows(t: &HostTensor) -> anyhow::Result<Vec<HostTensor>> {
    let Some((&n, rest)) = t.shape.split_first() else {
        bail!("a scalar has no rows");
    };
    ensure!(n > 0, "no rows");
    let row_len = t.data.len() / n;
    ensure!(row_len * n == t.data.len(), "ragged tensor");
    t.data
        .chunks_exact(row_len.max(1))
        .take(n)
        .map(|c| Ok(HostTensor::new(t.dtype, rest.to_vec(), c.to_vec())?))
        .collect()
}

fn read_npy(path: &Path) -> anyhow::Result<HostTensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    npy::read(&bytes).with_context(|| format!("reading {}", path.display()))
}

impl Traffic {
    /// Reads the files named by `args`; `None` without `--simulate-inputs`.
    pub fn load(args: &SimulateArgs) -> anyhow::Result<Option<Traffic>> {
        let Some(inputs) = &args.simulate_inputs else {
            return Ok(None);
        };
        ensure!(
            args.simulate_rate.is_finite() && args.simulate_rate > 0.0,
            "--simulate-rate must be a positive number"
        );
        ensure!(
            (0.0..=1.0).contains(&args.simulate_label_share),
            "--simulate-label-share must be in [0, 1]"
        );
        let rows = split_rows(&read_npy(inputs)?)
            .with_context(|| format!("splitting {} into rows", inputs.display()))?;
        let labels = match &args.simulate_labels {
            None => None,
            Some(p) => {
                let t = read_npy(p)?;
                let values = t.to_f64_vec();
                ensure!(
                    values.len() == rows.len(),
                    "{} holds {} labels for {} input rows",
                    p.display(),
                    values.len(),
                    rows.len()
                );
                let labels = values
                    .iter()
                    .map(|&v| {
                        (v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX))
                            .then_some(v as u32)
                    })
                    .collect::<Option<Vec<u32>>>()
                    .with_context(|| format!("{}: labels must be class indices", p.display()))?;
                Some(labels)
            }
        };
        Ok(Some(Traffic {
            rows,
            labels,
            period: Duration::from_secs_f64(1.0 / args.simulate_rate),
            share: args.simulate_label_share,
            start: std::process::id() as usize,
        }))
    }

    /// Number of input rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Starts the traffic thread; it stops when `stop` is set and returns its counts.
    pub fn spawn(self, agent: Arc<Agent>, stop: Arc<AtomicBool>) -> JoinHandle<TrafficStats> {
        std::thread::Builder::new()
            .name("simulated-app".into())
            .spawn(move || self.run(&agent, &stop))
            .expect("spawning a thread")
    }

    fn run(self, agent: &Agent, stop: &AtomicBool) -> TrafficStats {
        let mut stats = TrafficStats::default();
        let mut target: Option<Target> = None;
        let mut looked = None::<Instant>;
        let mut label_credit = 0.0;
        let mut next = Instant::now();
        let mut i = self.start % self.rows.len();
        while !stop.load(Ordering::Relaxed) {
            if target.is_none() && looked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                looked = Some(Instant::now());
                target = Target::find(agent);
            }
            if let Some(t) = &target {
                let row = &self.rows[i % self.rows.len()];
                match agent.infer(&t.model, &[(t.input.as_str(), t.shape(row))]) {
                    Ok(inf) => {
                        stats.inferences += 1;
                        label_credit += self.share;
                        if let Some(labels) = &self.labels
                            && label_credit >= 1.0
                        {
                            label_credit -= 1.0;
                            let outcome =
                                agent.report_label(inf.prediction_id, labels[i % labels.len()]);
                            stats.labels += 1;
                            if outcome == (LabelOutcome::Joined { correct: true }) {
                                stats.correct += 1;
                            }
                        }
                    }
                    Err(AgentError::UnknownModel { .. }) => target = None,
                    Err(_) => stats.errors += 1,
                }
                i = (i + 1) % self.rows.len();
            }
            next += self.period;
            let now = Instant::now();
            match next.checked_duration_since(now) {
                Some(wait) => std::thread::sleep(wait.min(Duration::from_millis(200))),
                // Far behind (a busy machine): do not burst to catch up.
                None if now - next > Duration::from_secs(1) => next = now,
                None => {}
            }
        }
        stats
    }
}

/// The model slot the simulated app calls and its input.
#[derive(Debug)]
struct Target {
    model: String,
    input: String,
    spec: TensorSpec,
}

impl Target {
    /// The first installed model with exactly one input.
    fn find(agent: &Agent) -> Option<Target> {
        agent.store().slots().ok()?.into_iter().find_map(|slot| {
            let release = ModelRelease::from_json(slot.active.release_json.as_bytes()).ok()?;
            let [spec] = release.io.inputs.as_slice() else {
                return None;
            };
            Some(Target {
                model: slot.model.clone(),
                input: spec.name.clone(),
                spec: spec.clone(),
            })
        })
    }

    /// The row in the shape the release declares when the element counts agree
    /// (`[1, 8, 8]` rows for a `[1, 1, 8, 8]` input).
    fn shape(&self, row: &HostTensor) -> HostTensor {
        let mut t = row.clone();
        if self.spec.element_count() * self.spec.dtype.size() == row.data.len() {
            t.shape = self.spec.shape.clone();
        }
        t
    }
}

/// Stops the traffic thread when dropped (daemon returned or failed).
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::release::DType;

    #[test]
    fn split_rows_keeps_each_rows_bytes_and_drops_the_first_axis() {
        let t = HostTensor::from_f32(vec![3, 1, 2], &[0., 1., 2., 3., 4., 5.]).unwrap();
        let rows = split_rows(&t).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].shape, vec![1, 2]);
        assert_eq!(rows[2].to_f64_vec(), vec![4., 5.]);
    }

    #[test]
    fn split_rows_refuses_a_scalar_and_an_empty_tensor() {
        let scalar = HostTensor::new(DType::F32, vec![], vec![0; 4]).unwrap();
        assert!(split_rows(&scalar).is_err());
        let empty = HostTensor::new(DType::F32, vec![0, 4], vec![]).unwrap();
        assert!(split_rows(&empty).is_err());
    }

    fn args(dir: &Path, labels: &[f64], share: f64) -> SimulateArgs {
        let inputs = dir.join("x.npy");
        let t = HostTensor::from_f32(vec![2, 2], &[0., 1., 2., 3.]).unwrap();
        std::fs::write(&inputs, npy::write(&t)).unwrap();
        let lpath = dir.join("y.npy");
        let l = HostTensor::from_f64_values(DType::I64, vec![labels.len()], labels).unwrap();
        std::fs::write(&lpath, npy::write(&l)).unwrap();
        SimulateArgs {
            simulate_inputs: Some(inputs),
            simulate_labels: Some(lpath),
            simulate_rate: 10.0,
            simulate_label_share: share,
        }
    }

    #[test]
    fn load_refuses_label_count_mismatch_bad_share_and_negative_labels() {
        let dir = tempfile::tempdir().unwrap();
        let ok = Traffic::load(&args(dir.path(), &[1., 2.], 0.5))
            .unwrap()
            .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok.labels, Some(vec![1, 2]));
        assert!(Traffic::load(&args(dir.path(), &[1.], 0.5)).is_err());
        assert!(Traffic::load(&args(dir.path(), &[1., 2.], 1.5)).is_err());
        assert!(Traffic::load(&args(dir.path(), &[1., -2.], 0.5)).is_err());
        let mut a = args(dir.path(), &[1., 2.], 0.5);
        a.simulate_rate = 0.0;
        assert!(Traffic::load(&a).is_err());
    }

    #[test]
    fn traffic_infers_on_the_installed_model_and_reports_the_label_share() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        let dir = tempfile::tempdir().unwrap();
        let agent =
            Arc::new(Agent::open(outpost_agent::AgentConfig::new(dir.path(), "sim")).unwrap());
        let release =
            ModelRelease::from_json(&std::fs::read(fx.join("cnn_a.release.json")).unwrap())
                .unwrap();
        agent
            .install(&std::fs::read(fx.join("cnn_a.onnx")).unwrap(), release)
            .unwrap();
        let traffic = Traffic::load(&SimulateArgs {
            simulate_inputs: Some(fx.join("heldout_image.npy")),
            simulate_labels: Some(fx.join("heldout_labels.npy")),
            simulate_rate: 2000.0,
            simulate_label_share: 0.25,
        })
        .unwrap()
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = traffic.spawn(agent.clone(), stop.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.status().unwrap()[0].counts.inferences < 40 {
            assert!(Instant::now() < deadline, "no simulated inferences");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let stats = handle.join().unwrap();
        assert_eq!(stats.errors, 0);
        assert!(stats.inferences >= 40, "{stats:?}");
        assert_eq!(stats.labels, stats.inferences / 4, "{stats:?}");
    }

    #[test]
    fn labels_belong_to_the_rows_that_were_inferred() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        let dir = tempfile::tempdir().unwrap();
        let agent =
            Arc::new(Agent::open(outpost_agent::AgentConfig::new(dir.path(), "sim")).unwrap());
        let release =
            ModelRelease::from_json(&std::fs::read(fx.join("cnn_a.release.json")).unwrap())
                .unwrap();
        agent
            .install(&std::fs::read(fx.join("cnn_a.onnx")).unwrap(), release)
            .unwrap();
        let mut traffic = Traffic::load(&SimulateArgs {
            simulate_inputs: Some(fx.join("heldout_image.npy")),
            simulate_labels: Some(fx.join("heldout_labels.npy")),
            simulate_rate: 5000.0,
            simulate_label_share: 1.0,
        })
        .unwrap()
        .unwrap();
        traffic.start = 7;
        let stop = Arc::new(AtomicBool::new(false));
        let handle = traffic.spawn(agent.clone(), stop.clone());
        let deadline = Instant::now() + Duration::from_secs(120);
        while agent.status().unwrap()[0].counts.inferences < 360 {
            assert!(Instant::now() < deadline, "too slow");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        let stats = handle.join().unwrap();
        // The held-out accuracy of cnn_a is 98.3% (index.json); shifted labels would
        // score near chance (10%).
        let accuracy = stats.correct as f64 / stats.labels as f64;
        assert!(stats.labels >= 360, "{stats:?}");
        assert!((0.95..1.0).contains(&accuracy), "{accuracy} {stats:?}");
    }

    #[test]
    fn without_inputs_nothing_is_simulated() {
        let a = SimulateArgs {
            simulate_inputs: None,
            simulate_labels: None,
            simulate_rate: 1.0,
            simulate_label_share: 0.5,
        };
        assert!(Traffic::load(&a).unwrap().is_none());
    }
}
