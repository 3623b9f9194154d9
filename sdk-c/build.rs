//! Gives `liboutpost.so` a versioned soname (`liboutpost.so.0`) on Linux, so that apps
//! linked against it load any ABI-compatible 0.x build. See `sdk-c/README.md`.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // Not on Android: APKs ship `lib*.so` only, and a versioned soname would not resolve.
    if os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liboutpost.so.0");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
