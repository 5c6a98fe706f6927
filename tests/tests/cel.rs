//! Every CEL rule of the gpumarket CRDs, enforced by the real API server: the examples are
//! accepted, each invalid manifest is refused with the message that says what to change, and
//! the transition rules hold on real updates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use gpumarket_crds::{GpuCluster, GpuFleet, GpuLease, GpuOffer, MarketPolicy};
use gpumarket_tests::Env;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};

const WALLET: &str = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin";
const OTHER_WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
/// A uid as the API server gives a GpuCluster.
const CLUSTER_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/// Above every price the schema accepts (100000000000): price × GPUs × hours would overflow.
const PRICE_I64_MAX: i64 = i64::MAX;

fn resource(kind: &str) -> ApiResource {
    match kind {
        "GpuCluster" => ApiResource::erase::<GpuCluster>(&()),
        "GpuOffer" => ApiResource::erase::<GpuOffer>(&()),
        "GpuLease" => ApiResource::erase::<GpuLease>(&()),
        "MarketPolicy" => ApiResource::erase::<MarketPolicy>(&()),
        other => panic!("not a gpumarket kind: {other}"),
    }
}

/// The API for `manifest`'s kind (in `ns` for the namespaced GpuCluster).
fn api_for(client: &Client, manifest: &Value, ns: &str) -> Api<DynamicObject> {
    let kind = manifest["kind"].as_str().expect("manifest with a kind");
    let resource = resource(kind);
    if kind == "GpuCluster" {
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    }
}

fn object(manifest: &Value) -> DynamicObject {
    serde_json::from_value(manifest.clone()).expect("manifest is an object")
}

fn cluster(name: &str) -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {"name": name},
        "spec": {
            "gpu": {"minTier": "A100", "minMemoryMib": 40960},
            "workers": 2,
            "gpusPerWorker": 8,
            "duration": "2h",
            "maxPricePerGpuHour": 2_500_000,
            "location": {"region": "eu-west", "zone": "eu-west-1a"},
            "minReputation": 600,
            "placement": "Pack",
            "perWorker": {"cpuMillicores": 8000, "memoryMib": 65536},
            "ray": {"version": "2.41.0", "headGpus": 0},
            "payment": {"buyerWallet": WALLET},
        },
    })
}

fn offer(name: &str) -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "metadata": {"name": name},
        "spec": {
            "nodeName": name,
            "wallet": WALLET,
            "gpus": [{"uuid": "GPU-0", "model": "H100", "memoryMib": 81920}],
            "pricePerGpuHour": 2_200_000,
            "region": "eu-west",
            "zone": "eu-west-1a",
            "allocatable": {"cpuMillicores": 64_000, "memoryBytes": 549_755_813_888u64},
        },
    })
}

fn lease(name: &str) -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuLease",
        "metadata": {"name": name},
        "spec": {
            "cluster": {"namespace": "default", "name": "llm", "uid": CLUSTER_UID},
            "offer": "gpu-node-1",
            "supplierWallet": OTHER_WALLET,
            "gpus": ["GPU-0", "GPU-1"],
            "workers": 1,
            "pricePerGpuHour": 2_200_000,
            "workerResources": {"cpuMillicores": 16_000, "memoryBytes": 137_438_953_472u64},
            "startTime": "2026-01-01T00:00:00Z",
        },
    })
}

fn policy() -> Value {
    json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "MarketPolicy",
        "metadata": {"name": "default"},
        "spec": {
            "acceptedModels": [{"model": "H100", "tier": "H100", "relativeThroughputPermille": 1000}],
            "minStakePerGpu": [{"tier": "H100", "amount": 5_000_000}],
            "slashPermille": 100,
            "depositMarginPercent": 10,
            "settlementPeriod": "1h",
            "heartbeatTimeout": "2m",
            "provisioningTimeout": "10m",
            "requireSignedOffers": true,
            "marketFeePermille": 20,
            "verificationInterval": "1h",
            "failedChallengesBeforeUnverified": 2,
        },
    })
}

