//! Device targets for `outpostctl devices bundle --target TRIPLE`: which agent binary fits
//! a Linux board (checked from its ELF header, so that a host or wrong-ABI build is never
//! shipped), where `targets/build.sh TRIPLE` leaves it, and the systemd unit that makes
//! the bundle directory installable by copying it.

use std::ffi::OsString;
use std::path::PathBuf;

/// `targets/outpost-agent.service`, with `@INSTALL_DIR@` and `@DATA_DIR@` to fill in.
const UNIT_TEMPLATE: &str = include_str!("../../../../targets/outpost-agent.service");

/// The cross target directory `targets/build.sh` uses when the environment names none.
const DEFAULT_CROSS_TARGET_DIR: &str = "/var/tmp/outpost-cross-target";

/// A Linux device target the agent daemon is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTarget {
    Aarch64LinuxGnu,
    Armv7LinuxGnueabihf,
}

/// Why a target or an agent binary cannot go into a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("unknown device target {triple:?} (Linux device targets: {known})")]
    UnknownTarget { triple: String, known: String },
    #[error(
        "{triple} is an app target: apps link liboutpost (sdk-c); bundles carry the Linux agent daemon"
    )]
    AppTarget { triple: String },
    #[error("the agent binary is not an ELF executable: {reason}")]
    NotElf { reason: &'static str },
    #[error("the agent binary is built for {found}, not for {triple} ({expected})")]
    WrongMachine {
        triple: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{what} {path:?} must be an absolute path without spaces, quotes, '%' or '\\'")]
    UnitPath { what: &'static str, path: String },
}

const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_ARM: u16 = 40;
const EM_AARCH64: u16 = 183;
const EF_ARM_ABI_FLOAT_HARD: u32 = 0x400;
const EF_ARM_EABIMASK: u32 = 0xff00_0000;
const EF_ARM_EABI_VER5: u32 = 0x0500_0000;
/// Bytes of the ELF header this module reads (the 64-bit header's `e_flags` ends at 52).
pub const ELF_HEADER_LEN: usize = 64;

impl DeviceTarget {
    const ALL: [DeviceTarget; 2] = [
        DeviceTarget::Aarch64LinuxGnu,
        DeviceTarget::Armv7LinuxGnueabihf,
    ];

    /// Parses a target triple; Android and iOS are app targets, not bundle targets.
    pub fn parse(triple: &str) -> Result<DeviceTarget, TargetError> {
        if let Some(t) = Self::ALL.into_iter().find(|t| t.triple() == triple) {
            return Ok(t);
        }
        if triple.ends_with("-linux-android") || triple.ends_with("-apple-ios") {
            return Err(TargetError::AppTarget {
                triple: triple.to_owned(),
            });
        }
        Err(TargetError::UnknownTarget {
            triple: triple.to_owned(),
            known: Self::ALL.map(DeviceTarget::triple).join(", "),
        })
    }

    pub fn triple(self) -> &'static str {
        match self {
            DeviceTarget::Aarch64LinuxGnu => "aarch64-unknown-linux-gnu",
            DeviceTarget::Armv7LinuxGnueabihf => "armv7-unknown-linux-gnueabihf",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            DeviceTarget::Aarch64LinuxGnu => "ELF64 little-endian aarch64",
            DeviceTarget::Armv7LinuxGnueabihf => "ELF32 little-endian arm EABI5 hard-float",
        }
    }

    /// Where `targets/build.sh TRIPLE` writes the stripped agent:
    /// `$OUTPOST_CROSS_TARGET_DIR/dist/TRIPLE/outpost-agent`.
    pub fn default_agent_bin(self, cross_target_dir: Option<OsString>) -> PathBuf {
        cross_target_dir
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CROSS_TARGET_DIR))
            .join("dist")
            .join(self.triple())
            .join("outpost-agent")
    }

    /// Checks that `header` (the first bytes of the file, at least [`ELF_HEADER_LEN`] when
    /// the file is that long) is an executable for this target.
    pub fn check_agent_binary(self, header: &[u8]) -> Result<(), TargetError> {
        let elf = Elf::parse(header)?;
        let fits = match self {
            DeviceTarget::Aarch64LinuxGnu => elf.class == ELFCLASS64 && elf.machine == EM_AARCH64,
            DeviceTarget::Armv7LinuxGnueabihf => {
                elf.class == ELFCLASS32
                    && elf.machine == EM_ARM
                    && elf.flags & EF_ARM_EABIMASK == EF_ARM_EABI_VER5
                    && elf.flags & EF_ARM_ABI_FLOAT_HARD != 0
            }
        };
        if fits {
            Ok(())
        } else {
            Err(TargetError::WrongMachine {
                triple: self.triple(),
                expected: self.expected(),
                found: elf.describe(),
            })
        }
    }
}

