//! Arbitrary bytes as a server's answers to a ranged metadata fetch (response frames cut
//! from the input) and as a zstd frame: must return errors, never panic, never decode
//! more than the cap, and never complete with a file over the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::wire::Response;
use outpost_protocol::wire::metadata::{MetadataFetch, decompress};

const MAX: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = decompress(data, MAX) {
        assert!(out.len() as u64 <= MAX);
    }
    // Frames: a 2-byte length, then that many bytes (a `Response` frame).
    let mut fetch = MetadataFetch::new("targets", None, MAX, 1024, true);
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(n);
        rest = tail;
        let Ok(resp) = Response::from_bytes(frame) else {
            continue;
        };
        let _ = fetch.request();
        match fetch.accept(&resp) {
            Ok(Some(file)) => {
                assert!(file.len() as u64 <= MAX, "{} bytes over the cap", file.len());
                break;
            }
            Ok(None) => {}
            Err(_) => {}
        }
    }
});