/// Set the value at a `/`-separated path (creating objects on the way).
fn with(mut manifest: Value, path: &str, value: Value) -> Value {
    let mut target = &mut manifest;
    let keys: Vec<&str> = path.split('/').collect();
    for key in &keys[..keys.len() - 1] {
        target = match key.parse::<usize>() {
            Ok(i) => &mut target[i],
            Err(_) => &mut target[*key],
        };
    }
    let last = keys[keys.len() - 1];
    match last.parse::<usize>() {
        Ok(i) => target[i] = value,
        Err(_) => target[last] = value,
    }
    manifest
}

fn without(mut manifest: Value, path: &str) -> Value {
    let (parent, key) = path.rsplit_once('/').expect("a path with a parent");
    let mut target = &mut manifest;
    for k in parent.split('/') {
        target = &mut target[k];
    }
    target.as_object_mut().expect("an object").remove(key);
    manifest
}

/// The message of the API server's refusal (panics if the request was accepted).
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "refused as Invalid: {status:?}");
            status.message
        }
        other => panic!("expected a 422 refusal, got {other:?}"),
    }
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

/// Every gpumarket object in `examples/*.yaml` (multi-document files), with its file.
fn example_manifests() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("readable examples/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut manifests = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable example");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
            let gpumarket =
                value["apiVersion"].as_str().is_some_and(|v| v.starts_with("gpumarket.io/"));
            if gpumarket {
                manifests.push((file.clone(), value));
            }
        }
    }
    manifests
}

