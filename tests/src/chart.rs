//! The chart installed for real on the real node, from the local images: the controller (paying
//! through the local validator) and the supplier agent, the kubelet's device plugin for the
//! node's fake GPUs with their CDI spec; or, in fleet mode, the agent of a fleet joining a hub.
//! `examples/values-real-node.yaml` and `examples/values-fleet.yaml` hold the choices a user
//! would make; this adds what only the environment knows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::real_node::NODE_NAME;
use crate::{Env, RealNode, images};

pub const RELEASE: &str = "gpumarket";
pub const NAMESPACE: &str = "gpumarket-system";
/// The chart's default name of the settlement Secret (the authority's keypair, the RPC URL).
const SETTLEMENT_SECRET: &str = "gpumarket-settlement";
/// The supplier's keypair, which its agent signs its offers with.
const WALLET_SECRET: &str = "gpumarket-wallet";
/// A fleet's join credential (a hub kubeconfig), and the CA of the hub tunnel's certificate.
const FLEET_JOIN_SECRET: &str = "gpumarket-fleet-join";
const HUB_TUNNEL_CA_SECRET: &str = "hub-tunnel-ca";

/// Import the controller, agent and Ray images into the real node, then `helm install` the
/// chart: the supplier's offers signed by (and paid to) the keypair file `wallet`, settlement
/// signed by the keypair file `authority`; returns once its pods are Ready.
pub async fn install_on_real_node(env: &Env, wallet: &Path, authority: &Path) -> Result<()> {
    let (node, client) = prepare(env, &["controller", "agent", "ray"]).await?;
    let solana = env.solana().await?;
    // The validator's RPC listens on every address of the host, the bridge's too.
    let rpc_port = solana.rpc_url.rsplit(':').next().context("the RPC URL's port")?;
    let rpc_url = format!("http://{}:{rpc_port}", node.host_address);
    let settlement =
        json!({"keypair.json": std::fs::read_to_string(authority)?, "rpc-url": rpc_url});
    create_secret(&client, SETTLEMENT_SECRET, settlement).await?;
    let keypair = json!({"keypair.json": std::fs::read_to_string(wallet)?});
    create_secret(&client, WALLET_SECRET, keypair).await?;

    let kubelet = env.dir().join("real-node/kubelet");
    let fake_gpus = node.fake_gpu_root.display().to_string();
    let overrides = json!({
        "settlement": {"mint": solana.mint.to_string()},
        // Ray heads really run only here; KWOK nodes beside it would only pretend to.
        "controller": {"rayHead": {"nodeSelector": {"kubernetes.io/hostname": NODE_NAME}}},
        "agent": {
            "walletKeypairSecret": WALLET_SECRET,
            "source": format!("fake:{}", node.fake_gpus.display()),
            "cdiSpecDir": node.cdi_spec_dir,
            "kubeletPodResourcesDir": kubelet.join("pod-resources"),
            "extraVolumes": [{"name": "fake-gpus", "hostPath": {"path": fake_gpus, "type": "Directory"}}],
            "extraVolumeMounts": [{"name": "fake-gpus", "mountPath": fake_gpus, "readOnly": true}],
        },
    });
    helm_install(env, &client, "values-real-node.yaml", &overrides, &[]).await
}

/// What a fleet's operator has from the hub's admin to join it (README, "Fleets").
pub struct FleetJoin {
    /// The fleet's GpuFleet on the hub.
    pub name: String,
    /// A kubeconfig of the hub whose user is the fleet's join credential, as the fleet's pods
    /// reach the hub.
    pub hub_kubeconfig: String,
    /// The keypair file of the GpuFleet's wallet, which signs the fleet's offers.
    pub wallet: PathBuf,
    /// The hub's tunnel endpoint and the CA certificate (PEM) of its certificate.
    pub hub_tunnel: (String, String),
    /// The fleet's price for an H100-hour, and its region.
    pub price: u64,
    pub region: String,
}

