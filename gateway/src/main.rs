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
    #[command(flatten)]
    gateway: GatewayArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(strata_gateway::server::run(
        cli.gateway.config()?,
        strata_shared::shutdown_signal(),
    ))?;
    Ok(())
}
