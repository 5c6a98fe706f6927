//! The current health of each GPU, shared by the kubelet-facing ListAndWatch stream and the offer
//! publisher: both watch one `tokio::sync::watch` channel fed by the device source's events.

use gpumarket_crds::GpuHealth;
use tokio::sync::{mpsc, watch};

use crate::source::{HealthEvent, Inventory};

/// Health of one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHealth {
    pub uuid: String,
    pub health: GpuHealth,
    /// Why it is unhealthy.
    pub reason: Option<String>,
}

/// Every GPU of the inventory, healthy until told otherwise.
pub fn initial_health(inventory: &Inventory) -> Vec<DeviceHealth> {
    inventory
        .gpus
        .iter()
        .map(|g| DeviceHealth { uuid: g.uuid.clone(), health: GpuHealth::Healthy, reason: None })
        .collect()
}

/// Applies `event`; whether anything changed. Events for unknown devices are ignored.
pub fn apply_event(devices: &mut [DeviceHealth], event: &HealthEvent) -> bool {
    let Some(device) = devices.iter_mut().find(|d| d.uuid == event.uuid) else { return false };
    let reason = (event.health == GpuHealth::Unhealthy).then(|| event.reason.clone());
    if device.health == event.health && device.reason == reason {
        return false;
    }
    device.health = event.health;
    device.reason = reason;
    true
}

/// Follows `events` into a watch channel that starts with every GPU healthy.
pub fn track(
    inventory: &Inventory,
    mut events: mpsc::Receiver<HealthEvent>,
) -> watch::Receiver<Vec<DeviceHealth>> {
    let (tx, rx) = watch::channel(initial_health(inventory));
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if event.health == GpuHealth::Unhealthy {
                tracing::warn!(uuid = %event.uuid, reason = %event.reason, "GPU unhealthy");
            } else {
                tracing::info!(uuid = %event.uuid, "GPU healthy again");
            }
            tx.send_if_modified(|devices| apply_event(devices, &event));
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_change_only_their_device_and_only_once() {
        let mut devices = vec![
            DeviceHealth { uuid: "A".into(), health: GpuHealth::Healthy, reason: None },
            DeviceHealth { uuid: "B".into(), health: GpuHealth::Healthy, reason: None },
        ];
        let xid =
            HealthEvent { uuid: "B".into(), health: GpuHealth::Unhealthy, reason: "XID 79".into() };
        assert!(apply_event(&mut devices, &xid));
        assert!(!apply_event(&mut devices, &xid), "a repeated event is no change");
        assert_eq!(devices[0].health, GpuHealth::Healthy);
        assert_eq!(devices[1].reason.as_deref(), Some("XID 79"));

        let recovered =
            HealthEvent { uuid: "B".into(), health: GpuHealth::Healthy, reason: String::new() };
        assert!(apply_event(&mut devices, &recovered));
        assert_eq!(
            devices[1],
            DeviceHealth { uuid: "B".into(), health: GpuHealth::Healthy, reason: None }
        );
        assert!(!apply_event(&mut devices, &HealthEvent { uuid: "Z".into(), ..recovered }));
    }
}
