//! `strata`: the one command line of Strata.
//!
//! `strata serve` starts the gateway and one worker process per device of the topology;
//! `strata gateway` serves with workers started elsewhere (`strata worker` on each host);
//! `strata plan`, `generate`, `perplexity` and `bench` run single-process tools;
//! `strata fetch-model` caches the default model.
//!
//! This binary is the composition root: it links the gateway and the worker libraries, which
//! never depend on each other.

mod bench;
mod commands;
mod load;
mod local;

use clap::Parser;

#[allow(unsafe_code)]
fn main() -> std::process::ExitCode {
    let cli = commands::Cli::parse();
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { strata_worker::configure_threads(cli.threads) };
    // Flushes the trace exporter when it goes, at the end of `main`.
    let _telemetry = match strata_shared::telemetry::init(
        cli.service_name(),
        cli.log_format,
        cli.default_log_filter(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Settings the workers read from the environment, checked before anything starts.
    let checked = strata_worker::ActivationPolicy::from_env()
        .map(drop)
        .and_then(|()| strata_worker::kv::KvDtype::from_env().map(drop));
    if let Err(e) = checked {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
