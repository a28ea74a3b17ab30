//! The runtime watch: at every UNet block boundary, move weight pages as the plan says and compare
//! real memory with the prediction; if reality runs ahead, tighten (stream weights, smaller kernel
//! tiles) and say so once.

use std::path::PathBuf;

use super::memory;
use super::plan::{Residency, UNET_PREFIX};
use crate::kernels::scratch;
use crate::weights::TensorStore;

pub struct Watch<'a> {
    store: &'a TensorStore,
    /// Weight prefixes of the UNet blocks in execution order.
    blocks: Vec<String>,
    residency: Residency,
    /// Resident set above this means the prediction was wrong.
    rss_limit_bytes: u64,
    cgroup_file: Option<PathBuf>,
    pub peak_cgroup_bytes: u64,
    notice: Option<String>,
    tightened: bool,
}

impl<'a> Watch<'a> {
    pub fn new(
        store: &'a TensorStore,
        block_names: &[String],
        residency: Residency,
        rss_limit_bytes: u64,
    ) -> Self {
        let blocks = block_names
            .iter()
            .map(|b| format!("{UNET_PREFIX}{b}."))
            .collect();
        Watch {
            store,
            blocks,
            residency,
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

    /// Before the first UNet call: start reading the first block when streaming.
    pub fn start(&self) {
        if self.residency == Residency::Stream {
            if let Some(first) = self.blocks.first() {
                self.store.prefetch(first);
            }
        }
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
            if let Some(smaller) = scratch::current().smaller() {
                scratch::set(smaller);
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
            let prefix = format!("{UNET_PREFIX}{name}.");
            let Some(i) = self.blocks.iter().position(|b| *b == prefix) else {
                return;
            };
            self.store.release(&self.blocks[i]);
            // The next block, wrapping to the first for the next step.
            self.store
                .prefetch(&self.blocks[(i + 1) % self.blocks.len()]);
        }
    }

    /// A one-time message about tightening, taken once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }
}
