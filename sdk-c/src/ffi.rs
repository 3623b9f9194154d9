//! Plumbing shared by every entry point: the panic boundary, the per-thread last error,
//! the handle registry, and the pointer and buffer helpers.
//!
//! Handles are registry tokens, not addresses: `outpost_agent *` and `outpost_result *`
//! are integers disguised as pointers and never dereferenced. A call looks its token up
//! in a global registry and clones the `Arc` it finds, so a freed (or never valid) handle
//! is reported as `OUTPOST_ERR_INVALID_HANDLE` without reading freed memory, and a handle
//! freed while another thread is still inside a call stays alive until that call returns.
//! Tokens are never reused within a process.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::{
    OUTPOST_ERR_BUFFER_TOO_SMALL, OUTPOST_ERR_INVALID_ARGUMENT, OUTPOST_ERR_INVALID_HANDLE,
    OUTPOST_ERR_NULL_POINTER, OUTPOST_ERR_PANIC, OUTPOST_OK, outpost_status,
};

/// A failed call: its status and the message `outpost_last_error` returns.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: outpost_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: outpost_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
}

pub(crate) type Res<T = ()> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: &str) {
    LAST_ERROR.with_borrow_mut(|e| {
        e.clear();
        e.push_str(message);
    });
}

pub(crate) fn last_error() -> String {
    LAST_ERROR.with_borrow(Clone::clone)
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// The panic boundary: runs `f`, records a failure's message for this thread and returns
/// its status. Under `panic = "abort"` (the `device` profile) a panic aborts instead.
pub(crate) fn guard(f: impl FnOnce() -> Res) -> outpost_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => OUTPOST_OK,
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(payload) => {
            set_last_error(&format!("internal panic: {}", panic_text(&*payload)));
            OUTPOST_ERR_PANIC
        }
    }
}

pub(crate) fn null(what: &str) -> Failure {
    Failure::new(OUTPOST_ERR_NULL_POINTER, format!("{what} is NULL"))
}

/// Live handles of one type, by token.
pub(crate) struct Registry<T> {
    live: RwLock<BTreeMap<usize, Arc<T>>>,
    next: AtomicUsize,
    kind: &'static str,
}

/// Tokens are multiples of 16 so that they look like aligned pointers to tools.
const TOKEN_STEP: usize = 16;

impl<T> Registry<T> {
    pub const fn new(kind: &'static str) -> Self {
        Registry {
            live: RwLock::new(BTreeMap::new()),
            next: AtomicUsize::new(TOKEN_STEP),
            kind,
        }
    }

    /// Registers `value` and returns its token as an opaque pointer.
    pub fn insert<H>(&self, value: T) -> *mut H {
        let token = self.next.fetch_add(TOKEN_STEP, Ordering::Relaxed);
        self.live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, Arc::new(value));
        std::ptr::without_provenance_mut(token)
    }

    /// The value behind `handle`: NULL and unknown (freed) handles are failures.
    pub fn get<H>(&self, handle: *const H) -> Res<Arc<T>> {
        if handle.is_null() {
            return Err(null(self.kind));
        }
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&handle.addr())
            .cloned()
            .ok_or_else(|| self.invalid())
    }

    /// Unregisters `handle`; the value is dropped when the last call using it returns.
    pub fn remove<H>(&self, handle: *const H) -> Res<Arc<T>> {
        self.live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&handle.addr())
            .ok_or_else(|| self.invalid())
    }

    fn invalid(&self) -> Failure {
        Failure::new(
            OUTPOST_ERR_INVALID_HANDLE,
            format!(
                "{} is not a live handle (already freed, or never returned by this library)",
                self.kind
            ),
        )
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| {
        Failure::new(
            OUTPOST_ERR_INVALID_ARGUMENT,
            format!("{what} is not valid UTF-8"),
        )
    })
}

