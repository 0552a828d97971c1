//! The `portico` binary: parses the command line, installs the rustls ring provider and hands
//! over to `app`; owns the process's global allocator (jemalloc, configured in
//! `.cargo/config.toml`).

use std::process::ExitCode;

use clap::Parser;

/// jemalloc instead of glibc malloc: fewer instructions per allocation on the request path and
/// a smaller resident set after a large translate (docs/benchmarks.md, "Sixth pass").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = portico::config::Cli::parse();
    portico::app::main(cli)
}
