//! How much memory this run may use: `--ram-cap`, else the cgroup limit, else `MemAvailable`,
//! minus a safety margin.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;

/// Where the limit came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// `--ram-cap`.
    Flag,
    /// The process's memory cgroup (v2 `memory.max` / v1 `memory.limit_in_bytes`, ancestors included).
    Cgroup,
    /// `MemAvailable` in /proc/meminfo: no cap was set anywhere.
    MemAvailable,
}

impl fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetSource::Flag => "--ram-cap",
            BudgetSource::Cgroup => "cgroup limit",
            BudgetSource::MemAvailable => "MemAvailable",
        })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Budget {
    pub limit_bytes: u64,
    pub source: BudgetSource,
    /// Kept free for what the plan does not model: the binary and its libraries, thread stacks,
    /// allocator slack, the kernel's own charges to the cgroup.
    pub margin_bytes: u64,
    /// Host memory the compute backend's libraries take for the whole run, outside every stage
    /// (`backend::host_bytes`: the CUDA driver and cuBLAS with `--backend cuda`, else 0).
    pub backend_bytes: u64,
}

impl Budget {
    /// Bytes the plan may fill.
    pub fn usable_bytes(&self) -> u64 {
        self.limit_bytes
            .saturating_sub(self.margin_bytes)
            .saturating_sub(self.backend_bytes)
    }

    /// Learns the budget: the flag if given, else the tightest cgroup limit, else MemAvailable.
    pub fn discover(cap: Option<u64>) -> Result<Budget> {
        let (limit_bytes, source) = match cap {
            Some(bytes) => (bytes, BudgetSource::Flag),
            None => match cgroup_limit() {
                Some(bytes) => (bytes, BudgetSource::Cgroup),
                None => (
                    mem_available().unwrap_or(u64::MAX),
                    BudgetSource::MemAvailable,
                ),
            },
        };
        Ok(Budget {
            limit_bytes,
            source,
            margin_bytes: margin_for(limit_bytes),
            backend_bytes: crate::backend::host_bytes(),
        })
    }
}

/// 24 MiB fixed (the binary, libraries, stacks of two threads) plus 5% of the limit (allocator and
/// page-cache slack), capped at 256 MiB on big machines.
pub fn margin_for(limit_bytes: u64) -> u64 {
    (24 * MIB).saturating_add((limit_bytes / 20).min(256 * MIB))
}

/// Parses `512M`, `1.5G`, `2GiB`, `800MB`, `1073741824` (binary units: 1K = 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || {
        Error::BadRequest(format!(
            "cannot read size `{text}` (examples: 512M, 1.5G, 2GiB, 800MiB)"
        ))
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// The effective memory limit of this process's cgroup, None if unlimited or unknown.
pub fn cgroup_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit_from(&cgroup, Path::new("/sys/fs/cgroup"))
}

/// As `cgroup_limit`, reading `/proc/self/cgroup` text and a cgroup filesystem root (for tests).
pub fn cgroup_limit_from(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let limit = match own_cgroup(proc_cgroup, root)? {
        // v1: `hierarchical_memory_limit` already includes the ancestors' limits.
        CgroupDir::V1(dir) => {
            let stat = std::fs::read_to_string(dir.join("memory.stat")).ok();
            let hierarchical = stat
                .as_deref()
                .and_then(|s| stat_value(s, "hierarchical_memory_limit"));
            let own = read_number(&dir.join("memory.limit_in_bytes"));
            [hierarchical, own].into_iter().flatten().min()
        }
        // v2: walk from our cgroup up to the root; the tightest `memory.max` wins.
        CgroupDir::V2 { base, mut dir } => {
            let mut tightest: Option<u64> = None;
            while dir.starts_with(&base) {
                if let Some(v) = read_number(&dir.join("memory.max")) {
                    tightest = Some(tightest.map_or(v, |t| t.min(v)));
                }
                if !dir.pop() {
                    break;
                }
            }
            tightest
        }
    };
    limit.filter(|&v| !is_unlimited(v))
}

/// This process's memory cgroup directory.
pub(crate) enum CgroupDir {
    /// v1: the memory controller's own hierarchy.
    V1(PathBuf),
    /// v2: `dir` inside the unified hierarchy mounted at `base`.
    V2 { base: PathBuf, dir: PathBuf },
}

/// Finds it from `/proc/self/cgroup` text under a cgroup filesystem root (`/sys/fs/cgroup`).
pub(crate) fn own_cgroup(proc_cgroup: &str, root: &Path) -> Option<CgroupDir> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let dir = root.join("memory").join(path.trim_start_matches('/'));
            return Some(CgroupDir::V1(dir));
        }
    }
    let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let base = [root.join("unified"), root.to_path_buf()]
        .into_iter()
        .find(|r| r.join("cgroup.controllers").exists())?;
    let dir = base.join(path.trim_start_matches('/'));
    Some(CgroupDir::V2 { base, dir })
}

/// v1 reports "no limit" as a huge page-aligned number near i64::MAX.
fn is_unlimited(v: u64) -> bool {
    v >= 1 << 60
}

/// A number from a one-value cgroup file (`max` = none).
fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `MemAvailable` from /proc/meminfo in bytes.
pub fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("800mb").unwrap(), 800 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in [
            "",
            "M",
            "-1G",
            "1.2.3G",
            "12X",
            "0",
            "nanG",
            "1e400G",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cgroup_v1_and_v2_limits_are_found_with_ancestors() {
        let root = std::env::temp_dir().join(format!("sdcap-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v1: the own limit is unlimited, an ancestor's 1 GiB shows in hierarchical_memory_limit.
        let v1 = root.join("v1/memory/a/b");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(
            v1.join("memory.stat"),
            "cache 0\nhierarchical_memory_limit 1073741824\n",
        )
        .unwrap();
        assert_eq!(
            cgroup_limit_from("4:memory:/a/b\n0::/\n", &root.join("v1")),
            Some(1 << 30)
        );
        // v2: the parent is tighter than the child.
        let v2 = root.join("v2");
        std::fs::create_dir_all(v2.join("p/c")).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "memory\n").unwrap();
        std::fs::write(v2.join("p/memory.max"), "536870912\n").unwrap();
        std::fs::write(v2.join("p/c/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit_from("0::/p/c\n", &v2), Some(512 << 20));
        // No limit anywhere.
        std::fs::write(v2.join("p/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit_from("0::/p/c\n", &v2), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn margin_is_sane() {
        assert_eq!(margin_for(512 << 20), (24 << 20) + (512 << 20) / 20);
        assert_eq!(margin_for(u64::MAX), (24 << 20) + (256 << 20));
        let b = Budget {
            limit_bytes: 10,
            source: BudgetSource::Flag,
            margin_bytes: 100,
            backend_bytes: 0,
        };
        assert_eq!(b.usable_bytes(), 0);
        // The backend's libraries come off the top, like the margin.
        let b = Budget {
            limit_bytes: 1 << 30,
            source: BudgetSource::Flag,
            margin_bytes: 100 << 20,
            backend_bytes: 420 << 20,
        };
        assert_eq!(b.usable_bytes(), 504 << 20);
    }
}
