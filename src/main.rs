//! The `sdcap` binary: see `src/cli/` for the flags and README.md for how to run it.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
