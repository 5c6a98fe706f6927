//! Why a cluster's Ray pods are not starting, read from their container statuses, in words
//! that say what to change: an image the node cannot get, an image whose Ray is not the
//! version the spec asks for (the version check the RayCluster runs first, see
//! [`crate::raycluster::VERSION_CHECK`]), or a Ray container that keeps failing.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use crate::raycluster::VERSION_CHECK;

/// Kubelet reasons for an image it could not get. `ErrImagePull` alone may be a passing
/// registry error; these hold after the kubelet's retries or never change.
const IMAGE_UNAVAILABLE: [&str; 3] = ["ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"];
/// Termination messages are the buyer's image talking: kept short in the status.
const MESSAGE_LIMIT: usize = 300;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTrouble {
    /// Condition reason: `ImageUnavailable`, `RayVersionMismatch` or `RayFailing`.
    pub reason: &'static str,
    pub message: String,
    /// Certainly the buyer's to fix: the head (off the market's nodes) cannot get the image, or
    /// the image lacks the spec's Ray. A worker alone failing to pull may be its supplier's
    /// node, and a crash loop may be a node too loaded to answer Ray's probes: those only show.
    pub buyers: bool,
}

/// The first trouble among the cluster's pods (head first), `None` while they start normally.
pub fn pod_trouble(pods: &[&Pod]) -> Option<PodTrouble> {
    let mut pods = pods.to_vec();
    pods.sort_by_key(|p| (!is_head(p), p.name_any()));
    let image = pods.iter().find_map(|p| image_unavailable(p));
    image
        .or_else(|| pods.iter().find_map(|p| version_mismatch(p)))
        .or_else(|| pods.iter().find_map(|p| ray_failing(p)))
}

fn is_head(pod: &Pod) -> bool {
    pod.labels().get("ray.io/node-type").map(String::as_str) == Some("head")
}

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    let init = status.and_then(|s| s.init_container_statuses.as_deref()).unwrap_or_default();
    let main = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    init.iter().chain(main)
}

fn where_(pod: &Pod) -> String {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("no node yet");
    format!("pod {} on {node}", pod.name_any())
}

fn image_unavailable(pod: &Pod) -> Option<PodTrouble> {
    let (status, waiting) = statuses(pod).find_map(|s| {
        let waiting = s.state.as_ref()?.waiting.as_ref()?;
        IMAGE_UNAVAILABLE.contains(&waiting.reason.as_deref()?).then_some((s, waiting))
    })?;
    let why = waiting.message.as_deref().unwrap_or_default();
    Some(PodTrouble {
        reason: "ImageUnavailable",
        message: format!(
            "{} cannot get the image {} ({}: {}); set spec.ray.image to an image the nodes can pull",
            where_(pod),
            status.image,
            waiting.reason.as_deref().unwrap_or_default(),
            short(why),
        ),
        buyers: is_head(pod),
    })
}

fn version_mismatch(pod: &Pod) -> Option<PodTrouble> {
    let check = statuses(pod).find(|s| s.name == VERSION_CHECK)?;
    let failed = [check.state.as_ref(), check.last_state.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|s| s.terminated.as_ref().filter(|t| t.exit_code != 0))?;
    let why = failed.message.as_deref().unwrap_or_default().trim();
    Some(PodTrouble {
        reason: "RayVersionMismatch",
        message: format!("{}: {}", where_(pod), short(why)),
        buyers: true,
    })
}

fn ray_failing(pod: &Pod) -> Option<PodTrouble> {
    let status = statuses(pod).find(|s| {
        s.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref())
            == Some("CrashLoopBackOff")
    })?;
    let last = status.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    let (code, why) =
        last.map_or((0, ""), |t| (t.exit_code, t.message.as_deref().unwrap_or_default().trim()));
    Some(PodTrouble {
        reason: "RayFailing",
        message: format!(
            "container {} of {} keeps failing (exit code {code}){}",
            status.name,
            where_(pod),
            if why.is_empty() { String::new() } else { format!(": {}", short(why)) },
        ),
        buyers: false,
    })
}

fn short(text: &str) -> String {
    match text.char_indices().nth(MESSAGE_LIMIT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, head: bool, status: serde_json::Value) -> Pod {
        let kind = if head { "head" } else { "worker" };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"ray.io/node-type": kind}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": status,
        }))
        .expect("pod")
    }

    fn waiting(container: &str, reason: &str, message: &str) -> serde_json::Value {
        json!({"name": container, "image": "ghcr.io/x/ray:missing", "imageID": "", "ready": false,
               "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}})
    }

    #[test]
    fn starting_pods_are_no_trouble() {
        let creating = pod(
            "h",
            true,
            json!({"containerStatuses": [waiting("ray-head", "ContainerCreating", "")]}),
        );
        let passing = pod(
            "w",
            false,
            json!({"initContainerStatuses": [waiting(VERSION_CHECK, "ErrImagePull", "timeout")]}),
        );
        assert_eq!(pod_trouble(&[&creating, &passing]), None, "a first pull error may pass");
    }

    #[test]
    fn an_image_the_head_cannot_get_is_the_buyers_and_names_the_image() {
        let worker = pod(
            "w",
            false,
            json!({"containerStatuses": [
            waiting("ray-worker", "CrashLoopBackOff", "")]}),
        );
        let head = pod(
            "h",
            true,
            json!({"initContainerStatuses": [
            waiting(VERSION_CHECK, "ImagePullBackOff", "Back-off pulling image")]}),
        );
        let trouble = pod_trouble(&[&worker, &head]).expect("trouble");
        assert_eq!(trouble.reason, "ImageUnavailable");
        assert!(trouble.buyers);
        assert!(trouble.message.contains("ghcr.io/x/ray:missing"), "{}", trouble.message);
        assert!(trouble.message.contains("spec.ray.image"), "{}", trouble.message);
    }

    #[test]
    fn an_image_only_a_workers_node_cannot_get_may_be_the_suppliers() {
        let worker = pod(
            "w",
            false,
            json!({"containerStatuses": [
            waiting("ray-worker", "ImagePullBackOff", "")]}),
        );
        let trouble = pod_trouble(&[&worker]).expect("trouble");
        assert_eq!((trouble.reason, trouble.buyers), ("ImageUnavailable", false));
    }

    #[test]
    fn a_failed_version_check_says_which_ray_the_image_has() {
        let said = "the image has Ray 2.41.0; spec.ray.version asks 2.9.3";
        let failed = json!({"name": VERSION_CHECK, "image": "i", "imageID": "", "ready": false,
            "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": format!("{said}\n")}}});
        let worker = pod("w", false, json!({"initContainerStatuses": [failed]}));
        let trouble = pod_trouble(&[&worker]).expect("trouble");
        assert_eq!((trouble.reason, trouble.buyers), ("RayVersionMismatch", true));
        assert_eq!(trouble.message, format!("pod w on n1: {said}"));
    }

    #[test]
    fn a_crash_looping_head_only_shows_with_a_bounded_message() {
        let crash = json!({"name": "ray-head", "image": "i", "imageID": "", "ready": false,
            "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 127, "message": "x".repeat(5000)}}});
        let head = pod("h", true, json!({"containerStatuses": [crash]}));
        let trouble = pod_trouble(&[&head]).expect("trouble");
        assert_eq!((trouble.reason, trouble.buyers), ("RayFailing", false));
        assert!(trouble.message.contains("exit code 127"), "{}", trouble.message);
        assert!(trouble.message.chars().count() < MESSAGE_LIMIT + 100);
    }
}
