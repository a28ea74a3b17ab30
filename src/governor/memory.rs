//! What the kernel says we use: resident set (/proc/self/statm, /proc/self/status) and the cgroup's
//! charge (anonymous memory plus page cache, what its OOM killer looks at).

use std::path::{Path, PathBuf};

use super::budget::{own_cgroup, CgroupDir};

/// Current resident set size in bytes.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size())
}

/// Peak resident set size so far (`VmHWM`) in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:")
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let kib: u64 = l
            .strip_prefix(key)?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    })
}

/// The kernel's page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// The file holding this process's cgroup memory charge (v1 `memory.usage_in_bytes`, v2
/// `memory.current`), if there is one.
pub fn cgroup_usage_file() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let file = match own_cgroup(&cgroup, Path::new("/sys/fs/cgroup"))? {
        CgroupDir::V1(dir) => dir.join("memory.usage_in_bytes"),
        CgroupDir::V2 { dir, .. } => dir.join("memory.current"),
    };
    file.exists().then_some(file)
}

/// Current cgroup charge in bytes.
pub fn cgroup_usage_bytes(file: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Returns freed heap memory to the operating system (glibc keeps freed blocks otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        let rss = rss_bytes().unwrap();
        let peak = peak_rss_bytes().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        assert!(peak >= rss / 2, "{peak} vs {rss}");
    }
}
