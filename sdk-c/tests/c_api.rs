//! Builds the C programs in `sdk-c/tests/c/` and `sdk-c/examples/` with gcc against the
//! freshly built `liboutpost` and runs them: under AddressSanitizer + UBSan, under
//! Valgrind memcheck, linked statically, and installed with `install.sh` + pkg-config.
//!
//! The library is found next to this test binary: it runs from
//! `$CARGO_TARGET_DIR/<profile>/deps/`, where cargo builds the package's cdylib and
//! staticlib (`liboutpost.so`, `liboutpost.a`) before its integration tests. `cargo test`
//! does not copy them up to `<profile>/` (only `cargo build` does), so a copy there may be
//! missing on a cold cache or older than this test. The `.npy` fixtures are converted to raw little-endian `.bin`
//! files in a temp dir so that the C side needs no parser.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use outpost_agent::runtime::HostTensor;
use outpost_agent::{Agent, AgentConfig, npy};
use outpost_protocol::release::ModelRelease;

const SAMPLES: usize = 40;
const VALGRIND_SAMPLES: usize = 12;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    manifest_dir().join("../tests/fixtures/models")
}

/// `$CARGO_TARGET_DIR/<profile>/deps`, where cargo put this test and the `liboutpost.so`
/// and `liboutpost.a` built with it.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf();
    for lib in ["liboutpost.so", "liboutpost.a"] {
        assert!(
            dir.join(lib).exists(),
            "{} missing: build the outpost-sdk-c library first",
            dir.join(lib).display()
        );
    }
    dir
}

/// A directory with `liboutpost.so` and its soname link `liboutpost.so.0`, for `-L` and
/// `-rpath` (cargo writes only the unversioned name).
fn shared_lib_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("lib");
    std::fs::create_dir_all(&dir).unwrap();
    let so = lib_dir().join("liboutpost.so");
    for name in ["liboutpost.so", "liboutpost.so.0"] {
        std::os::unix::fs::symlink(&so, dir.join(name)).unwrap();
    }
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// gcc, C99, every warning an error, against the shared library in `lib`.
fn build_c(src: &Path, exe: &Path, lib: &Path, extra: &[&str]) {
    let include = manifest_dir().join("include");
    let mut cmd = Command::new("gcc");
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-g"])
        .args(extra)
        .arg("-I")
        .arg(&include)
        .arg(src)
        .arg(format!("-L{}", lib.display()))
        .arg("-loutpost")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lpthread", "-lm", "-o"])
        .arg(exe);
    check(&mut cmd);
}

/// The first `n` rows of a fixture `.npy`, as raw little-endian bytes.
fn rows(name: &str, n: usize) -> Vec<u8> {
    let t: HostTensor = npy::read(&std::fs::read(fixtures().join(name)).unwrap()).unwrap();
    let row = t.data.len() / t.shape[0];
    t.data[..n * row].to_vec()
}

/// Inputs, onnxruntime references and labels for the first `n` held-out samples.
fn write_bins(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, npy_name) in [
        ("flat.bin", "heldout_flat.npy"),
        ("image.bin", "heldout_image.npy"),
        ("mlp_ref.bin", "mlp.ort.npy"),
        ("cnn_ref.bin", "cnn_a.ort.npy"),
        ("labels.bin", "heldout_labels.npy"),
    ] {
        std::fs::write(dir.join(file), rows(npy_name, n)).unwrap();
    }
}

fn api_test_args(cmd: &mut Command, tmp: &Path, n: usize, mode: &str) {
    cmd.arg(fixtures())
        .arg(tmp.join("data"))
        .arg(tmp.join("bin"))
        .arg(n.to_string())
        .arg(mode);
}

#[test]
fn c_api_passes_under_address_and_undefined_behavior_sanitizers() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = shared_lib_dir(tmp.path());
    write_bins(&tmp.path().join("bin"), SAMPLES);
    let exe = tmp.path().join("api_test_asan");
    build_c(
        &manifest_dir().join("tests/c/api_test.c"),
        &exe,
        &lib,
        &[
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ],
    );
    let mut cmd = Command::new(&exe);
    api_test_args(&mut cmd, tmp.path(), SAMPLES, "fresh");
    cmd.env(
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=23",
    )
    .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
    let stdout = check(&mut cmd);
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The data directory the Valgrind run opens: both models installed through the Rust
/// API, so that the (50x slower) run does not meet the releases' latency budgets in the
/// validation gate. Opening re-validates them without budgets.
fn preinstall(data: &Path) {
    let agent = Agent::open(AgentConfig::new(data, "c-test")).unwrap();
    for name in ["mlp", "cnn_a"] {
        let bytes = std::fs::read(fixtures().join(format!("{name}.onnx"))).unwrap();
        let json = std::fs::read(fixtures().join(format!("{name}.release.json"))).unwrap();
        agent
            .install(&bytes, ModelRelease::from_json(&json).unwrap())
            .unwrap();
    }
}

