//! `kubectl gpumarket`: see `gpumarket_controller::plugin`. Installed on PATH, kubectl finds it
//! as a plugin.

use clap::Parser;
use gpumarket_controller::plugin::{Cli, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
