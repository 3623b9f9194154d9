//! Fuzz `delta::decompress_full` (the compressed full model a device downloads) with
//! arbitrary frame bytes and signed lengths taken from the input. Invariant: no panic,
//! no allocation beyond the signed length, and any `Ok` output is exactly that long.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::delta;

fuzz_target!(|data: &[u8]| {
    let signed = u64::from(u16::from_le_bytes([
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    ]));
    let frame = data.get(2..).unwrap_or(&[]);
    if let Ok(out) = delta::decompress_full(frame, signed) {
        assert_eq!(out.len() as u64, signed);
    }
});
