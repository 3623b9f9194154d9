//! `outpost-tuf-client`: the TUF conformance client-under-test.

fn main() {
    eprintln!("outpost-tuf-client: not built yet");
    std::process::exit(1);
}