/// A `(pointer, length)` array argument; NULL is allowed when `len` is 0.
///
/// # Safety
/// `p` is NULL or points to `len` initialized, aligned `T`s valid for the call.
pub(crate) unsafe fn slice_arg<'a, T>(p: *const T, len: usize, what: &str) -> Res<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    if len
        .checked_mul(std::mem::size_of::<T>().max(1))
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Failure::new(
            OUTPOST_ERR_INVALID_ARGUMENT,
            format!("{what}: length {len} is too large"),
        ));
    }
    // SAFETY: non-null, `len` elements per the caller's contract, size checked above.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Writes `value` through an out-pointer.
///
/// # Safety
/// `p` is NULL or valid for writing one `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T, what: &str) -> Res {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and writable per the caller's contract.
    unsafe { p.write(value) };
    Ok(())
}

/// Copies `s` into the caller's buffer, NUL-terminated. `*out_len` (when not NULL)
/// receives `s.len()` (bytes, without the NUL). A buffer shorter than `s.len() + 1`
/// receives a truncated, NUL-terminated copy and the call fails with
/// `OUTPOST_ERR_BUFFER_TOO_SMALL`. `buf` may be NULL when `len` is 0 (size query).
///
/// # Safety
/// `buf` is NULL or valid for writing `len` bytes; `out_len` is NULL or writable.
pub(crate) unsafe fn copy_str(s: &str, buf: *mut c_char, len: usize, out_len: *mut usize) -> Res {
    if buf.is_null() && len != 0 {
        return Err(null("buffer"));
    }
    if !out_len.is_null() {
        // SAFETY: non-null and writable per the caller's contract.
        unsafe { out_len.write(s.len()) };
    }
    if len > 0 {
        let n = s.len().min(len - 1);
        // SAFETY: `buf` holds `len > n` bytes; source and buffer do not overlap (ours).
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    if len > s.len() {
        Ok(())
    } else {
        Err(Failure::new(
            OUTPOST_ERR_BUFFER_TOO_SMALL,
            format!("buffer of {len} bytes is too small: {} needed", s.len() + 1),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_str_truncates_and_terminates_a_short_buffer() {
        let mut buf = [0x55 as c_char; 4];
        let mut n = 0usize;
        // SAFETY: buf holds 4 bytes; n is writable.
        let err = unsafe { copy_str("hello", buf.as_mut_ptr(), buf.len(), &mut n) }.unwrap_err();
        assert_eq!(err.status, OUTPOST_ERR_BUFFER_TOO_SMALL);
        assert_eq!(n, 5);
        assert_eq!(buf.map(|c| c as u8), *b"hel\0");
        let mut exact = [0 as c_char; 6];
        // SAFETY: as above.
        unsafe {
            copy_str(
                "hello",
                exact.as_mut_ptr(),
                exact.len(),
                std::ptr::null_mut(),
            )
        }
        .unwrap();
        assert_eq!(exact.map(|c| c as u8), *b"hello\0");
    }

    #[test]
    fn copy_str_rejects_null_buffer_with_nonzero_length() {
        // SAFETY: a NULL buffer is checked before use.
        let err =
            unsafe { copy_str("x", std::ptr::null_mut(), 8, std::ptr::null_mut()) }.unwrap_err();
        assert_eq!(err.status, OUTPOST_ERR_NULL_POINTER);
    }

    #[test]
    fn registry_reports_double_free_and_never_reuses_tokens() {
        static REG: Registry<u32> = Registry::new("test handle");
        let a: *mut u8 = REG.insert(1);
        assert_eq!(*REG.get(a).unwrap(), 1);
        REG.remove(a).unwrap();
        assert_eq!(
            REG.remove(a).unwrap_err().status,
            OUTPOST_ERR_INVALID_HANDLE
        );
        assert_eq!(REG.get(a).unwrap_err().status, OUTPOST_ERR_INVALID_HANDLE);
        let b: *mut u8 = REG.insert(2);
        assert_ne!(a, b);
        assert_eq!(
            REG.get(std::ptr::null::<u8>()).unwrap_err().status,
            OUTPOST_ERR_NULL_POINTER
        );
    }

    #[test]
    fn guard_turns_a_panic_into_a_status_and_message() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, OUTPOST_ERR_PANIC);
        assert!(last_error().contains("boom"));
        assert_eq!(guard(|| Ok(())), OUTPOST_OK);
    }
}
