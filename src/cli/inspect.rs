//! `sdcap inspect`: a model's format, family, and bytes per type, as a table or JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use sdcap::inspect::{self, Report};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model: single-file .safetensors checkpoint, diffusers folder, or GGUF file.
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let report = inspect::inspect(&args.model)?;
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render(&report)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// The table a person reads.
fn render(r: &Report) -> String {
    let mut out = format!("model:   {}\n", r.path.display());
    match &r.gguf {
        Some(g) => out.push_str(&format!(
            "format:  GGUF v{}, {} metadata entries, alignment {}\n",
            g.version, g.metadata_entries, g.alignment
        )),
        None => out.push_str(&format!("format:  {}\n", r.format.name())),
    }
    match &r.unsupported_reason {
        None => out.push_str(&format!("family:  {}\n", r.family)),
        Some(reason) => out.push_str(&format!(
            "family:  {} (not supported: {reason})\n",
            r.family
        )),
    }
    out.push_str(&format!("tensors: {}\n\n", r.tensors));
    out.push_str(&format!("{:<6} {:>8} {:>11}\n", "type", "tensors", "MiB"));
    for t in &r.types {
        out.push_str(&format!(
            "{:<6} {:>8} {:>11.2}\n",
            t.dtype,
            t.tensors,
            mib(t.bytes)
        ));
    }
    out.push_str(&format!(
        "{:<6} {:>8} {:>11.2}\n",
        "total",
        r.tensors,
        mib(r.total_bytes)
    ));
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
