//! `strata-worker`: the worker process alone (the image a Kubernetes worker pod runs). The same
//! process is `strata worker` in the all-in-one `strata` command.

use clap::Parser;
use strata_worker::cli::WorkerArgs;

#[derive(Parser)]
#[command(
    name = "strata-worker",
    version,
    about = "Strata worker: runs the layers the gateway assigns"
)]
struct Cli {
    /// Compute threads (default: one per core).
    #[arg(long, env = "STRATA_THREADS")]
    threads: Option<usize>,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text")]
    log_format: strata_shared::telemetry::LogFormat,
    #[command(flatten)]
    worker: WorkerArgs,
}

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { strata_worker::configure_threads(cli.threads) };
    let _telemetry = strata_shared::telemetry::init("strata-worker", cli.log_format, "info")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(strata_worker::cli::run(
        cli.worker,
        strata_shared::shutdown_signal(),
    ))?;
    Ok(())
}
