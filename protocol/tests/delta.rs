//! Round-trip properties of `outpost_protocol::delta` and its typed rejections, over
//! random byte strings and synthetic ONNX-like models with perturbed float tensors.

use outpost_protocol::delta::{self, Best, Codec, DeltaError, Header};
use proptest::prelude::*;

/// Minimal protobuf writer for ONNX-shaped test models.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn varint_field(out: &mut Vec<u8>, number: u64, v: u64) {
    put_varint(out, number << 3);
    put_varint(out, v);
}

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// TensorProto with float data, as `raw_data` or as packed `float_data`.
fn tensor(name: &str, values: &[f32], packed: bool) -> Vec<u8> {
    let mut t = Vec::new();
    varint_field(&mut t, 1, values.len() as u64);
    varint_field(&mut t, 2, 1);
    field(&mut t, 8, name.as_bytes());
    field(&mut t, if packed { 4 } else { 9 }, &floats(values));
    t
}

/// ModelProto: initializers, a Constant node, and an If node whose then-branch holds a
/// tensor, like exporters write them.
fn model(init: &[Vec<f32>], constant: &[f32], inner: &[f32]) -> Vec<u8> {
    let mut g = Vec::new();
    let mut attr = Vec::new();
    field(&mut attr, 1, b"value");
    field(&mut attr, 5, &tensor("const", constant, true));
    let mut node = Vec::new();
    field(&mut node, 4, b"Constant");
    field(&mut node, 5, &attr);
    field(&mut g, 1, &node);

    let mut sub = Vec::new();
    field(&mut sub, 5, &tensor("inner", inner, false));
    let mut attr = Vec::new();
    field(&mut attr, 1, b"then_branch");
    field(&mut attr, 6, &sub);
    let mut node = Vec::new();
    field(&mut node, 4, b"If");
    field(&mut node, 5, &attr);
    field(&mut g, 1, &node);

    for (i, values) in init.iter().enumerate() {
        field(&mut g, 5, &tensor(&format!("w{i}"), values, false));
    }
    let mut m = Vec::new();
    varint_field(&mut m, 1, 8);
    field(&mut m, 7, &g);
    m
}

