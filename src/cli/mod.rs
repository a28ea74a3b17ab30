//! Command-line front end: argument parsing, dispatch, error lines and exit codes.
//!
//! Thin by design: each subcommand turns its flags into a library request, calls the library, and
//! reports. Flag names follow stable-diffusion.cpp where a flag means the same.

mod batch;
mod generate;
mod inspect;
mod plan;
mod progress;
mod quantize;
mod threads;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use sdcap::family::Prediction;
use sdcap::job::{RngKind, SamplerKind, ScheduleKind, SizeConditioning};
use sdcap::prompt::PromptSyntax;

/// The demo model shipped with the crate: tiny, random weights, so its images are noise.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-sd.safetensors");

#[derive(Debug, Parser)]
#[command(
    name = "sdcap",
    version,
    about = "CPU-only Stable Diffusion runner that stays under its RAM cap",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate one image from a text prompt (txt2img) and write it as PNG.
    Generate(GenerateArgs),
    /// Run a JSON Lines file of jobs into a directory: resumable, shardable, one model load.
    Batch(batch::BatchArgs),
    /// Show the memory plan for a generate command (same flags) without running it: the budget,
    /// each stage's predicted peak and the chosen settings. Exit 3 if nothing fits.
    Plan(PlanArgs),
    /// Convert a model to GGUF with 4- to 8-bit weights (GGML block types).
    Quantize(quantize::QuantizeArgs),
    /// Show a model's format, family, tensor count and bytes per type.
    Inspect(inspect::InspectArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub generate: GenerateArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

// Numeric flags take negative numbers as values, so `-W -512` is reported as a bad width rather than
// as an unknown flag `-5`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: single-file .safetensors checkpoint (LDM layout) or diffusers folder.
    /// Default: the shipped tiny demo model (random weights, the image is noise).
    #[arg(short = 'm', long, value_name = "PATH")]
    pub model: Option<PathBuf>,

    /// Separate VAE file replacing the model's own.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,

    /// The prompt.
    #[arg(short = 'p', long, value_name = "TEXT")]
    pub prompt: String,

    /// The negative prompt. Without one, SDXL's unconditional half is all zeros (as diffusers);
    /// `-n ""` encodes the empty prompt like any other (SD1.x and SD2.x do that either way).
    #[arg(short = 'n', long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,

    /// Image width in pixels (multiple of 8, 64..=2048)
    /// [default: per model family (SD1/SD2 512, SD2-v 768, SDXL 1024)].
    #[arg(short = 'W', long, value_name = "PX", allow_negative_numbers = true)]
    pub width: Option<u32>,

    /// Image height in pixels (multiple of 8, 64..=2048)
    /// [default: per model family (SD1/SD2 512, SD2-v 768, SDXL 1024)].
    #[arg(short = 'H', long, value_name = "PX", allow_negative_numbers = true)]
    pub height: Option<u32>,

    /// Number of sampling steps [default: per model family (20)].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub steps: Option<u32>,

    /// Classifier-free guidance scale; 1 or less runs the UNet on the prompt only
    /// [default: per model family (7)].
    #[arg(long, value_name = "SCALE", allow_negative_numbers = true)]
    pub cfg_scale: Option<f32>,

    #[arg(long, value_name = "NAME", help = names_help("Sampling method [default: per model family (euler_a)]", SamplerKind::NAMES))]
    pub sampling_method: Option<SamplerKind>,

    #[arg(long, value_name = "NAME", help = names_help("Noise schedule [default: per model family (discrete)]", ScheduleKind::NAMES))]
    pub scheduler: Option<ScheduleKind>,

    #[command(flatten)]
    pub family: FamilyArgs,

    /// Seed; a negative value picks a random seed (printed in the summary).
    #[arg(
        short = 's',
        long,
        value_name = "N",
        default_value_t = 42,
        allow_negative_numbers = true
    )]
    pub seed: i64,

    /// Which CLIP layer conditions the UNet: 1 = last, 2 = penultimate (A1111 convention).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub clip_skip: u32,

    #[arg(long, value_name = "NAME", default_value = "cpu", help = names_help("Random number generator (cpu = PyTorch's CPU generator, as diffusers uses it)", RngKind::NAMES))]
    pub rng: RngKind,

    /// How prompts are read: a1111 = emphasis `(a:1.2)` `[a]`, `BREAK`, any length in 75-token
    /// chunks (`<lora:…>` tags are refused: LoRA is not supported yet); plain = the text as it is,
    /// cut after 75 tokens, as diffusers reads it.
    #[arg(long, value_name = "NAME", default_value = "a1111")]
    pub prompt_syntax: PromptSyntax,

    /// RAM cap (512M, 1.5G, 2GiB): the plan keeps the predicted peak under it, or sdcap refuses
    /// with exit code 3 before loading anything [default: the cgroup limit, else available memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_ram_cap)]
    pub ram_cap: Option<u64>,

    /// Compute threads [default: physical cores, at most the CPUs this process may use].
    #[arg(short = 't', long, value_name = "N", value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: Option<usize>,

    /// Where the weight matmuls run: cpu, or cuda (cuBLAS; needs a build with `--features cuda`
    /// and a GPU, else exit 2). The rest of the work stays on the CPU either way.
    #[arg(long, value_name = "NAME", default_value = "cpu")]
    pub backend: sdcap::backend::Backend,

    /// Output PNG; written only once the image is complete, replacing any file there (a link is
    /// followed: the file it points to is replaced; a device, FIFO, socket or directory is
    /// refused). `-` writes the PNG to standard output (a pipe or file, not a terminal).
    #[arg(short = 'o', long, value_name = "PATH", default_value = "output.png")]
    pub output: PathBuf,

    /// Progress display: auto = a bar on a terminal, JSON lines on stderr otherwise.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = progress::ProgressMode::Auto)]
    pub progress: progress::ProgressMode,
}

