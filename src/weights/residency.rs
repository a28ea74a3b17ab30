//! Page residency of mapped weights: prefetch a block's pages before use, release them after, so
//! what the cgroup charges for weights is the block at work rather than the whole model.

use std::fs::File;
use std::os::fd::AsRawFd;

use super::TensorStore;

impl TensorStore {
    /// Bytes of all tensors whose name starts with `prefix`.
    pub fn bytes_with_prefix(&self, prefix: &str) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.name.starts_with(prefix))
            .map(|t| t.len as u64)
            .sum()
    }

    /// Asks the kernel to start reading these tensors' pages now (`MADV_WILLNEED`), so disk reads
    /// overlap the compute that comes before their use.
    pub fn prefetch(&self, prefix: &str) {
        for (source, start, end) in self.page_ranges(prefix) {
            let map = &self.sources[source].map;
            // SAFETY: the range lies inside the mapping (built from tensor ranges, page-aligned
            // inward of the mapping's own bounds); WILLNEED has no effect on contents.
            unsafe {
                libc::madvise(
                    map.as_ptr().add(start) as *mut libc::c_void,
                    end - start,
                    libc::MADV_WILLNEED,
                );
            }
        }
    }

    /// Drops these tensors' pages from this process (`MADV_DONTNEED`) and from the page cache
    /// (`POSIX_FADV_DONTNEED`), so the cgroup stops being charged for them. A later use reads them
    /// again from disk.
    pub fn release(&self, prefix: &str) {
        for (source, start, end) in self.page_ranges(prefix) {
            let src = &self.sources[source];
            // SAFETY: as in `prefetch`; the mapping is read-only and file-backed, so DONTNEED only
            // unmaps pages, which fault back in from the file on the next read.
            unsafe {
                libc::madvise(
                    src.map.as_ptr().add(start) as *mut libc::c_void,
                    end - start,
                    libc::MADV_DONTNEED,
                );
            }
            if let Ok(file) = File::open(&src.path) {
                // SAFETY: a plain advisory call on a file descriptor we own for its duration.
                unsafe {
                    libc::posix_fadvise(
                        file.as_raw_fd(),
                        start as libc::off_t,
                        (end - start) as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    );
                }
            }
        }
    }

    /// Page-aligned, merged (source, start, end) byte ranges of the tensors under `prefix`.
    fn page_ranges(&self, prefix: &str) -> Vec<(usize, usize, usize)> {
        let page = crate::governor::memory::page_size() as usize;
        let mut ranges: Vec<(usize, usize, usize)> = self
            .tensors
            .iter()
            .filter(|t| t.name.starts_with(prefix) && t.len > 0)
            .map(|t| {
                let map_len = self.sources[t.source].map.len();
                let start = t.start / page * page;
                let end = (t.start + t.len)
                    .div_ceil(page)
                    .saturating_mul(page)
                    .min(map_len);
                (t.source, start, end)
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize, usize)> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.0 == r.0 && r.1 <= last.2 => last.2 = last.2.max(r.2),
                _ => merged.push(r),
            }
        }
        merged
    }
}