#[tokio::test]
async fn every_example_is_accepted() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("cel-examples").await.unwrap();
    let examples = example_manifests();
    for kind in ["GpuCluster", "GpuOffer", "MarketPolicy"] {
        assert!(examples.iter().any(|(_, m)| m["kind"] == kind), "examples/ has a {kind}");
    }
    for (file, manifest) in examples {
        // Namespaced examples say `default`; apply them in the test's namespace.
        let manifest = if manifest["kind"] == "GpuCluster" {
            with(manifest, "metadata/namespace", json!(ns))
        } else {
            manifest
        };
        let name = manifest["metadata"]["name"].as_str().expect("named example").to_string();
        let api = api_for(&client, &manifest, &ns);
        let apply = PatchParams::apply("cel-test").dry_run();
        if let Err(e) = api.patch(&name, &apply, &Patch::Apply(object(&manifest))).await {
            panic!("{} ({name}) refused: {e}", file.display());
        }
    }
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_their_message() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("cel-invalid").await.unwrap();
    let c = || cluster("c");
    let o = || offer("node-1");
    let l = || lease("l");
    let p = policy;
    let cases: Vec<(&str, Value, &str)> = vec![
        // GpuCluster
        (
            "models and minTier",
            with(c(), "spec/gpu/models", json!(["H100"])),
            "set exactly one of spec.gpu.models",
        ),
        (
            "neither models nor minTier",
            without(c(), "spec/gpu/minTier"),
            "set exactly one of spec.gpu.models",
        ),
        (
            "no models",
            with(without(c(), "spec/gpu/minTier"), "spec/gpu/models", json!([])),
            "spec.gpu.models must list 1 to 16",
        ),
        (
            "bad model name",
            with(without(c(), "spec/gpu/minTier"), "spec/gpu/models", json!(["H 100"])),
            "spec.gpu.models must list 1 to 16",
        ),
        (
            "no workers",
            with(c(), "spec/workers", json!(0)),
            "spec.workers must be between 1 and 1024",
        ),
        (
            "too many workers",
            with(c(), "spec/workers", json!(1025)),
            "spec.workers must be between 1 and 1024",
        ),
        (
            "no GPUs per worker",
            with(c(), "spec/gpusPerWorker", json!(0)),
            "spec.gpusPerWorker must be between 1 and 16",
        ),
        (
            "17 GPUs per worker",
            with(c(), "spec/gpusPerWorker", json!(17)),
            "spec.gpusPerWorker must be between 1 and 16",
        ),
        (
            "too short",
            with(c(), "spec/duration", json!("5m")),
            "spec.duration must be between 10m and 2160h",
        ),
        (
            "too long",
            with(c(), "spec/duration", json!("2161h")),
            "spec.duration must be between 10m and 2160h",
        ),
        (
            "days",
            with(c(), "spec/duration", json!("2d")),
            "spec.duration must be between 10m and 2160h",
        ),
        (
            "free",
            with(c(), "spec/maxPricePerGpuHour", json!(0)),
            "spec.maxPricePerGpuHour must be greater than 0",
        ),
        (
            "reputation above 1000",
            with(c(), "spec/minReputation", json!(1001)),
            "spec.minReputation is a score from 0 to 1000",
        ),
        (
            "upper-case region",
            with(c(), "spec/location/region", json!("EU-West")),
            "spec.location.region must be lower-case",
        ),
        (
            "zone with a space",
            with(c(), "spec/location/zone", json!("eu west")),
            "spec.location.zone must be lower-case",
        ),
        (
            "Ray version",
            with(c(), "spec/ray/version", json!("latest")),
            "spec.ray.version must be a Ray release",
        ),
        (
            "a GPU head",
            with(c(), "spec/ray/headGpus", json!(1)),
            "spec.ray.headGpus must be 0: the Ray head runs on CPU",
        ),
        (
            "buyer wallet not base-58",
            with(c(), "spec/payment/buyerWallet", json!("0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl")),
            "spec.payment.buyerWallet must be a base-58 Solana public key",
        ),
        (
            "payment mint not base-58",
            with(c(), "spec/payment/mint", json!("not-a-mint")),
            "spec.payment.mint must be a base-58 Solana public key",
        ),
        (
            "price of i64::MAX",
            with(c(), "spec/maxPricePerGpuHour", json!(PRICE_I64_MAX)),
            "spec.maxPricePerGpuHour must be greater than 0 and at most 100000000000",
        ),
        (
            "price one above the bound",
            with(c(), "spec/maxPricePerGpuHour", json!(100_000_000_001u64)),
            "spec.maxPricePerGpuHour must be greater than 0 and at most 100000000000",
        ),
        (
            "workers beyond u32",
            with(c(), "spec/workers", json!(5_000_000_000u64)),
            "spec.workers must be between 1 and 1024",
        ),
        (
            "memory above 1 TiB",
            with(c(), "spec/gpu/minMemoryMib", json!(1_048_577)),
            "spec.gpu.minMemoryMib is in MiB and at most 1048576",
        ),
        (
            "54-character name",
            with(c(), "metadata/name", json!("a".repeat(54))),
            "which KubeRay limits to 53 characters: rename the GpuCluster",
        ),
        (
            "dotted name",
            with(c(), "metadata/name", json!("llm.finetune")),
            "must be a DNS-1035 label: rename it",
        ),
        (
            "name starting with a digit",
            with(c(), "metadata/name", json!("1llm")),
            "must be a DNS-1035 label: rename it",
        ),
        (
            "image with a space",
            with(c(), "spec/ray/image", json!("rayproject/ray:2.41.0 --privileged")),
            "spec.ray.image must be a container image reference",
        ),
        (
            "image too long",
            with(c(), "spec/ray/image", json!(format!("r/{}", "a".repeat(511)))),
            "spec.ray.image: Too long",
        ),
        (
            "env name starting with a digit",
            with(c(), "spec/ray/worker/env", json!([{"name": "1VAR", "value": "x"}])),
            "spec.ray.worker.env[].name must be letters, digits",
        ),
        (
            "env name with a space",
            with(c(), "spec/ray/worker/env", json!([{"name": "NCCL DEBUG", "value": "x"}])),
            "spec.ray.worker.env[].name must be letters, digits",
        ),
        (
            "env from a secret",
            with(
                c(),
                "spec/ray/worker/env",
                json!([{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]),
            ),
            "spec.ray.worker.env cannot use valueFrom.secretKeyRef: workers run on supplier machines",
        ),
        (
            "65 env vars",
            with(
                c(),
                "spec/ray/worker/env",
                json!((0..65).map(|i| json!({"name": format!("V{i}"), "value": "x"})).collect::<Vec<_>>()),
            ),
            "Too many",
        ),
        (
            "head memory 2Gx",
            with(c(), "spec/ray/headResources", json!({"requests": {"memory": "2Gx"}})),
            "spec.ray.headResources limits and requests must be Kubernetes quantities",
        ),
        (
            "negative head CPU",
            with(c(), "spec/ray/headResources", json!({"limits": {"cpu": -1}})),
            "spec.ray.headResources limits and requests must be Kubernetes quantities",
        ),
        (
            "worker CPU lots",
            with(c(), "spec/ray/worker/resources", json!({"limits": {"cpu": "lots"}})),
            "spec.ray.worker.resources limits and requests must be Kubernetes quantities",
        ),
        (
            "negative worker memory",
            with(c(), "spec/ray/worker/resources", json!({"requests": {"memory": "-1Gi"}})),
            "spec.ray.worker.resources limits and requests must be Kubernetes quantities",
        ),
        (
            "17 worker resources",
            with(
                c(),
                "spec/ray/worker/resources",
                json!({"limits": (0..17).map(|i| (format!("example.com/r{i}"), json!("1"))).collect::<serde_json::Map<_, _>>()}),
            ),
            "Too many",
        ),
        (
            "ray start parameter with dashes",
            with(c(), "spec/ray/worker/rayStartParams", json!({"--num-cpus": "4"})),
            "spec.ray.worker.rayStartParams keys must be ray start options",
        ),
        // GpuOffer
        (
            "offer not named after its node",
            with(o(), "metadata/name", json!("node-2")),
            "a GpuOffer is named after its node",
        ),
        (
            "offer wallet",
            with(o(), "spec/wallet", json!("not-a-wallet")),
            "spec.wallet must be a base-58 Solana public key",
        ),
        (
            "offer free",
            with(o(), "spec/pricePerGpuHour", json!(0)),
            "spec.pricePerGpuHour must be greater than 0",
        ),
        (
            "offer price of i64::MAX",
            with(o(), "spec/pricePerGpuHour", json!(PRICE_I64_MAX)),
            "spec.pricePerGpuHour must be greater than 0 and at most 100000000000",
        ),
        (
            "offer price negative",
            with(o(), "spec/pricePerGpuHour", json!(-1)),
            "should be greater than or equal to 0",
        ),
        (
            "offer region",
            with(o(), "spec/region", json!("eu_west")),
            "spec.region must be lower-case",
        ),
        ("offer zone", with(o(), "spec/zone", json!("-eu")), "spec.zone must be lower-case"),
        (
            "GPU without uuid",
            with(o(), "spec/gpus/0/uuid", json!("")),
            "gpus[].uuid must be the device's NVML uuid",
        ),
        (
            "GPU uuid ../etc",
            with(o(), "spec/gpus/0/uuid", json!("../etc")),
            "gpus[].uuid must be the device's NVML uuid",
        ),
        (
            "GPU uuid with a path",
            with(o(), "spec/gpus/0/uuid", json!("GPU-../etc")),
            "gpus[].uuid must be the device's NVML uuid",
        ),
        (
            "GPU uuid too long",
            with(o(), "spec/gpus/0/uuid", json!(format!("GPU-{}", "a".repeat(125)))),
            "Too long",
        ),
        (
            "65 GPUs",
            with(
                o(),
                "spec/gpus",
                json!((0..65).map(|i| json!({"uuid": format!("GPU-{i}"), "model": "H100", "memoryMib": 81920})).collect::<Vec<_>>()),
            ),
            "Too many",
        ),
        (
            "GPU memory above 1 TiB",
            with(o(), "spec/gpus/0/memoryMib", json!(2_000_000)),
            "gpus[].memoryMib must be greater than 0 and at most 1048576",
        ),
        (
            "driver version too long",
            with(o(), "spec/driverVersion", json!("5".repeat(65))),
            "Too long",
        ),
        (
            "GPU model",
            with(o(), "spec/gpus/0/model", json!("H 100")),
            "gpus[].model must be a model name",
        ),
        (
            "GPU without memory",
            with(o(), "spec/gpus/0/memoryMib", json!(0)),
            "gpus[].memoryMib must be greater than 0",
        ),
        // GpuLease
        (
            "lease without offer",
            with(l(), "spec/offer", json!("")),
            "spec.offer must name a GpuOffer",
        ),
        (
            "lease wallet",
            with(l(), "spec/supplierWallet", json!("0x1234")),
            "spec.supplierWallet must be a base-58 Solana public key",
        ),
        (
            "lease without GPUs",
            with(l(), "spec/gpus", json!([])),
            "spec.gpus must name at least one GPU",
        ),
        (
            "lease without workers",
            with(l(), "spec/workers", json!(0)),
            "spec.workers must be at least 1",
        ),
        (
            "lease free",
            with(l(), "spec/pricePerGpuHour", json!(0)),
            "spec.pricePerGpuHour must be greater than 0",
        ),
        (
            "lease workers beyond u32",
            with(l(), "spec/workers", json!(5_000_000_000u64)),
            "spec.workers must be at least 1 and at most 64",
        ),
        (
            "negative lease price",
            with(l(), "spec/pricePerGpuHour", json!(-1)),
            "should be greater than or equal to 0",
        ),
        (
            "lease price of i64::MAX",
            with(l(), "spec/pricePerGpuHour", json!(PRICE_I64_MAX)),
            "spec.pricePerGpuHour must be greater than 0 and at most 100000000000",
        ),
        (
            "lease GPU uuid ../etc",
            with(l(), "spec/gpus", json!(["GPU-0", "../etc"])),
            "spec.gpus[] must be NVML uuids",
        ),
        (
            "lease cluster uid of any shape",
            with(l(), "spec/cluster/uid", json!("0a1b2c3d")),
            "spec.cluster.uid must be the GpuCluster's metadata.uid",
        ),
        // CPU and memory: published by offers, asked per worker, given by leases.
        (
            "offer without CPU",
            with(o(), "spec/allocatable/cpuMillicores", json!(0)),
            "cpuMillicores must be between 1 and 4096000 (4096 cores)",
        ),
        (
            "offer with more than 64 TiB",
            with(o(), "spec/allocatable/memoryBytes", json!(70_368_744_177_665u64)),
            "memoryBytes must be between 1 and 70368744177664 (64 TiB)",
        ),
        (
            "offer with CPU but no memory",
            without(o(), "spec/allocatable/memoryBytes"),
            "spec.allocatable.memoryBytes: Required value",
        ),
        (
            "worker asking for no CPU",
            with(c(), "spec/perWorker/cpuMillicores", json!(0)),
            "spec.perWorker.cpuMillicores must be between 1 and 4096000",
        ),
        (
            "worker asking for more than 4096 cores",
            with(c(), "spec/perWorker/cpuMillicores", json!(4_096_001)),
            "spec.perWorker.cpuMillicores must be between 1 and 4096000",
        ),
        (
            "worker asking for more than 64 TiB",
            with(c(), "spec/perWorker/memoryMib", json!(67_108_865)),
            "spec.perWorker.memoryMib must be between 1 and 67108864 (64 TiB)",
        ),
        (
            "lease worker with more than 4096 cores",
            with(l(), "spec/workerResources/cpuMillicores", json!(4_096_001)),
            "cpuMillicores must be between 1 and 4096000 (4096 cores)",
        ),
        (
            "lease worker without memory",
            with(l(), "spec/workerResources/memoryBytes", json!(0)),
            "memoryBytes must be between 1 and 70368744177664 (64 TiB)",
        ),
        (
            "lease cluster namespace too long",
            with(l(), "spec/cluster/namespace", json!("n".repeat(64))),
            "Too long",
        ),
        (
            "offer signature that is not base-58",
            with(o(), "spec/signature", json!("0".repeat(88))),
            "spec.signature must be a base-58 ed25519 signature",
        ),
        // MarketPolicy
        (
            "a second policy",
            with(p(), "metadata/name", json!("strict")),
            "a market has one MarketPolicy, named default",
        ),
        ("slashing more than all", with(p(), "spec/slashPermille", json!(1001)), "spec.slashPermille is a share per mille"),
        ("fee above half", with(p(), "spec/marketFeePermille", json!(501)), "spec.marketFeePermille must be between 0 and 500"),
        ("deposit margin of 1001 %", with(p(), "spec/depositMarginPercent", json!(1001)), "spec.depositMarginPercent must be between 0 and 1000"),
        ("heartbeat timeout of 1s", with(p(), "spec/heartbeatTimeout", json!("1s")), "spec.heartbeatTimeout must be between 2s and 1h"),
        ("settlement period not a duration", with(p(), "spec/settlementPeriod", json!("hourly")), "spec.settlementPeriod must be between 10s and 720h"),
        ("provisioning timeout of two days", with(p(), "spec/provisioningTimeout", json!("48h")), "spec.provisioningTimeout must be between 10s and 24h"),
        ("challenges every second", with(p(), "spec/verificationInterval", json!("1s")), "spec.verificationInterval must be between 10s and 720h"),
        ("no failure allowed at all", with(p(), "spec/failedChallengesBeforeUnverified", json!(0)), "spec.failedChallengesBeforeUnverified must be between 1 and 100"),
        (
            "a model accepted twice",
            with(
                p(),
                "spec/acceptedModels",
                json!([
                    {"model": "H100", "tier": "H100", "relativeThroughputPermille": 1000},
                    {"model": "H100", "tier": "A100", "relativeThroughputPermille": 300},
                ]),
            ),
            "spec.acceptedModels lists a model twice",
        ),
        (
            "a model without throughput",
            with(p(), "spec/acceptedModels/0/relativeThroughputPermille", json!(0)),
            "acceptedModels[].relativeThroughputPermille must be between 1 and 100000",
        ),
        (
            "a tier staked twice",
            with(
                p(),
                "spec/minStakePerGpu",
                json!([{"tier": "H100", "amount": 5}, {"tier": "H100", "amount": 1}]),
            ),
            "spec.minStakePerGpu lists a tier twice",
        ),
        ("a tier that is none", with(p(), "spec/minStakePerGpu/0/tier", json!("TPU")), "Unsupported value"),
    ];
    // The valid bases pass, so each refusal below is down to its one change.
    for base in [c(), o(), l(), p()] {
        api_for(&client, &base, &ns).create(&dry_run(), &object(&base)).await.unwrap();
    }
    let mut failures = Vec::new();
    for (case, manifest, expected) in cases {
        let result = api_for(&client, &manifest, &ns).create(&dry_run(), &object(&manifest)).await;
        match result {
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains(expected) => {}
            other => failures
                .push(format!("{case}: expected a refusal with {expected:?}, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn cluster_spec_is_frozen_once_matched_and_buyer_wallet_is_immutable() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("cel-cluster-update").await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource("GpuCluster"));
    let manifest = cluster("frozen");
    api.create(&PostParams::default(), &object(&manifest)).await.unwrap();
    let merge = |patch: Value| Patch::Merge(patch);
    let params = PatchParams::default();

    // Pending: the buyer may still change the request.
    api.patch("frozen", &params, &merge(json!({"spec": {"workers": 3}}))).await.unwrap();
    let message = refusal(
        api.patch(
            "frozen",
            &params,
            &merge(json!({"spec": {"payment": {"buyerWallet": OTHER_WALLET}}})),
        )
        .await,
    );
    assert!(message.contains("spec.payment.buyerWallet is immutable"), "{message}");
    // The escrow is an account of the cluster's mint: naming one later, or another, is refused.
    let mint = |mint: &str| merge(json!({"spec": {"payment": {"mint": mint}}}));
    let added = refusal(api.patch("frozen", &params, &mint(WALLET)).await);
    assert!(added.contains("spec.payment.mint is immutable"), "{added}");
    let mut named = cluster("frozen-mint");
    named["spec"]["payment"]["mint"] = json!(WALLET);
    api.create(&PostParams::default(), &object(&named)).await.unwrap();
    let changed = refusal(api.patch("frozen-mint", &params, &mint(OTHER_WALLET)).await);
    assert!(changed.contains("spec.payment.mint is immutable"), "{changed}");

    // Matched (the controller's status write): the request is frozen, Ray settings are not.
    api.patch_status("frozen", &params, &merge(json!({"status": {"phase": "Running"}})))
        .await
        .unwrap();
    let fields = [
        "workers",
        "gpusPerWorker",
        "gpu",
        "maxPricePerGpuHour",
        "duration",
        "location",
        "minReputation",
        "placement",
        "perWorker",
    ];
    for (field, change) in fields.into_iter().zip([
        json!({"workers": 4}),
        json!({"gpusPerWorker": 4}),
        json!({"gpu": {"minTier": "H100"}}),
        json!({"maxPricePerGpuHour": 3_000_000}),
        json!({"duration": "3h"}),
        json!({"location": {"region": "us-east", "zone": null}}),
        json!({"minReputation": 700}),
        json!({"placement": "Spread"}),
        json!({"perWorker": {"cpuMillicores": 4000}}),
    ]) {
        let message = refusal(api.patch("frozen", &params, &merge(json!({"spec": change}))).await);
        assert!(
            message.contains(&format!("spec.{field} cannot change once the cluster is matched")),
            "{change}: {message}"
        );
        // Each refusal names the field that changed, and only that one.
        for other in fields.iter().filter(|f| **f != field) {
            assert!(
                !message.contains(&format!("spec.{other} cannot change")),
                "{change}: {message}"
            );
        }
    }
    // Removing the location is a change too.
    let message =
        refusal(api.patch("frozen", &params, &merge(json!({"spec": {"location": null}}))).await);
    assert!(message.contains("spec.location cannot change"), "{message}");
    let message =
        refusal(api.patch("frozen", &params, &merge(json!({"spec": {"perWorker": null}}))).await);
    assert!(message.contains("spec.perWorker cannot change"), "{message}");
    api.patch("frozen", &params, &merge(json!({"spec": {"ray": {"version": "2.42.0"}}})))
        .await
        .unwrap();
}

#[tokio::test]
async fn offer_node_and_lease_spec_are_immutable() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let offers: Api<DynamicObject> = Api::all_with(client.clone(), &resource("GpuOffer"));
    let leases: Api<DynamicObject> = Api::all_with(client, &resource("GpuLease"));
    let params = PatchParams::default();
    let name = format!("cel-immutable-{}", std::process::id());

    offers.create(&PostParams::default(), &object(&offer(&name))).await.unwrap();
    offers
        .patch(&name, &params, &Patch::Merge(json!({"spec": {"pricePerGpuHour": 1_900_000}})))
        .await
        .unwrap();
    let message = refusal(
        offers
            .patch(&name, &params, &Patch::Merge(json!({"spec": {"nodeName": "elsewhere"}})))
            .await,
    );
    assert!(message.contains("spec.nodeName is immutable"), "{message}");

    leases.create(&PostParams::default(), &object(&lease(&name))).await.unwrap();
    leases
        .patch_status(&name, &params, &Patch::Merge(json!({"status": {"phase": "Active"}})))
        .await
        .unwrap();
    let message =
        refusal(leases.patch(&name, &params, &Patch::Merge(json!({"spec": {"workers": 2}}))).await);
    assert!(message.contains("a GpuLease spec is immutable"), "{message}");

    offers.delete(&name, &Default::default()).await.unwrap();
    leases.delete(&name, &Default::default()).await.unwrap();
}

#[tokio::test]
async fn writes_that_would_not_fit_the_types_are_refused_and_every_list_still_reads() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let leases: Api<DynamicObject> = Api::all_with(client.clone(), &resource("GpuLease"));
    let offers: Api<DynamicObject> = Api::all_with(client.clone(), &resource("GpuOffer"));
    let params = PatchParams::default();
    let name = format!("cel-lists-{}", std::process::id());
    let through = "2026-01-01T01:00:00Z";

    for bad in [
        with(lease(&name), "spec/workers", json!(5_000_000_000u64)),
        with(lease(&name), "spec/pricePerGpuHour", json!(-1)),
        with(lease(&name), "spec/pricePerGpuHour", json!(PRICE_I64_MAX)),
    ] {
        refusal(leases.create(&PostParams::default(), &object(&bad)).await);
    }
    leases.create(&PostParams::default(), &object(&lease(&name))).await.unwrap();
    let pod =
        |i: usize| json!({"namespace": "ns", "name": format!("w-{i}"), "uid": "u", "ready": true});
    for status in [
        json!({"hiredGpuSeconds": -5}),
        json!({"servedGpuSeconds": u64::MAX}),
        json!({"amountSettled": -1}),
        json!({"pods": (0..65).map(pod).collect::<Vec<_>>()}),
        json!({"settlements": [{"period": "0001", "through": through, "amount": -1, "state": "Signed"}]}),
        json!({"compacted": {"records": -1, "lastPeriod": "0001", "through": through, "amount": 0}}),
    ] {
        let patch = Patch::Merge(json!({"status": status}));
        let message = refusal(leases.patch_status(&name, &params, &patch).await);
        assert!(!message.is_empty(), "{status}");
    }

    offers.create(&PostParams::default(), &object(&offer(&name))).await.unwrap();
    let condition = |i: usize| {
        json!({"type": format!("T{i}"), "status": "True", "reason": "R", "message": "m",
               "lastTransitionTime": through})
    };
    for status in [
        json!({"freeGpus": 5_000_000_000u64}),
        json!({"reputation": {"uptimePermille": 1001, "leasesCompleted": 0, "leasesFailed": 0, "score": 0}}),
        json!({"reputation": {"uptimePermille": 0, "leasesCompleted": -1, "leasesFailed": 0, "score": 0}}),
        json!({"gpus": [{"uuid": "../etc", "health": "Healthy"}]}),
        json!({"conditions": (0..17).map(condition).collect::<Vec<_>>()}),
        json!({"stake": {"account": WALLET, "bonded": -1}}),
    ] {
        let patch = Patch::Merge(json!({"status": status}));
        let message = refusal(offers.patch_status(&name, &params, &patch).await);
        assert!(!message.is_empty(), "{status}");
    }

    // Every object stored is one the controller can read: typed lists deserialize.
    let typed_leases = Api::<GpuLease>::all(client.clone()).list(&ListParams::default()).await;
    let typed_leases = typed_leases.expect("every GpuLease deserializes");
    assert!(typed_leases.items.iter().any(|l| l.metadata.name.as_deref() == Some(name.as_str())));
    let typed_offers = Api::<GpuOffer>::all(client.clone()).list(&ListParams::default()).await;
    assert!(
        typed_offers
            .expect("every GpuOffer deserializes")
            .items
            .iter()
            .any(|o| o.spec.node_name == name)
    );
    Api::<GpuCluster>::all(client)
        .list(&ListParams::default())
        .await
        .expect("every GpuCluster deserializes");

    offers.delete(&name, &Default::default()).await.unwrap();
    leases.delete(&name, &Default::default()).await.unwrap();
}

/// A fleet's report is the buyer's access point: only an http(s) dashboard and a ray:// client
/// address, host and port, are accepted.
#[tokio::test]
async fn a_fleets_access_point_is_an_address_and_nothing_else() {
    let env = Env::shared().await;
    let fleets: Api<GpuFleet> = Api::all(env.client().await.unwrap());
    let fleet: GpuFleet = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuFleet",
        "metadata": {"name": "cel-access"}, "spec": {"wallet": WALLET},
    }))
    .unwrap();
    fleets.create(&PostParams::default(), &fleet).await.unwrap();
    let report = |dashboard: &str, client: &str| {
        Patch::Merge(json!({"status": {"workloads": [{"lease": "l", "workers": 1,
            "readyWorkers": 1, "headReady": true,
            "access": {"dashboard": dashboard, "rayClient": client}}]}}))
    };
    let pp = PatchParams::default();
    let ok = report("http://ray-head-u.ray.svc:8265", "ray://ray-head-u.ray.svc:10001");
    fleets.patch_status("cel-access", &pp, &ok).await.unwrap();
    for (dashboard, client, message) in [
        (
            "javascript:alert(1)",
            "ray://h:10001",
            "access.dashboard must be http(s)://<host>[:<port>]",
        ),
        ("http://h:8265/x?y", "ray://h:10001", "access.dashboard must be"),
        ("http://h:8265", "http://h:10001", "access.rayClient must be ray://<host>[:<port>]"),
    ] {
        match fleets.patch_status("cel-access", &pp, &report(dashboard, client)).await {
            Err(kube::Error::Api(e)) => assert!(e.message.contains(message), "{}", e.message),
            other => panic!("{dashboard} {client}: expected a refusal, got {other:?}"),
        }
    }
    fleets.delete("cel-access", &Default::default()).await.unwrap();
}
