//! The `probunet` command line; `src/cli` holds each subcommand's flags and output.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let prefix = if cli::is_interruption(&err) {
                ""
            } else {
                "error: "
            };
            eprintln!("{prefix}{}", cli::describe(&err));
            cli::exit_code(&err)
        }
    }
}
