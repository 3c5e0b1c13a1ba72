use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = tpserve::cli::Cli::parse();
    match tpserve::cli::run(cli) {
        Ok(()) => {
            #[cfg(feature = "mpi")]
            tpserve::comm::mpi::finalize();
            ExitCode::SUCCESS
        }
        Err(e) => {
            #[cfg(feature = "mpi")]
            tpserve::comm::mpi::abort_job_on_error(&format!("{e:#}"));
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