/// The fields of an ELF header that decide where a binary runs.
struct Elf {
    class: u8,
    machine: u16,
    flags: u32,
}

impl Elf {
    fn parse(b: &[u8]) -> Result<Elf, TargetError> {
        let not_elf = |reason| Err(TargetError::NotElf { reason });
        if b.len() < 20 || b[..4] != *b"\x7fELF" {
            return not_elf("no ELF magic");
        }
        let class = b[4];
        let flags_at = match class {
            ELFCLASS32 => 36,
            ELFCLASS64 => 48,
            _ => return not_elf("unknown ELF class"),
        };
        if b[5] != ELFDATA2LSB {
            return not_elf("not little-endian");
        }
        if b.len() < flags_at + 4 {
            return not_elf("truncated header");
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        if !matches!(u16_at(16), ET_EXEC | ET_DYN) {
            return not_elf("not an executable (ELF type is neither EXEC nor DYN)");
        }
        let flags = u32::from_le_bytes([
            b[flags_at],
            b[flags_at + 1],
            b[flags_at + 2],
            b[flags_at + 3],
        ]);
        Ok(Elf {
            class,
            machine: u16_at(18),
            flags,
        })
    }

    fn describe(&self) -> String {
        let bits = if self.class == ELFCLASS64 { 64 } else { 32 };
        let machine = match self.machine {
            3 => "x86".to_owned(),
            62 => "x86-64".to_owned(),
            EM_ARM => "arm".to_owned(),
            EM_AARCH64 => "aarch64".to_owned(),
            243 => "riscv".to_owned(),
            m => format!("machine {m}"),
        };
        let mut s = format!("ELF{bits} little-endian {machine}");
        if self.machine == EM_ARM {
            s.push_str(&format!(" EABI{}", self.flags >> 24));
            s.push_str(if self.flags & EF_ARM_ABI_FLOAT_HARD != 0 {
                " hard-float"
            } else {
                " soft-float"
            });
        }
        s
    }
}

fn unit_path_ok(p: &str) -> bool {
    p.starts_with('/')
        && !p.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '%' | '\\' | ';')
        })
}

