//! Encode or apply an Outpost model delta between files.
//!
//! ```text
//! cargo run -p outpost-protocol --example delta -- encode --base A --target B --out D [--codec best|zstd-ref|tensor] [--level N]
//! cargo run -p outpost-protocol --example delta -- apply --base A --delta D --out B [--max-len BYTES]
//! ```
//!
//! `encode` prints one line: `codec=<name> delta=<bytes> target=<bytes> full_zstd=<bytes>`
//! (`codec=full` when compressing the target alone is smaller; the delta is written
//! anyway). Exit code 0 on success, 1 on any error, 2 on bad usage.

use outpost_protocol::delta::{self, Best, Codec};
use std::collections::HashMap;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: delta encode --base A --target B --out D [--codec best|zstd-ref|tensor] [--level N]\n       delta apply --base A --delta D --out B [--max-len BYTES]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        return usage();
    };
    if rest.len() % 2 != 0 {
        return usage();
    }
    let opts: HashMap<&str, &str> = rest
        .chunks(2)
        .map(|kv| (kv[0].trim_start_matches("--"), kv[1].as_str()))
        .collect();
    let result = match cmd.as_str() {
        "encode" => encode(&opts),
        "apply" => apply(&opts),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delta: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn opt<'a>(opts: &HashMap<&str, &'a str>, name: &str) -> Result<&'a str, String> {
    opts.get(name)
        .copied()
        .ok_or_else(|| format!("missing --{name}"))
}

fn encode(opts: &HashMap<&str, &str>) -> Res {
    let base = std::fs::read(opt(opts, "base")?)?;
    let target = std::fs::read(opt(opts, "target")?)?;
    let level: i32 = opts
        .get("level")
        .map_or(Ok(delta::DEFAULT_LEVEL), |l| l.parse())?;
    let (name, bytes, full) = match opts.get("codec").copied().unwrap_or("best") {
        "best" => match delta::encode_best(&base, &target)? {
            Best::Delta {
                codec,
                delta,
                full_zstd_len,
            } => (codec.to_string(), delta, full_zstd_len),
            Best::Full {
                codec,
                full_zstd_len,
                ..
            } => (
                "full".to_owned(),
                delta::encode(&base, &target, codec, delta::DEFAULT_LEVEL)?,
                full_zstd_len,
            ),
            other => return Err(format!("unexpected choice {other:?}").into()),
        },
        c => {
            let codec: Codec = c.parse()?;
            (
                codec.to_string(),
                delta::encode(&base, &target, codec, level)?,
                0,
            )
        }
    };
    std::fs::write(opt(opts, "out")?, &bytes)?;
    println!(
        "codec={name} delta={} target={} full_zstd={full}",
        bytes.len(),
        target.len()
    );
    Ok(())
}

fn apply(opts: &HashMap<&str, &str>) -> Res {
    let base = std::fs::read(opt(opts, "base")?)?;
    let d = std::fs::read(opt(opts, "delta")?)?;
    let max: u64 = opts
        .get("max-len")
        .map_or(Ok(delta::MAX_TARGET_LEN), |l| l.parse())?;
    let target = delta::apply(&base, &d, max)?;
    std::fs::write(opt(opts, "out")?, target)?;
    Ok(())
}
