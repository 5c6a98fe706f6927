//! The kubelet-facing `DevicePlugin` gRPC service: lists the GPUs with their health (again on
//! every change), prefers NVLink-connected sets and tells the runtime which GPUs a container gets.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use gpumarket_crds::GpuHealth;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::allocation::{container_devices, preferred_allocation};
use crate::api::device_plugin_server::DevicePlugin;
use crate::api::{
    AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse,
    NumaNode, PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse, TopologyInfo,
};
use crate::health::DeviceHealth;
use crate::source::Inventory;

/// Health strings of the device-plugin API (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/constants.go).
const HEALTHY: &str = "Healthy";
const UNHEALTHY: &str = "Unhealthy";

#[derive(Clone)]
pub struct GpuPlugin {
    pub inventory: Arc<Inventory>,
    pub health: watch::Receiver<Vec<DeviceHealth>>,
    pub cdi: bool,
}

/// The device list the kubelet sees, each with its NUMA node when known (for the kubelet's
/// topology manager).
pub fn device_list(inventory: &Inventory, devices: &[DeviceHealth]) -> ListAndWatchResponse {
    let devices = devices
        .iter()
        .map(|d| Device {
            id: d.uuid.clone(),
            health: if d.health == GpuHealth::Healthy { HEALTHY } else { UNHEALTHY }.into(),
            topology: inventory
                .gpu(&d.uuid)
                .and_then(|g| g.numa_node)
                .map(|node| TopologyInfo { nodes: vec![NumaNode { id: i64::from(node) }] }),
        })
        .collect();
    ListAndWatchResponse { devices }
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for GpuPlugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        // WatchStream yields the current list first, then each change.
        let inventory = self.inventory.clone();
        let stream = WatchStream::new(self.health.clone())
            .map(move |devices| Ok(device_list(&inventory, &devices)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).map_err(|_| {
                    Status::invalid_argument("allocation_size must not be negative")
                })?;
                let device_ids = preferred_allocation(
                    &self.inventory,
                    &c.available_device_i_ds,
                    &c.must_include_device_i_ds,
                    size,
                );
                Ok(ContainerPreferredAllocationResponse { device_i_ds: device_ids })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(PreferredAllocationResponse { container_responses }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let given = container_devices(&self.inventory, &c.devices_ids, self.cdi)
                    .map_err(Status::invalid_argument)?;
                Ok(ContainerAllocateResponse {
                    envs: given.envs,
                    cdi_devices: given
                        .cdi_devices
                        .into_iter()
                        .map(|name| CdiDevice { name })
                        .collect(),
                    ..Default::default()
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        // Not required (pre_start_required is false): GPUs need no reset between containers.
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

pub fn options() -> DevicePluginOptions {
    DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::DeviceSource;
    use crate::source::fake::FakeSource;

    #[test]
    fn devices_carry_their_numa_node_and_health() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gpus.yaml");
        std::fs::write(
            &path,
            "gpus:\n\
             - {uuid: GPU-0, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559, numaNode: 1}\n\
             - {uuid: GPU-1, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}\n",
        )
        .expect("write");
        let inventory = FakeSource::from_file(&path).expect("valid").discover().expect("gpus");
        let health = |uuid: &str, health| DeviceHealth { uuid: uuid.into(), health, reason: None };
        let list = device_list(
            &inventory,
            &[health("GPU-0", GpuHealth::Healthy), health("GPU-1", GpuHealth::Unhealthy)],
        );
        let numa: Vec<Option<Vec<i64>>> = list
            .devices
            .iter()
            .map(|d| d.topology.as_ref().map(|t| t.nodes.iter().map(|n| n.id).collect()))
            .collect();
        assert_eq!(numa, [Some(vec![1]), None]);
        let states: Vec<&str> = list.devices.iter().map(|d| d.health.as_str()).collect();
        assert_eq!(states, [HEALTHY, UNHEALTHY]);
    }
}
