//! The `outpostctl` operator CLI.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("outpostctl: no command yet")
}
