//! `strata-gateway`: the gateway alone, for workers started elsewhere (`strata-worker` or
//! `strata worker` on each host) — the image a Kubernetes gateway pod runs. It links no tensor
//! library. The all-in-one `strata gateway` is the same process.

use clap::Parser;
use strata_gateway::cli::GatewayArgs;

#[derive(Parser)]
#[command(
    name = "strata-gateway",
    version,
    about = "Strata gateway: serves the gRPC API over remote workers"
)]
struct Cli {
    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text")]
    log_format: strata_shared::telemetry::LogFormat,
    #[command(flatten)]
    gateway: GatewayArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = strata_shared::telemetry::init("strata-gateway", cli.log_format, "info")?;
    let rt = tokio::runtime::Runtime::new()?;
    let cfg = cli.gateway.config()?;
    rt.block_on(async { strata_gateway::server::run(cfg, strata_shared::stop_signals()).await })?;
    Ok(())
}
