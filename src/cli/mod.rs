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
use sdcap::request::Request;

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

/// `generate`'s flags: the request, and what only a single run has.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub request: Request,

    /// Compute threads [default: physical cores, at most the CPUs this process may use].
    #[arg(short = 't', long, value_name = "N", value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: Option<usize>,

    /// Output PNG; written only once the image is complete, replacing any file there (a link is
    /// followed: the file it points to is replaced; a device, FIFO, socket or directory is
    /// refused). `-` writes the PNG to standard output (a pipe or file, not a terminal).
    #[arg(short = 'o', long, value_name = "PATH", default_value = "output.png")]
    pub output: PathBuf,

    /// Progress display: auto = a bar on a terminal, JSON lines on stderr otherwise.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = progress::ProgressMode::Auto)]
    pub progress: progress::ProgressMode,
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
