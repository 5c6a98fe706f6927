use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gpumarket_device_plugin::agent::{Agent, AgentConfig};
use gpumarket_device_plugin::cdi;
use gpumarket_device_plugin::config::{Args, SourceSpec, Supplier};
use gpumarket_device_plugin::source::DeviceSource;
use gpumarket_device_plugin::source::fake::FakeSource;
use gpumarket_device_plugin::source::nvml::NvmlSource;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        // The message alone says what to fix; a backtrace would bury it.
        Err(e) => {
            eprintln!("gpumarket-device-plugin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Standard output is --discover's.
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let source: Arc<dyn DeviceSource> = match &args.source {
        SourceSpec::Nvml => Arc::new(NvmlSource::new(args.host_root.clone())),
        SourceSpec::Fake(path) => Arc::new(FakeSource::from_file(path)?),
    };
    if args.discover {
        return discover(source.as_ref());
    }
    let supplier = Supplier::from_args(&args)?;
    let agent = Agent::prepare(AgentConfig::new(&args, supplier), source)?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    tokio::select! {
        result = agent.run(Some(client)) => result?,
        () = shutdown() => tracing::info!("stopping"),
    }
    Ok(())
}

/// Prints the GPUs and driver files the source finds and the CDI spec made of them; a spec that
/// cannot be made is an error after the rest is printed.
fn discover(source: &dyn DeviceSource) -> anyhow::Result<()> {
    let inventory = source.discover()?;
    let driver_files = source.driver_files()?;
    let spec = cdi::spec(&inventory, &driver_files);
    let report = serde_json::json!({
        "inventory": inventory,
        "driverFiles": driver_files,
        "cdiSpec": spec.as_ref().ok(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    spec.map(drop).context("no CDI spec")
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
