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
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
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

/// The device list the kubelet sees.
pub fn device_list(devices: &[DeviceHealth]) -> ListAndWatchResponse {
    let devices = devices
        .iter()
        .map(|d| Device {
            id: d.uuid.clone(),
            health: if d.health == GpuHealth::Healthy { HEALTHY } else { UNHEALTHY }.into(),
            topology: None,
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
        let stream = WatchStream::new(self.health.clone()).map(|devices| Ok(device_list(&devices)));
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
