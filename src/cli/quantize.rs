//! `sdcap quantize`: flags → `quantize::Request` → a GGUF file, with a progress bar on a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quant::GgmlType;
use sdcap::quantize::{self, Compat, Policy, Request, Summary, MIN_QUANT_VALUES, TARGET_TYPES};

use super::threads::start_pool;

const POLICY_HELP: &str = "\
Which tensors are quantized (default policy):
  Conv and linear weights (`*.weight` with 2 or more dims, at least 4096 values, not an embedding)
  become --type. A conv weight [co, ci, kh, kw] is written as the matrix [co, ci*kh*kw] it is
  multiplied as, so its rows fit the blocks; its shape is kept in the metadata key
  `sdcap.shape.<name>` and restored by sdcap's reader. If the rows do not fit the type's blocks
  (32 values; 256 for k-quants) a k-quant falls back to the legacy type of the same width
  (q4_K -> q4_0, q5_K -> q5_0, q6_K -> q8_0); a weight that still does not fit is written in f16.
  Everything else (norms, biases, token/position embeddings, time_embed.*, tensors under 4096
  values, alphas_cumprod) stays float: f16 if the source is f16 or bf16, f32 if it is f32 (or a
  GGUF block type). Dropped: the other DDPM buffers (betas, posterior_*, ...), CLIP's position_ids,
  EMA bookkeeping, and integer tensors; no network reads them.
  A tensor already in its target type is copied byte for byte.

--compat sdcpp writes what stable-diffusion.cpp's convert writes: a tensor becomes --type unless
  its name ends in .bias or .scale, contains time_embed., label_emb. or embedding, or (block types)
  its last dim is not a whole number of blocks; then it keeps the source type. No reshaping, no
  metadata. Its q4_0 SD1.5 file is mostly f16 (it never quantizes 3x3 or 1x1 convs).

The output is written to a temporary file next to it and renamed into place when complete.";

#[derive(Debug, Args)]
#[command(after_help = POLICY_HELP)]
pub struct QuantizeArgs {
    /// Input model: single-file .safetensors checkpoint (LDM layout), diffusers folder, or GGUF.
    #[arg(short = 'm', long, value_name = "PATH")]
    pub model: PathBuf,

    /// Output GGUF file. Tensor names are the LDM names stable-diffusion.cpp uses.
    #[arg(short = 'o', long, value_name = "PATH")]
    pub output: PathBuf,

    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type, help = type_help())]
    pub ty: GgmlType,

    /// Per-tensor types overriding the policy: "regex=type,..." (regex searched anywhere in the LDM
    /// name; first match wins; any GGML type, e.g. "attn=q8_0,^first_stage_model\.=f16"). A type
    /// whose blocks do not fit a matched tensor's rows is an error.
    #[arg(long, value_name = "RULES")]
    pub tensor_type_rules: Option<String>,

    /// Use stable-diffusion.cpp's error-minimising quantizer (per row, unit importance) instead of
    /// GGML's reference one: lower error for q4_0, q4_1, q5_0, q5_1 and k-quants; slower.
    #[arg(long)]
    pub quality: bool,

    /// Write a file stable-diffusion.cpp loads, with its type choices (see below).
    #[arg(long, value_name = "TOOL")]
    pub compat: Option<CompatArg>,

    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,

    /// Threads [default: physical cores].
    #[arg(short = 't', long, value_name = "N", value_parser = super::parse_threads)]
    pub threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CompatArg {
    /// stable-diffusion.cpp
    Sdcpp,
}

fn type_help() -> String {
    let names: Vec<&str> = TARGET_TYPES.iter().map(|t| t.name()).collect();
    format!(
        "Type of the quantized weights: {} (tensors under {MIN_QUANT_VALUES} values and \
         non-weights stay float)",
        names.join(", ")
    )
}

fn parse_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s)
        .filter(|t| TARGET_TYPES.contains(t))
        .ok_or_else(|| {
            let names: Vec<&str> = TARGET_TYPES.iter().map(|t| t.name()).collect();
            format!("unknown type `{s}` (one of: {})", names.join(", "))
        })
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let rules = match &args.tensor_type_rules {
        Some(text) => quantize::parse_rules(text)?,
        None => Vec::new(),
    };
    let request = Request {
        input: args.model,
        output: args.output,
        policy: Policy {
            ty: args.ty,
            rules,
            compat: args.compat.map(|CompatArg::Sdcpp| Compat::Sdcpp),
        },
        quality: args.quality,
        force: args.force,
    };

    if let Some(notice) = start_pool(args.threads)? {
        eprintln!("sdcap: {notice}");
    }

    // Ctrl-C / SIGTERM stop the run between tensors, so the temporary file is removed.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone())
            .context("cannot install the interrupt handler")?;
    }

    let bar = std::io::stderr().is_terminal().then(new_bar);
    let hold_last = std::env::var_os(HOLD_LAST_TENSOR).is_some();
    let summary = quantize::quantize_model(
        &request,
        &mut |event| {
            if hold_last && event.index + 1 == event.count {
                hold_until_signal(&interrupted);
            }
            if let Some(bar) = &bar {
                bar.set_length(event.values_total);
                bar.set_position(event.values_done);
                bar.set_message(format!(
                    "{}/{} {}",
                    event.index + 1,
                    event.count,
                    event.name
                ));
            }
        },
        &|| interrupted.load(Ordering::Relaxed),
    );
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    eprintln!(
        "sdcap: wrote {} ({}) in {:.1} s",
        request.output.display(),
        describe(&summary),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Test hook (tests/quantize.rs): with this variable set, the run stops inside the last tensor, says
/// so on stderr, and waits there (at most a minute) until a signal arrives, so that a test can send
/// a real SIGINT at exactly that moment.
const HOLD_LAST_TENSOR: &str = "SDCAP_TEST_HOLD_LAST_TENSOR";

fn hold_until_signal(interrupted: &AtomicBool) {
    eprintln!("sdcap: test hook: holding the last tensor until a signal");
    let until = Instant::now() + Duration::from_secs(60);
    while !interrupted.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("quantize [{bar:30}] {percent:>3}% {elapsed} {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `457 tensors: 150 q4_0, 307 f32; 12.4 MiB from 13.2 MiB; 12 dropped`
fn describe(s: &Summary) -> String {
    let types: Vec<String> = s
        .types
        .iter()
        .map(|t| format!("{} {}", t.tensors, t.ty.name()))
        .collect();
    let mut text = format!(
        "{} tensors: {}; {} from {}",
        s.tensors,
        types.join(", "),
        mib(s.output_bytes),
        mib(s.input_bytes)
    );
    if s.flattened > 0 {
        text.push_str(&format!("; {} conv weights flattened", s.flattened));
    }
    if s.dropped > 0 {
        text.push_str(&format!("; {} unused tensors dropped", s.dropped));
    }
    text
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
