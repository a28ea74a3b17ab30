//! The default `--threads`: one per physical core. SMT siblings share a core's FMA units, so a
//! second thread per core adds contention to GEMM-bound work, not speed.

use std::collections::HashSet;

/// Builds the one global rayon pool: `--threads`, at most the CPUs this process may use, else one
/// thread per physical core. Its workers and the calling thread (which runs the serial parts) flush
/// denormals. Returns the notice to show when `--threads` was cut down. The planner counts the
/// threads of this pool (`rayon::current_num_threads`), so it charges what was started.
pub fn start_pool(threads: Option<usize>) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    let (count, notice) = pool_size(threads, available_cpus());
    sdcap::kernels::compute_pool(count)
        .build_global()
        .context("cannot start the compute thread pool")?;
    sdcap::kernels::flush_denormals();
    Ok(notice)
}

/// The CPUs this process may run on (affinity mask, cgroup CPU quota).
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Threads to start for `--threads` given `available` CPUs: more threads than CPUs only contend
/// (and each costs its stack and scratch), so a request above `available` is cut to it, with a
/// notice.
fn pool_size(requested: Option<usize>, available: usize) -> (usize, Option<String>) {
    match requested {
        None => (default_threads(), None),
        Some(n) if n > available => (
            available,
            Some(format!(
                "--threads {n} is more than the {available} CPUs this process may use; using {available}"
            )),
        ),
        Some(n) => (n, None),
    }
}

/// Physical cores from /proc/cpuinfo, capped by the CPUs this process may actually use (affinity,
/// cgroup quota); `available_parallelism` alone where cpuinfo says nothing usable.
pub fn default_threads() -> usize {
    let available = available_cpus();
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
    fn more_threads_than_cpus_are_cut_with_a_notice() {
        let (n, notice) = pool_size(Some(1000), 4);
        assert_eq!(n, 4);
        assert_eq!(
            notice.as_deref(),
            Some("--threads 1000 is more than the 4 CPUs this process may use; using 4")
        );
        assert_eq!(pool_size(Some(4), 4), (4, None));
        assert_eq!(pool_size(Some(3), 4), (3, None));
        assert_eq!(pool_size(None, 4).1, None);
    }

    #[test]
    fn default_is_at_least_one() {
        assert!(default_threads() >= 1);
    }
}
