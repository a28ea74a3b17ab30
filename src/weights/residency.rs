//! Page residency of mapped weights: read a block's pages ahead of use, release them after, so
//! what the cgroup charges for weights is the block at work (and those read ahead) rather than the
//! whole model.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::TensorStore;

/// Bytes read between two checks of whether a read is still wanted.
const WANTED_CHECK: usize = 1 << 20;

impl TensorStore {
    /// Bytes of all tensors whose name starts with `prefix`.
    pub fn bytes_with_prefix(&self, prefix: &str) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.name.starts_with(prefix))
            .map(|t| t.len as u64)
            .sum()
    }

    /// Reads these tensors' pages in ahead of use by touching one byte of each page, stopping
    /// early once `wanted` turns false (checked every MiB). The fault path's read-ahead then reads
    /// in large requests and maps each page once. `MADV_WILLNEED` reads at most the device's
    /// read-ahead size per call (one call for a 40 MiB block read 8 MiB here), and advising in
    /// 128 KiB pieces instead cost a streamed f16 run 4.1–4.5 s of system time against 2.5–2.8 s
    /// touching (`benches/CAPS.md`). Blocks while reading, so `Reader` calls it off the compute
    /// threads.
    pub fn prefetch(&self, prefix: &str, wanted: &dyn Fn() -> bool) {
        let page = crate::governor::memory::page_size() as usize;
        for (source, start, end) in self.page_ranges(prefix) {
            let map = &self.sources[source].map;
            for piece in (start..end).step_by(WANTED_CHECK) {
                if !wanted() {
                    return;
                }
                for offset in (piece..end.min(piece + WANTED_CHECK)).step_by(page) {
                    // The read only brings the page in; its value is not used.
                    std::hint::black_box(map[offset]);
                }
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

/// A thread that reads groups of weights ahead (`TensorStore::prefetch`) in the order asked, so
/// the compute threads find their pages read and mapped instead of faulting them in from disk.
/// Dropping it stops and joins it.
pub struct Reader {
    store: Arc<TensorStore>,
    prefixes: Vec<String>,
    /// Whether each group is still wanted: releasing one stops a read of it still under way.
    wanted: Arc<Vec<AtomicBool>>,
    requests: Option<mpsc::Sender<usize>>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// A reader for the tensors under each of `prefixes` (a group each, addressed by index). If no
    /// thread can be started, nothing is read ahead (pages are read when first used) and releasing
    /// still works.
    pub fn new(store: Arc<TensorStore>, prefixes: Vec<String>) -> Self {
        let wanted: Arc<Vec<AtomicBool>> =
            Arc::new(prefixes.iter().map(|_| AtomicBool::new(false)).collect());
        let (requests, queue) = mpsc::channel::<usize>();
        let (store2, prefixes2, wanted2) = (store.clone(), prefixes.clone(), wanted.clone());
        let thread = std::thread::Builder::new()
            .name("sdcap-read-ahead".into())
            .spawn(move || {
                for i in queue {
                    store2.prefetch(&prefixes2[i], &|| wanted2[i].load(Relaxed));
                }
            })
            .ok();
        Reader {
            store,
            prefixes,
            wanted,
            requests: thread.as_ref().map(|_| requests),
            thread,
        }
    }

    /// Starts reading group `i` behind what was asked before.
    pub fn read(&self, i: usize) {
        self.wanted[i].store(true, Relaxed);
        if let Some(requests) = &self.requests {
            // The thread only ends when this sender is dropped, so sending cannot fail.
            let _ = requests.send(i);
        }
    }

    /// Drops group `i`'s pages (`TensorStore::release`), stopping a read of it still under way.
    pub fn release(&self, i: usize) {
        self.wanted[i].store(false, Relaxed);
        self.store.release(&self.prefixes[i]);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        for w in self.wanted.iter() {
            w.store(false, Relaxed);
        }
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
