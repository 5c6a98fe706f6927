//! The agent put together: discovery and price checks before anything is served, then the
//! kubelet device plugin (plugin mode) and the offer publisher side by side, sharing one view of
//! GPU health. The publisher's API-server trouble never touches the kubelet side.

use std::sync::Arc;
use std::time::Duration;

use gpumarket_crds::OfferMode;
use tokio::sync::mpsc;

use crate::config::{Args, ConfigError, Mode, Supplier};
use crate::health::track;
use crate::offer::{OfferSettings, publish};
use crate::plugin::GpuPlugin;
use crate::registration::{PluginSocket, RegistrationError, serve_and_register};
use crate::source::{DeviceSource, Inventory, SourceError};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub supplier: Supplier,
    pub mode: Mode,
    pub socket: PluginSocket,
    pub cdi: bool,
    pub heartbeat: Duration,
}

impl AgentConfig {
    pub fn new(args: &Args, supplier: Supplier) -> Self {
        AgentConfig {
            node_name: args.node_name.clone(),
            supplier,
            mode: args.mode,
            socket: PluginSocket {
                dir: args.socket_dir.clone(),
                resource_name: args.resource_name.clone(),
            },
            cdi: args.cdi,
            heartbeat: args.heartbeat_interval,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
}

/// An agent whose GPUs were discovered and priced.
pub struct Agent {
    config: AgentConfig,
    source: Arc<dyn DeviceSource>,
    inventory: Arc<Inventory>,
    price_per_gpu_hour: u64,
}

impl Agent {
    /// Discovers the GPUs and checks that each model has a price.
    pub fn prepare(
        config: AgentConfig,
        source: Arc<dyn DeviceSource>,
    ) -> Result<Agent, AgentError> {
        let inventory = source.discover()?;
        let price_per_gpu_hour = config.supplier.node_price(&inventory)?;
        for gpu in &inventory.gpus {
            tracing::info!(uuid = %gpu.uuid, product = %gpu.product_name, model = %gpu.model(), memory_mib = gpu.memory_mib, nvlink_peers = gpu.nvlink_peers.len(), "discovered GPU");
        }
        Ok(Agent { config, source, inventory: Arc::new(inventory), price_per_gpu_hour })
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Runs until the future is dropped or something that retrying cannot fix happens.
    /// Without a client no offer is published (a plugin-only agent, as in the gRPC tests).
    pub async fn run(self, client: Option<kube::Client>) -> Result<(), AgentError> {
        let (events_tx, events_rx) = mpsc::channel(64);
        self.source.watch_health(events_tx)?;
        let health = track(&self.inventory, events_rx);
        let plugin = async {
            match self.config.mode {
                Mode::Plugin => {
                    let plugin = GpuPlugin {
                        inventory: self.inventory.clone(),
                        health: health.clone(),
                        cdi: self.config.cdi,
                    };
                    Ok(serve_and_register(plugin, self.config.socket.clone()).await?)
                }
                Mode::OfferOnly => std::future::pending().await,
            }
        };
        let offer = async {
            let Some(client) = client else { return std::future::pending().await };
            let settings = OfferSettings {
                node_name: self.config.node_name.clone(),
                supplier: self.config.supplier.clone(),
                price_per_gpu_hour: self.price_per_gpu_hour,
                mode: OfferMode::from(self.config.mode),
            };
            Ok(publish(
                client,
                settings,
                self.inventory.clone(),
                health.clone(),
                self.config.heartbeat,
            )
            .await?)
        };
        tokio::select! {
            result = plugin => result,
            result = offer => result,
        }
    }
}
