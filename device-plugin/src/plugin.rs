//! The kubelet-facing `DevicePlugin` gRPC service: lists the GPUs with their health (again on
//! every change), prefers the GPUs of the lease whose worker pod is being admitted (within
//! them NVLink-connected sets), refuses allocations that are not a waiting lease pod's own
//! GPUs, and tells the runtime which GPUs a container gets. The decisions are the pure ones of
//! [`crate::allocation`]; this layer only gathers the view they are made on.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use gpumarket_crds::GpuHealth;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::allocation::{
    KubeletPods, NodeLease, Refusal, check_allocation, container_devices, preferred_allocation,
    preferred_for_lease,
};
use crate::api::device_plugin_server::DevicePlugin;
use crate::api::{
    AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse,
    NumaNode, PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse, TopologyInfo,
};
use crate::health::DeviceHealth;
use crate::pod_resources;
use crate::source::Inventory;

/// Health strings of the device-plugin API (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/constants.go).
const HEALTHY: &str = "Healthy";
const UNHEALTHY: &str = "Unhealthy";

#[derive(Clone)]
pub struct GpuPlugin {
    pub inventory: Arc<Inventory>,
    pub health: watch::Receiver<Vec<DeviceHealth>>,
    pub cdi: bool,
    pub gate: LeaseGate,
}

/// What the plugin decides allocations on: the node's active leases (from the lease watch) and
/// the kubelet's pods (asked at each decision).
#[derive(Clone)]
pub struct LeaseGate {
    pub leases: watch::Receiver<Vec<NodeLease>>,
    /// The kubelet's PodResources socket.
    pub pod_resources: PathBuf,
    /// The resource whose devices count as held (the plugin's own).
    pub resource_name: String,
    /// How long a refusal that a newer view of the leases could lift waits for one.
    pub wait: Duration,
}

/// Why no decision could be made.
enum GateError {
    Refused(Refusal),
    Kubelet(pod_resources::PodResourcesError),
}

impl From<GateError> for Status {
    fn from(error: GateError) -> Status {
        match error {
            GateError::Refused(refusal) => Status::permission_denied(refusal.to_string()),
            GateError::Kubelet(e) => Status::unavailable(e.to_string()),
        }
    }
}

/// How often an unreachable PodResources API is asked again while waiting.
const KUBELET_RETRY: Duration = Duration::from_millis(200);

impl LeaseGate {
    /// `decide` on the current leases and kubelet pods. A refusal that a newer view of the
    /// leases could lift (the controller has not listed a pod bound a moment ago, the watch has
    /// not delivered a new lease yet) waits for the next change of the leases, at most `wait`
    /// in all; so does an unreachable kubelet.
    async fn decide<T>(
        &self,
        mut decide: impl FnMut(&[NodeLease], &KubeletPods) -> Result<T, Refusal>,
    ) -> Result<T, GateError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut leases = self.leases.clone();
        loop {
            let view = leases.borrow_and_update().clone();
            let error = match pod_resources::list(&self.pod_resources, &self.resource_name).await {
                Ok(pods) => match decide(&view, &pods) {
                    Ok(decided) => return Ok(decided),
                    Err(refusal) if !refusal.may_lift() => return Err(GateError::Refused(refusal)),
                    Err(refusal) => GateError::Refused(refusal),
                },
                Err(e) => GateError::Kubelet(e),
            };
            // Decided again after each change that came in time; past the deadline, refused.
            let now = tokio::time::Instant::now();
            let waited = now < deadline
                && match &error {
                    GateError::Refused(_) => tokio::time::timeout_at(deadline, leases.changed())
                        .await
                        // No lease source any more: nothing will change.
                        .is_ok_and(|changed| changed.is_ok()),
                    GateError::Kubelet(_) => {
                        tokio::time::sleep_until(deadline.min(now + KUBELET_RETRY)).await;
                        true
                    }
                };
            if !waited {
                return Err(error);
            }
        }
    }
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
        let mut container_responses = Vec::new();
        for c in request.into_inner().container_requests {
            let size = usize::try_from(c.allocation_size)
                .map_err(|_| Status::invalid_argument("allocation_size must not be negative"))?;
            let (available, must_include) = (&c.available_device_i_ds, &c.must_include_device_i_ds);
            let for_lease = self
                .gate
                .decide(|leases, pods| {
                    preferred_for_lease(
                        &self.inventory,
                        leases,
                        pods,
                        available,
                        must_include,
                        size,
                    )
                    .map(|(waiting, devices)| {
                        (waiting.lease.name.clone(), waiting.pod.to_string(), devices)
                    })
                })
                .await;
            let device_ids = match for_lease {
                Ok((lease, pod, devices)) => {
                    tracing::info!(%lease, %pod, ?devices, "preferring the lease's GPUs");
                    devices
                }
                // Allocate refuses whatever the kubelet then picks; a preference changes nothing.
                Err(error) => {
                    tracing::warn!(error = %Status::from(error).message(), "no lease pod to prefer GPUs for");
                    preferred_allocation(&self.inventory, available, must_include, size)
                }
            };
            container_responses
                .push(ContainerPreferredAllocationResponse { device_i_ds: device_ids });
        }
        Ok(Response::new(PreferredAllocationResponse { container_responses }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let requests = request.into_inner().container_requests;
        let mut container_responses = Vec::with_capacity(requests.len());
        for c in &requests {
            let given = container_devices(&self.inventory, &c.devices_ids, self.cdi)
                .map_err(Status::invalid_argument)?;
            container_responses.push(ContainerAllocateResponse {
                envs: given.envs,
                cdi_devices: given.cdi_devices.into_iter().map(|name| CdiDevice { name }).collect(),
                ..Default::default()
            });
        }
        // The kubelet allocates one container at a time; whatever it sends, all of it goes to
        // one pod.
        let devices: Vec<String> =
            requests.iter().flat_map(|c| c.devices_ids.iter().cloned()).collect();
        match self
            .gate
            .decide(|leases, pods| {
                check_allocation(leases, pods, &devices)
                    .map(|waiting| (waiting.lease.name.clone(), waiting.pod.to_string()))
            })
            .await
        {
            Ok((lease, pod)) => {
                tracing::info!(%lease, %pod, ?devices, "GPUs handed to the lease's worker pod");
                Ok(Response::new(AllocateResponse { container_responses }))
            }
            Err(error) => {
                let status = Status::from(error);
                tracing::warn!(?devices, reason = %status.message(), "allocation refused");
                Err(status)
            }
        }
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
