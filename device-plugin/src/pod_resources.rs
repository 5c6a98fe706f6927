//! The kubelet's PodResources API (`PodResourcesLister.List` on
//! `/var/lib/kubelet/pod-resources/kubelet.sock`): which pods the kubelet has admitted or is
//! admitting, and which devices each holds. The plugin asks it at every allocation, to tell the
//! pod being admitted (listed, no GPU yet) from those already served.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::allocation::{KubeletPods, PodName};
use crate::pod_resources_api::pod_resources_lister_client::PodResourcesListerClient;
use crate::pod_resources_api::{ListPodResourcesRequest, ListPodResourcesResponse};
use crate::registration::connect;

/// Where the kubelet serves the PodResources API.
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// How long one `List` may take (the kubelet answers from memory).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("asking the kubelet's PodResources API at {path} which pods hold devices: {message}")]
pub struct PodResourcesError {
    pub path: PathBuf,
    pub message: String,
}

/// The kubelet's pods with the devices of `resource` each holds.
pub async fn list(socket: &Path, resource: &str) -> Result<KubeletPods, PodResourcesError> {
    let failed = |message: String| PodResourcesError { path: socket.to_owned(), message };
    let call = async {
        let channel = connect(socket).await.map_err(|e| failed(e.to_string()))?;
        PodResourcesListerClient::new(channel)
            .list(ListPodResourcesRequest {})
            .await
            .map_err(|e| failed(e.message().to_owned()))
    };
    let response = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| failed(format!("no answer within {CALL_TIMEOUT:?}")))??;
    Ok(kubelet_pods(&response.into_inner(), resource))
}

/// Every pod of the answer, with the devices of `resource` its containers hold (other
/// resources' devices are not ours to count).
pub fn kubelet_pods(response: &ListPodResourcesResponse, resource: &str) -> KubeletPods {
    let pods = response
        .pod_resources
        .iter()
        .map(|pod| {
            let devices = pod
                .containers
                .iter()
                .flat_map(|c| &c.devices)
                .filter(|d| d.resource_name == resource)
                .flat_map(|d| d.device_ids.iter().cloned())
                .collect();
            (PodName::new(&pod.namespace, &pod.name), devices)
        })
        .collect();
    KubeletPods { pods }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_resources_api::{ContainerDevices, ContainerResources, PodResources};

    #[test]
    fn pods_hold_only_the_devices_of_our_resource() {
        let devices = |resource: &str, ids: &[&str]| ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        };
        let pod = |name: &str, containers: Vec<ContainerResources>| PodResources {
            name: name.into(),
            namespace: "ml".into(),
            containers,
        };
        let container = |devices: Vec<ContainerDevices>| ContainerResources {
            name: "c".into(),
            devices,
            ..Default::default()
        };
        let response = ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "served",
                    vec![
                        container(vec![devices("nvidia.com/gpu", &["GPU-0"])]),
                        container(vec![
                            devices("example.com/nic", &["nic-0"]),
                            devices("nvidia.com/gpu", &["GPU-1"]),
                        ]),
                    ],
                ),
                pod("admitting", vec![container(vec![])]),
                pod("other-resource", vec![container(vec![devices("example.com/nic", &["n"])])]),
            ],
        };
        let pods = kubelet_pods(&response, "nvidia.com/gpu").pods;
        let held = |name: &str| pods.get(&PodName::new("ml", name)).cloned();
        assert_eq!(held("served"), Some(vec!["GPU-0".to_string(), "GPU-1".to_string()]));
        assert_eq!(held("admitting"), Some(vec![]));
        assert_eq!(held("other-resource"), Some(vec![]));
        assert_eq!(held("absent"), None);
    }
}
