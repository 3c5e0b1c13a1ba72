use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = tpserve::cli::Cli::parse();
    match tpserve::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