/// Import the agent and Ray images into the real node, then `helm install` the chart in fleet
/// mode (`examples/values-fleet.yaml`, `--skip-crds`) as a fleet's operator does, joining the
/// hub as `join` says; returns once the fleet's agent is Ready, with when `helm install` began
/// (after the images' import).
pub async fn install_fleet_on_real_node(env: &Env, join: &FleetJoin) -> Result<Instant> {
    let (_, client) = prepare(env, &["agent", "ray"]).await?;
    create_secret(&client, FLEET_JOIN_SECRET, json!({"kubeconfig": join.hub_kubeconfig})).await?;
    let keypair = json!({"keypair.json": std::fs::read_to_string(&join.wallet)?});
    create_secret(&client, WALLET_SECRET, keypair).await?;
    create_secret(&client, HUB_TUNNEL_CA_SECRET, json!({"ca.crt": join.hub_tunnel.1})).await?;
    let overrides = json!({
        "fleet": {
            "name": join.name,
            "joinSecret": FLEET_JOIN_SECRET,
            "hubTunnel": join.hub_tunnel.0,
            "hubTunnelCASecret": HUB_TUNNEL_CA_SECRET,
            "workloadCheck": "1s",
        },
        "agent": {
            "walletKeypairSecret": WALLET_SECRET,
            "prices": {"H100": join.price},
            "region": join.region,
            "heartbeatInterval": "2s",
        },
    });
    let began = Instant::now();
    helm_install(env, &client, "values-fleet.yaml", &overrides, &["--skip-crds"]).await?;
    Ok(began)
}

/// The real node, with `images` imported into it, and the chart's namespace created.
async fn prepare<'a>(env: &'a Env, images: &[&str]) -> Result<(&'a RealNode, kube::Client)> {
    let node = env.real_node().context("the chart is installed on the real node: start one")?;
    for image in images {
        node.import_image(env.tools(), &images::build(env.tools(), image)?)?;
    }
    let client = env.client().await?;
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    Ok((node, client))
}

/// `helm install` of the chart into [`NAMESPACE`] with the example values file `example`,
/// then `overrides` (what only the environment knows), and `args`; returns once its pods are
/// Ready, or says why they are not.
async fn helm_install(
    env: &Env,
    client: &kube::Client,
    example: &str,
    overrides: &serde_json::Value,
    args: &[&str],
) -> Result<()> {
    let overrides_file = env.dir().join("values-environment.yaml");
    std::fs::write(&overrides_file, serde_yaml::to_string(overrides)?)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = env
        .tools()
        .command("helm")?
        .args(["install", RELEASE])
        .arg(repo.join("charts/gpumarket"))
        .args(["--namespace", NAMESPACE, "--wait", "--timeout", "10m", "--kubeconfig"])
        .arg(env.kubeconfig())
        .arg("-f")
        .arg(repo.join("examples").join(example))
        .arg("-f")
        .arg(&overrides_file)
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "helm install: {}{}\nthe release's pods and events:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            pods_and_events(client).await
        );
    }
    Ok(())
}

/// Why the release is not Ready, as `kubectl describe` would tell: each pod's phase and its
/// containers' states, then the namespace's Events (scheduling, image, probe failures).
async fn pods_and_events(client: &kube::Client) -> String {
    let mut lines = Vec::new();
    match Api::<Pod>::namespaced(client.clone(), NAMESPACE).list(&ListParams::default()).await {
        Ok(pods) => lines.extend(pods.items.iter().map(describe_pod)),
        Err(e) => lines.push(format!("listing pods: {e}")),
    }
    match Api::<Event>::namespaced(client.clone(), NAMESPACE).list(&ListParams::default()).await {
        Ok(events) => lines.extend(events.items.iter().map(|e| {
            let object = &e.involved_object;
            format!(
                "event {} {}/{} x{}: {} {}",
                e.type_.as_deref().unwrap_or_default(),
                object.kind.as_deref().unwrap_or_default(),
                object.name.as_deref().unwrap_or_default(),
                e.count.unwrap_or(1),
                e.reason.as_deref().unwrap_or_default(),
                e.message.as_deref().unwrap_or_default(),
            )
        })),
        Err(e) => lines.push(format!("listing events: {e}")),
    }
    lines.join("\n")
}

fn describe_pod(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let containers = status.container_statuses.unwrap_or_default().into_iter().map(|c| {
        let state = c.state.unwrap_or_default();
        let state = match (state.waiting, state.terminated) {
            (Some(w), _) => format!(
                "waiting {} {}",
                w.reason.unwrap_or_default(),
                w.message.unwrap_or_default()
            ),
            (None, Some(t)) => {
                format!("terminated {} exit {}", t.reason.unwrap_or_default(), t.exit_code)
            }
            (None, None) => "running".to_string(),
        };
        format!("{} ready={} restarts={} {state}", c.name, c.ready, c.restart_count)
    });
    format!(
        "pod {} on {}: {} [{}]",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("(unscheduled)"),
        status.phase.unwrap_or_default(),
        containers.collect::<Vec<_>>().join("; ")
    )
}

/// A Secret of the chart's namespace holding `data` (file name to content).
async fn create_secret(client: &kube::Client, name: &str, data: serde_json::Value) -> Result<()> {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating the Secret {name}"))?;
    Ok(())
}
