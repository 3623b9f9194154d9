//! Device health from `sysinfo`: CPU, memory, process RSS, temperature, data-dir disk.
//!
//! The only part of the monitor that does I/O. [`HealthProbe`] keeps its `sysinfo` state
//! between snapshots and refreshes only what the snapshot reports. CPU usage is measured
//! between two refreshes, so the first snapshot reports the usage since the probe was made.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sysinfo::{
    Components, CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessesToUpdate, RefreshKind, System,
};

/// One reading of the device's health.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    /// Global CPU usage in percent (all cores).
    pub cpu_percent: f32,
    /// Physical memory.
    pub mem_total_bytes: u64,
    /// Physical memory in use.
    pub mem_used_bytes: u64,
    /// Resident set size of this process.
    pub process_rss_bytes: u64,
    /// Hottest component, when the device exposes sensors.
    pub temperature_c: Option<f32>,
    /// Size of the filesystem holding the data directory (0 if unknown).
    pub disk_total_bytes: u64,
    /// Space available to the agent on that filesystem (0 if unknown).
    pub disk_free_bytes: u64,
}

/// Reads [`HealthSnapshot`]s, reusing `sysinfo` state.
pub struct HealthProbe {
    system: System,
    disks: Disks,
    components: Components,
    pid: Option<Pid>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for HealthProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthProbe")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl HealthProbe {
    /// A probe reporting disk space for the filesystem that holds `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let data_dir = data_dir.into();
        let data_dir = std::fs::canonicalize(&data_dir).unwrap_or(data_dir);
        Self {
            system,
            disks: Disks::new_with_refreshed_list_specifics(
                DiskRefreshKind::nothing().with_storage(),
            ),
            components: Components::new_with_refreshed_list(),
            pid: sysinfo::get_current_pid().ok(),
            data_dir,
        }
    }

    /// Refreshes and reads the current health.
    pub fn snapshot(&mut self) -> HealthSnapshot {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let process_rss_bytes = match self.pid {
            Some(pid) => {
                self.system.refresh_processes_specifics(
                    ProcessesToUpdate::Some(&[pid]),
                    false,
                    ProcessRefreshKind::nothing().with_memory(),
                );
                self.system.process(pid).map_or(0, |p| p.memory())
            }
            None => 0,
        };
        self.disks
            .refresh_specifics(false, DiskRefreshKind::nothing().with_storage());
        let (disk_total_bytes, disk_free_bytes) =
            disk_for(&self.disks, &self.data_dir).unwrap_or((0, 0));
        self.components.refresh(false);
        let temperature_c = self
            .components
            .list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .reduce(f32::max);
        HealthSnapshot {
            cpu_percent: self.system.global_cpu_usage(),
            mem_total_bytes: self.system.total_memory(),
            mem_used_bytes: self.system.used_memory(),
            process_rss_bytes,
            temperature_c,
            disk_total_bytes,
            disk_free_bytes,
        }
    }
}

/// (total, available) of the disk with the longest mount point that contains `path`.
fn disk_for(disks: &Disks, path: &Path) -> Option<(u64, u64)> {
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.total_space(), d.available_space()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reports_this_process_and_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HealthProbe::new(dir.path());
        let s = probe.snapshot();
        assert!(s.mem_total_bytes > 0);
        assert!(s.mem_used_bytes <= s.mem_total_bytes);
        assert!(s.process_rss_bytes > 0);
        assert!((0.0..=100.0).contains(&s.cpu_percent) || s.cpu_percent.is_nan());
        assert!(s.disk_free_bytes <= s.disk_total_bytes);
        if let Some(t) = s.temperature_c {
            assert!(t.is_finite());
        }
        let again = probe.snapshot();
        assert_eq!(again.mem_total_bytes, s.mem_total_bytes);
    }
}
