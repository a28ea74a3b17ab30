//! The default `--threads`: one per physical core. SMT siblings share a core's FMA units, so a
//! second thread per core adds contention to GEMM-bound work, not speed.

use std::collections::HashSet;

/// Builds the one global rayon pool: `--threads`, else one thread per physical core. Its workers
/// and the calling thread (which runs the serial parts) flush denormals.
pub fn start_pool(threads: Option<usize>) -> anyhow::Result<()> {
    use anyhow::Context;
    sdcap::kernels::compute_pool(threads.unwrap_or_else(default_threads))
        .build_global()
        .context("cannot start the compute thread pool")?;
    sdcap::kernels::flush_denormals();
    Ok(())
}

/// Physical cores from /proc/cpuinfo, capped by the CPUs this process may actually use (affinity,
/// cgroup quota); `available_parallelism` alone where cpuinfo says nothing usable.
pub fn default_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let physical = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| physical_cores(&text));
    physical.map_or(available, |p| p.min(available)).max(1)
}

/// Counts distinct (`physical id`, `core id`) pairs; None when the file lists none (some VMs and
/// non-x86 kernels omit them).
fn physical_cores(cpuinfo: &str) -> Option<usize> {
    let mut cores = HashSet::new();
    for block in cpuinfo.split("\n\n") {
        let mut package = None;
        let mut core = None;
        for line in block.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "physical id" => package = Some(value.trim().to_string()),
                "core id" => core = Some(value.trim().to_string()),
                _ => {}
            }
        }
        if let (Some(p), Some(c)) = (package, core) {
            cores.insert((p, c));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(package: u32, core: u32) -> String {
        format!("processor\t: 0\nphysical id\t: {package}\ncore id\t\t: {core}\nflags\t\t: fpu\n\n")
    }

    #[test]
    fn smt_siblings_count_once() {
        let text = [cpu(0, 0), cpu(0, 1), cpu(0, 0), cpu(0, 1)].concat();
        assert_eq!(physical_cores(&text), Some(2));
    }

    #[test]
    fn same_core_id_on_two_packages_counts_twice() {
        let text = [cpu(0, 0), cpu(1, 0)].concat();
        assert_eq!(physical_cores(&text), Some(2));
    }

    #[test]
    fn no_topology_lines_means_unknown() {
        assert_eq!(physical_cores("processor\t: 0\nmodel name\t: x\n\n"), None);
    }

    #[test]
    fn default_is_at_least_one() {
        assert!(default_threads() >= 1);
    }
}
