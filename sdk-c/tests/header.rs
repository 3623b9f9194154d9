//! The committed `include/outpost.h` is what the pinned cbindgen generates from the
//! sources (drift check), and it compiles cleanly as C99 and as C++.
//!
//! cbindgen must be installed at the pinned version (`sdk-c/ci-deps.sh`); without it
//! this test fails rather than skipping.

use std::path::PathBuf;
use std::process::Command;

const CBINDGEN_VERSION: &str = "0.29.4";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_header_matches_pinned_cbindgen_output() {
    let how = format!(
        "install it with sdk-c/ci-deps.sh (cargo install cbindgen --version {CBINDGEN_VERSION} --locked)"
    );
    let version = Command::new("cbindgen")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cbindgen not found ({e}): {how}"));
    let version = String::from_utf8_lossy(&version.stdout);
    assert_eq!(
        version.trim(),
        format!("cbindgen {CBINDGEN_VERSION}"),
        "wrong cbindgen: {how}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let generated = tmp.path().join("outpost.h");
    let out = Command::new("cbindgen")
        .current_dir(manifest_dir())
        .args([
            "--config",
            "cbindgen.toml",
            "--crate",
            "outpost-sdk-c",
            "--output",
        ])
        .arg(&generated)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cbindgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = std::fs::read_to_string(&generated).unwrap();
    let have = std::fs::read_to_string(manifest_dir().join("include/outpost.h")).unwrap();
    assert!(
        want == have,
        "sdk-c/include/outpost.h is out of date: run sdk-c/gen-header.sh and commit it"
    );
}

fn compiles(compiler: &str, std: &str, ext: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join(format!("use_header.{ext}"));
    std::fs::write(
        &src,
        "#include \"outpost.h\"\n\
         int main(void) {\n\
             outpost_agent *agent = 0;\n\
             outpost_status s = outpost_agent_new(0, \"/nonexistent\", &agent);\n\
             return s == OUTPOST_OK ? 0 : (int)(outpost_version()[0] == 0);\n\
         }\n",
    )
    .unwrap();
    let out = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args([
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(manifest_dir().join("include"))
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} -std={std}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_c99_with_every_warning_an_error() {
    compiles("gcc", "c99", "c");
}

#[test]
fn header_compiles_as_cpp_with_every_warning_an_error() {
    compiles("g++", "c++11", "cpp");
}