/// The systemd unit for a bundle copied to `install_dir` whose agent keeps its data in
/// `data_dir`.
pub fn systemd_unit(install_dir: &str, data_dir: &str) -> Result<String, TargetError> {
    for (what, path) in [
        ("install directory", install_dir),
        ("data directory", data_dir),
    ] {
        if !unit_path_ok(path) {
            return Err(TargetError::UnitPath {
                what,
                path: path.to_owned(),
            });
        }
    }
    let install_dir = install_dir.trim_end_matches('/');
    let install_dir = if install_dir.is_empty() {
        "/"
    } else {
        install_dir
    };
    Ok(UNIT_TEMPLATE
        .replace("@INSTALL_DIR@", install_dir)
        .replace("@DATA_DIR@", data_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header as linkers write it.
    fn header(class: u8, machine: u16, flags: u32, e_type: u16) -> Vec<u8> {
        let mut h = vec![0u8; ELF_HEADER_LEN];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = ELFDATA2LSB;
        h[6] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        let at = if class == ELFCLASS64 { 48 } else { 36 };
        h[at..at + 4].copy_from_slice(&flags.to_le_bytes());
        h
    }

    const ARMHF: u32 = EF_ARM_EABI_VER5 | EF_ARM_ABI_FLOAT_HARD;

    #[test]
    fn accepts_aarch64_pie_and_armv7_hard_float_binaries() {
        DeviceTarget::Aarch64LinuxGnu
            .check_agent_binary(&header(ELFCLASS64, EM_AARCH64, 0, ET_DYN))
            .unwrap();
        DeviceTarget::Armv7LinuxGnueabihf
            .check_agent_binary(&header(ELFCLASS32, EM_ARM, ARMHF, ET_EXEC))
            .unwrap();
    }

    #[test]
    fn rejects_host_x86_64_binary_for_an_arm_board() {
        let x86 = header(ELFCLASS64, 62, 0, ET_DYN);
        for t in DeviceTarget::ALL {
            match t.check_agent_binary(&x86) {
                Err(TargetError::WrongMachine { found, .. }) => assert!(found.contains("x86-64")),
                other => panic!("{t:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_armv7_binary_for_aarch64_and_the_reverse() {
        let arm = header(ELFCLASS32, EM_ARM, ARMHF, ET_DYN);
        let a64 = header(ELFCLASS64, EM_AARCH64, 0, ET_DYN);
        assert!(
            DeviceTarget::Aarch64LinuxGnu
                .check_agent_binary(&arm)
                .is_err()
        );
        assert!(
            DeviceTarget::Armv7LinuxGnueabihf
                .check_agent_binary(&a64)
                .is_err()
        );
    }

    #[test]
    fn rejects_soft_float_arm_binary_for_gnueabihf_board() {
        let soft = header(ELFCLASS32, EM_ARM, EF_ARM_EABI_VER5, ET_DYN);
        match DeviceTarget::Armv7LinuxGnueabihf.check_agent_binary(&soft) {
            Err(TargetError::WrongMachine { found, .. }) => {
                assert!(found.contains("soft-float"), "{found}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_truncated_non_elf_and_non_executable_files() {
        let good = header(ELFCLASS64, EM_AARCH64, 0, ET_DYN);
        let t = DeviceTarget::Aarch64LinuxGnu;
        for bad in [
            &good[..0],
            &good[..19],
            &good[..50],
            b"#!/bin/sh\nexec true\n".as_slice(),
        ] {
            assert!(matches!(
                t.check_agent_binary(bad),
                Err(TargetError::NotElf { .. })
            ));
        }
        let object = header(ELFCLASS64, EM_AARCH64, 0, 1);
        assert!(matches!(
            t.check_agent_binary(&object),
            Err(TargetError::NotElf { .. })
        ));
        let mut big_endian = good.clone();
        big_endian[5] = 2;
        assert!(matches!(
            t.check_agent_binary(&big_endian),
            Err(TargetError::NotElf { .. })
        ));
    }

    #[test]
    fn running_test_binary_is_not_taken_for_the_other_arm_target() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let fits: Vec<_> = DeviceTarget::ALL
            .into_iter()
            .filter(|t| t.check_agent_binary(&exe[..ELF_HEADER_LEN]).is_ok())
            .map(DeviceTarget::triple)
            .collect();
        let expected: Vec<&str> = match std::env::consts::ARCH {
            "aarch64" => vec!["aarch64-unknown-linux-gnu"],
            "arm" if cfg!(target_abi = "eabihf") => vec!["armv7-unknown-linux-gnueabihf"],
            _ => vec![],
        };
        assert_eq!(fits, expected);
    }

    #[test]
    fn parses_linux_triples_and_refuses_app_and_unknown_targets() {
        for t in DeviceTarget::ALL {
            assert_eq!(DeviceTarget::parse(t.triple()).unwrap(), t);
        }
        assert!(matches!(
            DeviceTarget::parse("aarch64-linux-android"),
            Err(TargetError::AppTarget { .. })
        ));
        assert!(matches!(
            DeviceTarget::parse("aarch64-apple-ios"),
            Err(TargetError::AppTarget { .. })
        ));
        assert!(matches!(
            DeviceTarget::parse("x86_64-unknown-linux-gnu"),
            Err(TargetError::UnknownTarget { .. })
        ));
    }

    #[test]
    fn default_agent_bin_follows_the_cross_target_dir() {
        let t = DeviceTarget::Armv7LinuxGnueabihf;
        assert_eq!(
            t.default_agent_bin(Some("/cache".into())),
            PathBuf::from("/cache/dist/armv7-unknown-linux-gnueabihf/outpost-agent")
        );
        assert_eq!(
            t.default_agent_bin(Some("".into())),
            PathBuf::from(DEFAULT_CROSS_TARGET_DIR)
                .join("dist/armv7-unknown-linux-gnueabihf/outpost-agent")
        );
    }

    #[test]
    fn unit_runs_the_bundled_agent_with_its_config_and_keeps_no_placeholder() {
        let unit = systemd_unit("/opt/outpost/", "/var/lib/outpost").unwrap();
        assert!(!unit.contains('@'), "{unit}");
        assert!(unit.contains(
            "\nExecStart=/opt/outpost/outpost-agent run --config /opt/outpost/agent.toml\n"
        ));
        assert!(unit.contains("\nExecStartPre=/bin/mkdir -p /var/lib/outpost\n"));
        assert!(unit.contains("\nWantedBy=multi-user.target"));
    }

    #[test]
    fn unit_refuses_paths_that_would_inject_directives_or_split_arguments() {
        for (install, data) in [
            ("opt/outpost", "/var/lib/outpost"),
            ("/opt/out post", "/var/lib/outpost"),
            ("/opt/outpost", "/var/lib/outpost\nExecStartPost=/bin/sh"),
            ("/opt/outpost", "/var/lib/%h"),
            ("/opt/outpost", "/var/lib/a;b"),
        ] {
            assert!(
                matches!(
                    systemd_unit(install, data),
                    Err(TargetError::UnitPath { .. })
                ),
                "{install:?} {data:?}"
            );
        }
    }
}
