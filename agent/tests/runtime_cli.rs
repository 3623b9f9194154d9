//! The `outpost-agent infer` and `bench` subcommands, run as the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_agent::npy;
use outpost_agent::runtime::HostTensor;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn argmax(v: &[serde_json::Value]) -> usize {
    let v: Vec<f64> = v.iter().map(|x| x.as_f64().unwrap()).collect();
    outpost_agent::gate::argmax(&v)
}

#[test]
fn infer_prints_outputs_id_and_path_as_json() {
    let f = fixtures();
    let out = json(&agent(&[
        "infer",
        "--model",
        path(&f.join("mlp.onnx")),
        "--input",
        &format!("x={}", path(&f.join("sample_flat_0.npy"))),
    ]));
    let logits = &out["outputs"]["logits"];
    assert_eq!(logits["shape"], serde_json::json!([1, 10]));
    assert_eq!(logits["dtype"], "f32");
    let data = logits["data"].as_array().unwrap();
    assert_eq!(data.len(), 10);
    assert_eq!(argmax(data), 0, "sample_flat_0 is a 0");
    assert_eq!(out["path"], "as-shipped");
    let id = out["prediction_id"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
}

#[test]
fn infer_uses_release_beside_the_model_and_runs_qdq_dequantized_when_faster() {
    let f = fixtures();
    let out = json(&agent(&[
        "infer",
        "--model",
        path(&f.join("cnn_a_qdq.onnx")),
        "--input",
        &format!("x={}", path(&f.join("sample_image_0.npy"))),
    ]));
    let reason = out["reason"].as_str().unwrap();
    assert!(reason.contains("both within tolerance"), "{reason}");
    assert!(
        reason.starts_with(out["path"].as_str().unwrap()),
        "{reason}"
    );
    assert_eq!(
        argmax(out["outputs"]["logits"]["data"].as_array().unwrap()),
        0
    );
}

#[test]
fn infer_without_release_derives_io_from_the_npy() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("copy.onnx");
    std::fs::copy(fixtures().join("cnn_b.onnx"), &model).unwrap();
    let out = json(&agent(&[
        "infer",
        "--model",
        path(&model),
        "--input",
        &format!("x={}", path(&fixtures().join("sample_image_0.npy"))),
    ]));
    assert_eq!(out["path"], "as-shipped");
    assert!(out["reason"].as_str().unwrap().contains("float model"));
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

#[test]
fn infer_rejects_bad_input_with_one_line_error() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.npy");
    std::fs::write(
        &wrong,
        npy::write(&HostTensor::from_f32(vec![1, 63], &[0.0; 63]).unwrap()),
    )
    .unwrap();
    let model = path(&f.join("mlp.onnx")).to_string();
    let out = agent(&[
        "infer",
        "--model",
        &model,
        "--input",
        &format!("x={}", path(&wrong)),
    ]);
    assert_one_line_error(&out, "shape");

    let out = agent(&["infer", "--model", &model, "--input", "x"]);
    assert_one_line_error(&out, "NAME=FILE.npy");

    let missing = dir.path().join("missing.npy");
    let out = agent(&[
        "infer",
        "--model",
        &model,
        "--input",
        &format!("x={}", path(&missing)),
    ]);
    assert_one_line_error(&out, "missing.npy");

    let garbage = dir.path().join("garbage.npy");
    std::fs::write(&garbage, b"not numpy").unwrap();
    let out = agent(&[
        "infer",
        "--model",
        &model,
        "--input",
        &format!("x={}", path(&garbage)),
    ]);
    assert_one_line_error(&out, ".npy");

    let out = agent(&[
        "infer",
        "--model",
        path(&f.join("negative/truncated.onnx")),
        "--input",
        &format!("x={}", path(&f.join("sample_flat_0.npy"))),
    ]);
    assert_one_line_error(&out, "malformed model");
}

#[test]
fn bad_command_line_exits_2() {
    assert_eq!(agent(&[]).status.code(), Some(2));
    assert_eq!(agent(&["infer"]).status.code(), Some(2));
    assert_eq!(agent(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn bench_reports_cold_start_percentiles_and_both_paths_for_qdq() {
    let f = fixtures();
    let out = json(&agent(&[
        "bench",
        "--model",
        path(&f.join("mlp_qdq.onnx")),
        "--input",
        &format!("x={}", path(&f.join("sample_flat_0.npy"))),
        "--iterations",
        "20",
    ]));
    let num = |k: &str| out[k].as_f64().unwrap_or_else(|| panic!("{k} in {out}"));
    assert!(num("cold_start_ms") > 0.0);
    assert!(num("p50_us") > 0.0 && num("p99_us") >= num("p50_us"));
    assert_eq!(out["iterations"], 20);
    if cfg!(target_os = "linux") {
        assert!(out["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    }
    let paths = out["paths"].as_object().unwrap();
    assert!(paths.contains_key("as-shipped") && paths.contains_key("dequantized"));
    let chosen = out["path"].as_str().unwrap();
    assert_eq!(paths[chosen]["p50_us"], out["p50_us"]);
}