fn perturb(v: &[f32], scale: f32, seed: u32) -> Vec<f32> {
    let mut x = seed | 1;
    v.iter()
        .map(|a| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            a + (x as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

fn weights(n: usize, seed: u32) -> Vec<f32> {
    perturb(&vec![0.0; n], 0.2, seed)
}

fn round_trips(base: &[u8], target: &[u8]) -> Result<(), TestCaseError> {
    for codec in Codec::ALL {
        let d = delta::encode(base, target, codec, 3)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let out = delta::apply(base, &d, target.len() as u64)
            .map_err(|e| TestCaseError::fail(format!("{codec}: {e}")))?;
        prop_assert_eq!(&out, target, "{}", codec);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_bytes_round_trip(base in proptest::collection::vec(any::<u8>(), 0..2048),
                               target in proptest::collection::vec(any::<u8>(), 0..2048)) {
        round_trips(&base, &target)?;
    }

    #[test]
    fn edited_bytes_round_trip(base in proptest::collection::vec(any::<u8>(), 1..4096),
                               edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..32)) {
        let mut target = base.clone();
        for (at, b) in edits {
            let i = at % target.len();
            target[i] = b;
        }
        round_trips(&base, &target)?;
    }

    #[test]
    fn perturbed_onnx_models_round_trip(n in 16usize..600, seed in any::<u32>(),
                                        scale in prop_oneof![Just(0.0f32), Just(1e-6), Just(1e-3), Just(0.5)],
                                        changed in proptest::collection::vec(any::<bool>(), 3),
                                        resize in any::<bool>()) {
        let init: Vec<Vec<f32>> = (0..3).map(|i| weights(n + i, seed.wrapping_add(i as u32))).collect();
        let constant = weights(20, seed ^ 0x55);
        let inner = weights(40, seed ^ 0xaa);
        let base = model(&init, &constant, &inner);
        let tuned: Vec<Vec<f32>> = init.iter().zip(&changed).enumerate().map(|(i, (w, &c))| {
            if c { perturb(w, scale, seed.wrapping_mul(7).wrapping_add(i as u32)) } else { w.clone() }
        }).collect();
        let mut tuned = tuned;
        if resize {
            tuned[1].push(1.5);
        }
        let target = model(&tuned, &perturb(&constant, scale, 3), &perturb(&inner, scale, 4));
        round_trips(&base, &target)?;
    }
}

fn fine_tune_pair() -> (Vec<u8>, Vec<u8>) {
    let init: Vec<Vec<f32>> = (0..3).map(|i| weights(3000, i)).collect();
    let base = model(&init, &weights(20, 9), &weights(40, 10));
    let tuned: Vec<Vec<f32>> = init.iter().map(|w| perturb(w, 1e-4, 5)).collect();
    let target = model(&tuned, &weights(20, 9), &weights(40, 10));
    (base, target)
}

#[test]
fn tensor_codec_wins_on_fine_tuned_models() {
    let (base, target) = fine_tune_pair();
    match delta::encode_best(&base, &target).unwrap() {
        Best::Delta {
            codec,
            delta,
            full_zstd_len,
        } => {
            assert_eq!(codec, Codec::Tensor);
            // ~14 of 23 mantissa bits change: about 55% of the full size is the floor.
            assert!(
                delta.len() * 10 < full_zstd_len * 7,
                "{} vs full {full_zstd_len}",
                delta.len()
            );
            let zref = delta::encode(&base, &target, Codec::ZstdRef, 19).unwrap();
            assert!(
                delta.len() * 10 < zref.len() * 7,
                "{} vs zstd-ref {}",
                delta.len(),
                zref.len()
            );
            assert_eq!(delta::apply(&base, &delta, u64::MAX).unwrap(), target);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
}

#[test]
fn rejects_truncated_delta() {
    let (base, target) = fine_tune_pair();
    for codec in Codec::ALL {
        let d = delta::encode(&base, &target, codec, 3).unwrap();
        let err = delta::apply(&base, &d[..d.len() - 1], u64::MAX).unwrap_err();
        assert!(
            matches!(err, DeltaError::Truncated | DeltaError::Corrupt(_)),
            "{codec}: {err:?}"
        );
        assert!(matches!(
            delta::apply(&base, &d[..Header::LEN - 5], u64::MAX),
            Err(DeltaError::Truncated)
        ));
    }
}

#[test]
fn rejects_delta_for_another_base() {
    let (base, target) = fine_tune_pair();
    let (other, _) = {
        let init: Vec<Vec<f32>> = (0..3).map(|i| weights(3000, i + 100)).collect();
        (model(&init, &weights(20, 9), &weights(40, 10)), ())
    };
    for codec in Codec::ALL {
        let d = delta::encode(&base, &target, codec, 3).unwrap();
        assert!(matches!(
            delta::apply(&other, &d, u64::MAX),
            Err(DeltaError::BaseMismatch { .. })
        ));
        assert_eq!(delta::apply(&base, &d, u64::MAX).unwrap(), target);
    }
}

#[test]
fn rejects_flipped_byte_in_payload() {
    let (base, target) = fine_tune_pair();
    for codec in Codec::ALL {
        let d = delta::encode(&base, &target, codec, 3).unwrap();
        let mut errors = 0;
        let positions: Vec<usize> = (Header::LEN..d.len()).step_by(13).collect();
        for &i in &positions {
            let mut bad = d.clone();
            bad[i] ^= 0x10;
            match delta::apply(&base, &bad, u64::MAX) {
                Ok(out) => assert_eq!(out, target, "{codec}: flip at {i} gave other bytes"),
                Err(
                    DeltaError::TargetHashMismatch { .. }
                    | DeltaError::Corrupt(_)
                    | DeltaError::Truncated
                    | DeltaError::TooLarge { .. },
                ) => errors += 1,
                Err(e) => panic!("{codec}: flip at {i}: unexpected {e:?}"),
            }
        }
        assert!(
            errors * 10 >= positions.len() * 9,
            "{codec}: only {errors}/{} flips detected",
            positions.len()
        );
    }
}

#[test]
fn rejects_header_pointing_at_different_target() {
    let (base, target) = fine_tune_pair();
    let d = delta::encode(&base, &target, Codec::Tensor, 3).unwrap();
    let mut h = Header::parse(&d).unwrap();
    h.target_len += 1;
    let mut bad = h.to_bytes().to_vec();
    bad.extend_from_slice(&d[Header::LEN..]);
    assert!(matches!(
        delta::apply(&base, &bad, u64::MAX),
        Err(DeltaError::Corrupt(_))
    ));
}