#[test]
fn c_api_passes_valgrind_memcheck_without_leaks_or_invalid_access() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = shared_lib_dir(tmp.path());
    write_bins(&tmp.path().join("bin"), VALGRIND_SAMPLES);
    preinstall(&tmp.path().join("data"));
    let exe = tmp.path().join("api_test");
    build_c(
        &manifest_dir().join("tests/c/api_test.c"),
        &exe,
        &lib,
        &["-O1"],
    );
    let mut cmd = Command::new("/usr/bin/valgrind");
    cmd.args([
        "-q",
        "--error-exitcode=1",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--show-leak-kinds=definite",
    ])
    .arg(&exe);
    api_test_args(&mut cmd, tmp.path(), VALGRIND_SAMPLES, "preinstalled");
    let stdout = check(&mut cmd);
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The one `cc` line of `sdk-c/README.md`, with its library directory pointed at this
/// build's.
fn readme_cc_line() -> String {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cc ") && l.contains("examples/classify.c"))
        .expect("README.md shows the cc line that builds the example");
    line.to_string()
}

fn classify(exe: &Path, data: &Path, model: &str, digit: u32) -> String {
    let f = fixtures();
    check(
        Command::new(exe)
            .arg(data)
            .arg(f.join(format!("{model}.onnx")))
            .arg(f.join(format!("{model}.release.json")))
            .arg(f.join(format!("digit_{digit}.pgm"))),
    )
}

#[test]
fn example_built_from_the_readme_line_prints_the_fixture_digits() {
    let tmp = tempfile::tempdir().unwrap();
    let line = readme_cc_line();
    assert!(line.contains("target/release/liboutpost.a"), "{line}");
    let lib_a = lib_dir().join("liboutpost.a");
    let exe = tmp.path().join("classify");
    let line = line
        .replace("target/release/liboutpost.a", &lib_a.display().to_string())
        .replace("-o classify", &format!("-o {}", exe.display()));
    check(
        Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(manifest_dir().join("..")),
    );
    for model in ["mlp", "cnn_a"] {
        let data = tmp.path().join(format!("data-{model}"));
        for digit in [3, 7, 9] {
            let out = classify(&exe, &data, model, digit);
            assert!(
                out.starts_with(&format!("digit {digit} ")),
                "{model}: {out}"
            );
        }
    }
    // A file that is not an 8x8 PGM is refused with a message, not misread.
    let out = run(Command::new(&exe)
        .arg(tmp.path().join("data-mlp"))
        .arg(fixtures().join("mlp.onnx"))
        .arg(fixtures().join("mlp.release.json"))
        .arg(fixtures().join("mlp.release.json")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an 8x8 P5 PGM"));
}

#[test]
fn install_script_gives_soname_links_and_a_pkg_config_file_that_builds_the_example() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    check(
        Command::new("sh")
            .arg(manifest_dir().join("install.sh"))
            .arg(&prefix)
            .arg(lib_dir()),
    );
    let libdir = prefix.join("lib");
    let real = std::fs::read_link(libdir.join("liboutpost.so.0")).unwrap();
    assert_eq!(
        real,
        PathBuf::from(format!("liboutpost.so.{}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        std::fs::read_link(libdir.join("liboutpost.so")).unwrap(),
        PathBuf::from("liboutpost.so.0")
    );
    assert!(libdir.join("liboutpost.a").exists());
    assert!(prefix.join("include/outpost.h").exists());
    let dynamic = check(Command::new("readelf").arg("-d").arg(libdir.join(&real)));
    assert!(dynamic.contains("[liboutpost.so.0]"), "{dynamic}");

    let pc = check(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "outpost"])
            .env("PKG_CONFIG_PATH", libdir.join("pkgconfig")),
    );
    assert!(pc.contains(&format!("-L{}", libdir.display())), "{pc}");
    let version = check(
        Command::new("pkg-config")
            .args(["--modversion", "outpost"])
            .env("PKG_CONFIG_PATH", libdir.join("pkgconfig")),
    );
    assert_eq!(version.trim(), env!("CARGO_PKG_VERSION"));

    let exe = tmp.path().join("classify");
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c99", "-Wall", "-Werror"])
        .arg(manifest_dir().join("examples/classify.c"))
        .args(pc.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-o")
        .arg(&exe);
    check(&mut cmd);
    let needed = check(Command::new("readelf").arg("-d").arg(&exe));
    assert!(
        needed.contains("Shared library: [liboutpost.so.0]"),
        "{needed}"
    );
    let out = classify(&exe, &tmp.path().join("data"), "mlp", 7);
    assert!(out.starts_with("digit 7 "), "{out}");
}
