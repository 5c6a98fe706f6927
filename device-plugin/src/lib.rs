//! gpumarket supplier agent: discovers the node's GPUs (NVML, or a fake for simulation), serves
//! them to the kubelet as a device plugin (to the worker pods of the node's leases only, each
//! its own lease's GPUs: see [`allocation`]), and offers them on the market as the node's
//! `GpuOffer`, heartbeating it with per-GPU health. With CDI on, it writes the CDI spec of its
//! GPUs (see [`cdi`]), so that the runtime needs no vendor toolkit to give containers GPUs.
//!
//! The node is tainted `gpumarket.io/supplier:NoSchedule` and labelled
//! `gpumarket.io/gpu-model=<model>` so that only marketplace pods land on offered GPUs (see
//! [`node`]).
//!
//! In fleet mode (`gpumarket-fleet`, see [`fleet`]) a whole Kubernetes GPU cluster joins the
//! market's cluster from outside, with a join credential of the hub.
// A failing expectation is meant to panic in unit tests.
#![cfg_attr(test, allow(clippy::expect_used))]

pub mod agent;
pub mod allocation;
pub mod cdi;
pub mod config;
pub mod fleet;
pub mod health;
pub mod leases;
pub mod node;
pub mod offer;
pub mod plugin;
pub mod pod_resources;
pub mod proof;
pub mod registration;
pub mod source;

/// The kubelet device-plugin API v1beta1 (client and server), generated from `proto/api.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// The kubelet PodResources API v1 (client and server), generated from
/// `proto/podresources.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pod_resources_api {
    tonic::include_proto!("v1");
}
