//! The runtime watch: at every UNet block boundary, move weight pages as the plan says and compare
//! real memory with the prediction; if reality runs ahead, tighten (stream weights, smaller kernel
//! tiles) and say so once. The watch holds its job's scratch tier: the pipeline reads it for each
//! UNet call, so a tightened tier applies from the next call on.

use std::path::PathBuf;
use std::sync::Arc;

use super::memory;
use super::plan::Residency;
use super::stream::ReadAhead;
use crate::kernels::scratch::Scratch;
use crate::weights::{Reader, TensorStore};

pub struct Watch {
    store: Arc<TensorStore>,
    /// The family's UNet key prefix (`model.diffusion_model.`).
    unet_prefix: String,
    /// Weight prefixes of the UNet blocks in execution order.
    blocks: Vec<String>,
    /// Which blocks to read when, while streaming, and the thread that reads them (started when
    /// streaming starts).
    reads: ReadAhead,
    reader: Option<Reader>,
    residency: Residency,
    /// The kernels' budgets for the next UNet call: the plan's tier until tightened.
    scratch: Scratch,
    /// Resident set above this means the prediction was wrong.
    rss_limit_bytes: u64,
    cgroup_file: Option<PathBuf>,
    pub peak_cgroup_bytes: u64,
    notice: Option<String>,
    tightened: bool,
}

impl Watch {
    pub fn new(
        store: &Arc<TensorStore>,
        unet_prefix: &str,
        block_names: &[String],
        residency: Residency,
        pinned_blocks: &[String],
        scratch: Scratch,
        rss_limit_bytes: u64,
    ) -> Self {
        let blocks: Vec<String> = block_names
            .iter()
            .map(|b| format!("{unet_prefix}{b}."))
            .collect();
        let pinned = block_names
            .iter()
            .map(|b| pinned_blocks.contains(b))
            .collect();
        Watch {
            store: store.clone(),
            unet_prefix: unet_prefix.to_string(),
            blocks,
            reader: None,
            reads: ReadAhead::new(pinned),
            residency,
            scratch,
            rss_limit_bytes,
            cgroup_file: memory::cgroup_usage_file(),
            peak_cgroup_bytes: 0,
            notice: None,
            tightened: false,
        }
    }

    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The scratch tier the next UNet call runs under.
    pub fn scratch(&self) -> Scratch {
        self.scratch
    }

    /// Before the first UNet call: start reading the first blocks when streaming.
    pub fn start(&mut self) {
        if self.residency == Residency::Stream && !self.blocks.is_empty() {
            self.read_ahead(0);
        }
    }

    /// Block `k` is about to run: make sure it and the next streamed block are being read.
    fn read_ahead(&mut self, k: usize) {
        let asked = self.reads.before(k);
        let reader = self.reader();
        for b in asked {
            reader.read(b);
        }
    }

    fn reader(&mut self) -> &Reader {
        self.reader
            .get_or_insert_with(|| Reader::new(self.store.clone(), self.blocks.clone()))
    }

    /// After the UNet block `name` ("input_blocks.3", …) finished.
    pub fn after_block(&mut self, name: &str) {
        if let Some(usage) = self
            .cgroup_file
            .as_deref()
            .and_then(memory::cgroup_usage_bytes)
        {
            self.peak_cgroup_bytes = self.peak_cgroup_bytes.max(usage);
        }
        let rss = memory::rss_bytes().unwrap_or(0);
        if rss > self.rss_limit_bytes && !self.tightened {
            self.tightened = true;
            let mut actions = Vec::new();
            if self.residency != Residency::Stream {
                self.residency = Residency::Stream;
                actions.push("streaming UNet weights");
            }
            if let Some(smaller) = self.scratch.smaller() {
                self.scratch = smaller;
                actions.push("smaller kernel tiles");
            }
            if !actions.is_empty() {
                self.notice = Some(format!(
                    "memory is {} MiB, above the planned {} MiB: {} from now on",
                    rss >> 20,
                    self.rss_limit_bytes >> 20,
                    actions.join(" and ")
                ));
            }
        }
        if self.residency == Residency::Stream {
            let prefix = format!("{}{name}.", self.unet_prefix);
            let Some(i) = self.blocks.iter().position(|b| *b == prefix) else {
                return;
            };
            if self.reads.streamed(i) {
                self.reader().release(i);
                self.reads.released(i);
            }
            // The next block, wrapping to the first for the next step.
            self.read_ahead((i + 1) % self.blocks.len());
        }
    }

    /// A one-time message about tightening, taken once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }
}
