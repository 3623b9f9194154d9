//! `liboutpost`: the C ABI of the Outpost agent. The full API comes with the C SDK issue;
//! today it exports the library version only.
#![allow(unsafe_code)]

/// The library version as a static NUL-terminated string, e.g. `"0.1.0"`.
/// Thread-safe; the pointer is valid for the life of the process and must not be freed.
#[unsafe(no_mangle)]
pub extern "C" fn outpost_version() -> *const std::ffi::c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
