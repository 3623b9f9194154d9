//! The `outpost-agent` binary.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("outpost-agent: no command yet")
}
