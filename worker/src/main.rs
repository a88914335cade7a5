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
    #[command(flatten)]
    worker: WorkerArgs,
}

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { strata_worker::configure_threads(cli.threads) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(strata_worker::cli::run(
        cli.worker,
        strata_shared::shutdown_signal(),
    ))?;
    Ok(())
}
