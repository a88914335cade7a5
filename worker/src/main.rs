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
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> anyhow::Result<()> {
    configure_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(strata_worker::cli::run(cli.worker, strata_shared::shutdown_signal()))?;
    Ok(())
}


/// All parallel work runs on one rayon pool; candle's own pool gets no threads (it then runs
/// inline), so two pools never compete for the cores. Runs before any other thread starts.
#[allow(unsafe_code)]
fn configure_threads() {
    // SAFETY: called first thing in `main`, before any other thread exists.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
}
