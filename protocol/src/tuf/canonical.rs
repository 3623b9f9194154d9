//! Canonical JSON, as securesystemslib's `encode_canonical` writes it (OLPC canonical
//! JSON): object keys sorted by code point, no insignificant whitespace, strings with only
//! `\` and `"` escaped (every other character, control characters included, is written
//! as-is in UTF-8), integers in plain decimal.
//!
//! Signatures are computed over these bytes of the `signed` object exactly as it was
//! received, as a generic JSON value, so fields this crate does not know are covered too.
//!
//! Floats: securesystemslib refuses them. Outpost's release metadata (the `custom` field
//! of a model target) carries floats (histograms, tolerances), so this encoder accepts
//! finite floats and writes them as serde_json does (shortest representation that
//! round-trips, e.g. `0.25`, `1.0`, `1e-7`). Metadata without floats encodes byte for
//! byte as securesystemslib does; metadata with floats can only be signed and verified by
//! Outpost. See `docs/protocol-trust.md`.

use serde_json::Value;

/// Why a value has no canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// A number that is neither an integer nor a finite float.
    #[error("number {0} has no canonical JSON encoding")]
    BadNumber(String),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("JSON nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Deepest nesting the encoder accepts (serde_json's parser stops at 128 as well).
pub const MAX_DEPTH: usize = 128;

/// Encodes `value` as canonical JSON bytes.
pub fn to_canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out, 0)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), CanonicalError> {
    if depth > MAX_DEPTH {
        return Err(CanonicalError::TooDeep);
    }
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() => out.extend_from_slice(n.to_string().as_bytes()),
                    _ => return Err(CanonicalError::BadNumber(n.to_string())),
                }
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Sorted explicitly: serde_json's map keeps insertion order when some crate in
            // the build enables `preserve_order`. UTF-8 byte order is code point order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_value(v, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'\\' || b == b'"' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn canon(v: &Value) -> String {
        String::from_utf8(to_canonical_json(v).unwrap()).unwrap()
    }

    #[test]
    fn matches_securesystemslib_encoding() {
        // Expected strings as securesystemslib.formats.encode_canonical writes them.
        let v = json!({"b": [1, -2, true, null], "a": "q\"uo\\te\nnl", "é": {}, "A": 0});
        assert_eq!(
            canon(&v),
            "{\"A\":0,\"a\":\"q\\\"uo\\\\te\nnl\",\"b\":[1,-2,true,null],\"é\":{}}"
        );
        assert_eq!(canon(&json!(u64::MAX)), u64::MAX.to_string());
        assert_eq!(canon(&json!(i64::MIN)), i64::MIN.to_string());
    }

    #[test]
    fn floats_use_shortest_round_trip_form() {
        assert_eq!(canon(&json!([0.25, 1.0, 1e-7])), "[0.25,1.0,1e-7]");
    }

    #[test]
    fn rejects_excessive_nesting() {
        let mut v = json!(1);
        for _ in 0..=MAX_DEPTH {
            v = json!([v]);
        }
        assert_eq!(to_canonical_json(&v), Err(CanonicalError::TooDeep));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|u| json!(u)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_bytes_parse_back_to_the_same_value(v in arb_json()) {
            let bytes = to_canonical_json(&v).unwrap();
            let back: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(to_canonical_json(&back).unwrap(), bytes);
        }

        #[test]
        fn serialized_documents_canonicalize_like_the_signer_saw_them(v in arb_json()) {
            // What a verifier computes from the wire must equal what the signer signed.
            let wire = serde_json::to_vec_pretty(&v).unwrap();
            let parsed: Value = serde_json::from_slice(&wire).unwrap();
            prop_assert_eq!(to_canonical_json(&parsed).unwrap(), to_canonical_json(&v).unwrap());
        }
    }
}
