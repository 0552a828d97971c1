//! The `portico` binary: parses the command line, installs the rustls ring provider and hands
//! over to `app`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = portico::config::Cli::parse();
    portico::app::main(cli)
}
