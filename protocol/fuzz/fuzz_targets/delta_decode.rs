//! Fuzz `delta::apply` with arbitrary delta bytes against a fixed base, and with the
//! header rewritten to match the base so that the codec payload decoders are reached.
//! Invariant: no panic, no allocation beyond the cap, and any `Ok` output hashes to the
//! header's target hash and respects the length limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::delta::{self, Codec, Header};

const MAX: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let base: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    check(&base, data);
    // Same bytes as a payload behind a valid header for each codec.
    for codec in Codec::ALL {
        let mut header = Header::new(codec, &base, &[]);
        header.target_len = u64::from(data.first().copied().unwrap_or(0)) * 64;
        let mut d = header.to_bytes().to_vec();
        d.extend_from_slice(data);
        check(&base, &d);
    }
});

fn check(base: &[u8], d: &[u8]) {
    if let Ok(out) = delta::apply(base, d, MAX) {
        let h = Header::parse(d).expect("apply accepted an unparsable header");
        assert!(out.len() as u64 <= MAX);
        assert_eq!(delta::sha256(&out), h.target_sha256);
    }
}
