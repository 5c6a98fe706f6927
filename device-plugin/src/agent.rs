//! The agent put together: discovery and price checks before anything is served, then the
//! kubelet device plugin (plugin mode, with the watch of the node's leases it allocates by) and
//! the offer publisher (with the answers to proof-of-compute challenges) side by side, sharing
//! one view of GPU health. The publisher's API-server
//! trouble never touches the kubelet side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpumarket_crds::OfferMode;
use tokio::sync::{mpsc, watch};

use crate::allocation::NodeLease;
use crate::cdi::{self, CdiError, WrittenSpec};
use crate::config::{Args, ConfigError, Mode, Supplier};
use crate::health::track;
use crate::leases::follow_leases;
use crate::offer::{OfferSettings, Reserve, publish};
use crate::plugin::{GpuPlugin, LeaseGate};
use crate::proof::answer_challenges;
use crate::registration::{PluginSocket, RegistrationError, serve_and_register};
use crate::source::{DeviceSource, Inventory, SourceError};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub supplier: Supplier,
    pub mode: Mode,
    pub socket: PluginSocket,
    pub cdi: bool,
    /// Where the CDI spec is written (CDI on, plugin mode).
    pub cdi_spec_dir: PathBuf,
    pub heartbeat: Duration,
    /// The kubelet's PodResources socket (plugin mode).
    pub pod_resources_socket: PathBuf,
    /// How long an allocation not explained by the leases seen so far waits for the lease watch.
    pub lease_wait: Duration,
    /// CPU (millicores) and memory (bytes) of the node kept out of the offer's allocatable.
    pub reserve: Reserve,
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
            cdi_spec_dir: args.cdi_spec_dir.clone(),
            heartbeat: args.heartbeat_interval,
            pod_resources_socket: args.pod_resources_socket.clone(),
            lease_wait: args.lease_wait,
            reserve: Reserve {
                cpu_millicores: args.reserve_cpu,
                memory_bytes: args.reserve_memory,
            },
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
    #[error(transparent)]
    Cdi(#[from] CdiError),
}

/// An agent whose GPUs were discovered and priced.
pub struct Agent {
    config: AgentConfig,
    source: Arc<dyn DeviceSource>,
    inventory: Arc<Inventory>,
    price_per_gpu_hour: u64,
    /// The CDI spec to write while serving the kubelet (CDI on, plugin mode).
    cdi_spec: Option<cdi::Spec>,
    /// The node's leases, when fed by the caller rather than watched on the API server.
    leases: Option<watch::Receiver<Vec<NodeLease>>>,
}

impl Agent {
    /// Discovers the GPUs, checks that each model has a price and, with CDI on in plugin mode,
    /// that the driver's files make a CDI spec that works.
    pub fn prepare(
        config: AgentConfig,
        source: Arc<dyn DeviceSource>,
    ) -> Result<Agent, AgentError> {
        let inventory = source.discover()?;
        let price_per_gpu_hour = config.supplier.node_price(&inventory)?;
        for gpu in &inventory.gpus {
            tracing::info!(uuid = %gpu.uuid, product = %gpu.product_name, model = %gpu.model(), memory_mib = gpu.memory_mib, nvlink_peers = gpu.nvlink_peers.len(), "discovered GPU");
        }
        let cdi_spec = match (config.cdi, config.mode) {
            (true, Mode::Plugin) => Some(cdi::spec(&inventory, &source.driver_files()?)?),
            _ => None,
        };
        Ok(Agent {
            config,
            source,
            inventory: Arc::new(inventory),
            price_per_gpu_hour,
            cdi_spec,
            leases: None,
        })
    }

    /// Allocates by the leases sent on `leases` instead of watching the node's GpuLeases on the
    /// API server (tests of the kubelet side; simulated suppliers).
    pub fn with_leases(mut self, leases: watch::Receiver<Vec<NodeLease>>) -> Agent {
        self.leases = Some(leases);
        self
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Runs until the future is dropped or something that retrying cannot fix happens.
    /// Without a client no offer is published (a plugin-only agent, as in the gRPC tests), and
    /// without leases fed by [`Agent::with_leases`] either, every allocation is refused.
    pub async fn run(self, client: Option<kube::Client>) -> Result<(), AgentError> {
        let (events_tx, events_rx) = mpsc::channel(64);
        self.source.watch_health(events_tx)?;
        let health = track(&self.inventory, events_rx);
        let lease_client = client.clone();
        let plugin = async {
            match self.config.mode {
                Mode::Plugin => {
                    // Written before the kubelet learns of the GPUs, removed when this stops.
                    let _written = match &self.cdi_spec {
                        Some(spec) => Some(WrittenSpec::write(&self.config.cdi_spec_dir, spec)?),
                        None => None,
                    };
                    let (leases, follow) = match (&self.leases, lease_client) {
                        (Some(fed), _) => (fed.clone(), None),
                        (None, Some(client)) => {
                            let (view, leases) = watch::channel(Vec::new());
                            let node = self.config.node_name.clone();
                            (leases, Some(follow_leases(client, node, view)))
                        }
                        (None, None) => {
                            tracing::warn!(
                                "no API server and no leases given: every allocation is refused"
                            );
                            (watch::channel(Vec::new()).1, None)
                        }
                    };
                    let plugin = GpuPlugin {
                        inventory: self.inventory.clone(),
                        health: health.clone(),
                        cdi: self.config.cdi,
                        gate: LeaseGate {
                            leases,
                            pod_resources: self.config.pod_resources_socket.clone(),
                            resource_name: self.config.socket.resource_name.clone(),
                            wait: self.config.lease_wait,
                        },
                    };
                    let serve = serve_and_register(plugin, self.config.socket.clone());
                    match follow {
                        None => Ok(serve.await?),
                        Some(follow) => tokio::select! {
                            result = serve => Ok(result?),
                            never = follow => match never {},
                        },
                    }
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
                reserve: self.config.reserve,
            };
            let answers = answer_challenges(
                client.clone(),
                self.config.node_name.clone(),
                self.source.clone(),
            );
            let publish = publish(
                client,
                settings,
                self.inventory.clone(),
                health.clone(),
                self.config.heartbeat,
            );
            tokio::select! {
                result = publish => Ok(result?),
                never = answers => match never {},
            }
        };
        tokio::select! {
            result = plugin => result,
            result = offer => result,
        }
    }
}
