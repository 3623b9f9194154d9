//! The `outpost-server` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("outpost-server: no command yet")
}