/// The flags for what only some families read, shared by `generate`, `plan` and `batch`.
#[derive(Debug, Args)]
pub struct FamilyArgs {
    /// What the UNet predicts: eps (noise) or v (velocity, SD2.x 768-v models) [default: the
    /// file's metadata, else the weights (SD2.x), else the family's (eps)].
    #[arg(long, value_name = "TYPE")]
    pub prediction: Option<Prediction>,

    /// SDXL size conditioning: diffusers' `original_size`, WxH [default: the image size].
    #[arg(long, value_name = "WxH", value_parser = parse_original_size)]
    pub original_size: Option<(u32, u32)>,

    /// SDXL crop conditioning: diffusers' `crops_coords_top_left`, TOP,LEFT [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_crop)]
    pub crop_coords: Option<(u32, u32)>,

    /// SDXL size conditioning: diffusers' `target_size`, WxH [default: the image size].
    #[arg(long, value_name = "WxH", value_parser = parse_target_size)]
    pub target_size: Option<(u32, u32)>,
}

impl FamilyArgs {
    /// Sets the job's prediction and size conditioning from these flags (those given).
    pub fn apply(&self, job: &mut sdcap::job::Job) {
        if self.prediction.is_some() {
            job.prediction = self.prediction;
        }
        if self.original_size.is_some() {
            job.size_cond.original = self.original_size;
        }
        if let Some(crop) = self.crop_coords {
            job.size_cond.crop = crop;
        }
        if self.target_size.is_some() {
            job.size_cond.target = self.target_size;
        }
    }
}

fn parse_original_size(s: &str) -> Result<(u32, u32), String> {
    SizeConditioning::parse_size("original-size", s).map_err(|e| e.to_string())
}

fn parse_target_size(s: &str) -> Result<(u32, u32), String> {
    SizeConditioning::parse_size("target-size", s).map_err(|e| e.to_string())
}

fn parse_crop(s: &str) -> Result<(u32, u32), String> {
    SizeConditioning::parse_crop(s).map_err(|e| e.to_string())
}

fn names_help(what: &str, names: &[&str]) -> String {
    format!("{what}: {}", names.join(", "))
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("threads must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a thread count: {e}")),
    }
}

/// Parses the command line, runs the subcommand, and turns the outcome into an exit code.
/// Every failure prints exactly one line: `sdcap: error: <message>`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    quiet_panics();
    // The job boundary: a panic anywhere below (a bug) is one line and exit 1, never a backtrace.
    // A batch also catches each job's own panic, records it and goes on (`batch::runner`).
    let outcome = std::panic::catch_unwind(|| match cli.command {
        Command::Generate(args) => generate::run(args).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => plan::run(args).map(|()| ExitCode::SUCCESS),
        Command::Quantize(args) => quantize::run(args).map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => inspect::run(args).map(|()| ExitCode::SUCCESS),
        Command::Batch(args) => batch::run(args),
    });
    match outcome {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("sdcap: error: {}", one_line(&message(&e)));
            ExitCode::from(exit_code(&e))
        }
        Err(payload) => {
            let msg = sdcap::batch::runner::panic_message(payload.as_ref());
            eprintln!("sdcap: error: internal error: {}", one_line(&msg));
            ExitCode::from(1)
        }
    }
}

/// Replaces the default panic hook, which prints "thread … panicked at …" and a backtrace note on
/// stderr, with one that prints nothing: every panic is caught at a job boundary and reported there
/// as one line. `SDCAP_BACKTRACE=1` (a developer chasing the bug) keeps the default report too;
/// `RUST_BACKTRACE` alone does not, as many shells set it for everything.
fn quiet_panics() {
    let default = std::panic::take_hook();
    let verbose = std::env::var_os("SDCAP_BACKTRACE").is_some_and(|v| v != "0");
    std::panic::set_hook(Box::new(move |info| {
        if verbose {
            default(info);
        }
    }));
}

/// DESIGN.md exit codes: library errors carry their own (2 bad input, 3 RAM cap, 130 interrupted);
/// anything else reaching here is unexpected (1).
fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<sdcap::Error>())
        .map(|e| u8::try_from(e.exit_code()).unwrap_or(1))
        .unwrap_or(1)
}

/// Help and version go to stdout with exit 0 as clap prints them; usage errors become one line and
/// exit 2.
fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            let rendered = e.render().to_string();
            let kept: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("Usage:")
                        && !l.starts_with("For more information")
                })
                .collect();
            let msg = kept.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("sdcap: error: {} (see --help)", one_line(msg));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", as `{:#}` prints them, but a cause that the text
/// already ends with is not repeated: `sdcap::Error::Io` shows its `io::Error` and also names it as
/// its source, which printed "No space left on device (os error 28)" twice.
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// Error messages may quote user text or wrap multi-line causes; the contract is one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_ram_cap(text: &str) -> Result<u64, String> {
    sdcap::governor::parse_size(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_shown_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(28);
        let shown = io.to_string();
        let e = anyhow::Error::new(sdcap::Error::Io {
            path: PathBuf::from("out.png"),
            source: io,
        });
        assert_eq!(format!("{e:#}"), format!("out.png: {shown}: {shown}"));
        assert_eq!(message(&e), format!("out.png: {shown}"));
        let wrapped = anyhow::anyhow!("inner").context("outer");
        assert_eq!(message(&wrapped), "outer: inner");
    }
}
