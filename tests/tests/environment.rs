//! The local environment itself: KWOK GPU nodes at scale, the real scheduler and garbage
//! collector, KubeRay's CRD (and operator), the Solana validator with the settlement mint, and
//! its supervision: a component killed with SIGKILL is restarted and the market goes on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gpumarket_crds::{ClusterPhase, GpuCluster, GpuLease};
use gpumarket_tests::kwok::{MODEL_LABEL, node_ready_with_gpus};
use gpumarket_tests::solana::{BUYER_TOKENS, MINT_DECIMALS, read_keypair, send_with_retry};
use gpumarket_tests::supplier::Supplier;
use gpumarket_tests::up::Up;
use gpumarket_tests::{Env, GpuNode, eventually};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::json;
use solana_sdk::program_pack::Pack;
use solana_sdk::signature::{Keypair, Signer};
use spl_associated_token_account_interface::instruction::create_associated_token_account_idempotent;
use spl_token_interface::state::{Account as TokenAccount, Mint};

const UP: &str = env!("CARGO_BIN_EXE_gpumarket-env");

const GPU: &str = "nvidia.com/gpu";

fn gpu_pod(name: &str, gpus: u32, node_selector: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": node_selector,
            "containers": [{
                "name": "train",
                "image": "rayproject/ray:2.41.0-gpu",
                "resources": {"limits": {GPU: gpus.to_string()}},
            }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn hundred_gpu_nodes_become_ready_with_allocatable_gpus() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let nodes: Vec<GpuNode> = (0..100)
        .map(|i| {
            let (model, gpus) = match i % 4 {
                0 => ("H100", 8),
                1 => ("A100", 8),
                2 => ("A6000", 4),
                _ => ("RTX4090", 1),
            };
            let region = ["eu-west", "us-east"][i % 2];
            GpuNode::new(&format!("scale-{i:03}"), model, gpus)
                .region(region)
                .zone(&format!("{region}-{}", ["a", "b"][(i / 2) % 2]))
        })
        .collect();
    let started = Instant::now();
    env.add_gpu_nodes(&nodes).await.unwrap();
    eprintln!("100 KWOK GPU nodes Ready in {:.1} s", started.elapsed().as_secs_f64());

    let listed: BTreeMap<String, Node> = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.name_any(), n))
        .collect();
    for expected in &nodes {
        let node = &listed[&expected.name];
        assert!(node_ready_with_gpus(node), "{} Ready with GPUs", expected.name);
        let allocatable = node.status.as_ref().unwrap().allocatable.as_ref().unwrap();
        assert_eq!(allocatable[GPU].0, expected.gpus.to_string(), "{}", expected.name);
        assert_eq!(node.labels()[MODEL_LABEL], expected.model);
        assert_eq!(node.labels()["topology.kubernetes.io/region"], expected.region);
    }
}

#[tokio::test]
async fn scheduler_binds_an_eight_gpu_pod_to_the_h100_node_that_fits_and_kwok_runs_it() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("env-scheduling").await.unwrap();
    env.add_gpu_nodes(&[
        GpuNode::new("sched-h100-8", "H100", 8).region("sched"),
        GpuNode::new("sched-h100-4", "H100", 4).region("sched"),
        GpuNode::new("sched-a100-8", "A100", 8).region("sched"),
    ])
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let selector = json!({MODEL_LABEL: "H100", "topology.kubernetes.io/region": "sched"});

    pods.create(&PostParams::default(), &gpu_pod("train", 8, selector.clone())).await.unwrap();
    let pod = eventually("the pod to run", Duration::from_secs(60), || async {
        let pod = pods.get("train").await.ok()?;
        let phase = pod.status.as_ref()?.phase.clone()?;
        (phase == "Running").then_some(pod)
    })
    .await;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("sched-h100-8"));

    // The only H100 node with 8 GPUs is full now: a second 8-GPU pod cannot be placed.
    pods.create(&PostParams::default(), &gpu_pod("train-2", 8, selector)).await.unwrap();
    let message = eventually(
        "the scheduler to give up on the second pod",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("train-2").await.ok()?;
            let conditions = pod.status?.conditions?;
            let scheduled = conditions.into_iter().find(|c| c.type_ == "PodScheduled")?;
            (scheduled.reason.as_deref() == Some("Unschedulable")).then_some(scheduled.message)
        },
    )
    .await;
    assert!(message.unwrap_or_default().contains("Insufficient nvidia.com/gpu"));
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("env-gc").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client, &ns);
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = maps.create(&PostParams::default(), &owner).await.unwrap();
    let dependent: ConfigMap = serde_json::from_value(json!({"metadata": {
        "name": "dependent",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()}],
    }}))
    .unwrap();
    maps.create(&PostParams::default(), &dependent).await.unwrap();

    maps.delete("owner", &DeleteParams::background()).await.unwrap();
    eventually("the dependent to be collected", Duration::from_secs(60), || async {
        maps.get_opt("dependent").await.unwrap().is_none().then_some(())
    })
    .await;
}

fn ray_cluster(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {
            "rayVersion": "2.41.0",
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {"spec": {"containers": [{
                    "name": "ray-head",
                    "image": "rayproject/ray:2.41.0",
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                }]}},
            },
            "workerGroupSpecs": [{
                "groupName": "gpu",
                "replicas": 2,
                "minReplicas": 2,
                "maxReplicas": 2,
                "rayStartParams": {},
                "template": {"spec": {
                    "nodeSelector": {MODEL_LABEL: "H100", "topology.kubernetes.io/region": "ray"},
                    "containers": [{
                        "name": "ray-worker",
                        "image": "rayproject/ray:2.41.0-gpu",
                        "resources": {"limits": {GPU: "4"}},
                    }],
                }},
            }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn ray_cluster_is_accepted_and_the_kuberay_operator_runs_its_pods() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("env-ray").await.unwrap();
    let ray_clusters: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk("ray.io", "v1", "RayCluster")),
    );
    ray_clusters.create(&PostParams::default(), &ray_cluster("llm")).await.unwrap();

    env.add_gpu_nodes(&[GpuNode::new("ray-h100", "H100", 8).region("ray")]).await.unwrap();
    let mut operator = env.tools().command("kuberay-operator").unwrap();
    operator
        .arg(format!("-kubeconfig={}", env.kubeconfig().display()))
        .arg(format!("-watch-namespace={ns}"))
        .arg("-enable-leader-election=false")
        .arg("-metrics-addr=0")
        .arg("-health-probe-bind-address=0");
    env.spawn("kuberay-operator", operator).unwrap();

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let running =
        eventually("a head and two GPU workers running", Duration::from_secs(120), || async {
            let pods = pods.list(&ListParams::default().labels("ray.io/cluster=llm")).await.ok()?;
            let running: Vec<Pod> = pods
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            (running.len() == 3).then_some(running)
        })
        .await;
    let workers: Vec<&Pod> = running
        .iter()
        .filter(|p| p.labels().get("ray.io/node-type").map(String::as_str) == Some("worker"))
        .collect();
    assert_eq!(workers.len(), 2);
    for worker in workers {
        assert_eq!(worker.spec.as_ref().unwrap().node_name.as_deref(), Some("ray-h100"));
    }
}

#[tokio::test]
async fn validator_has_the_mint_a_funded_buyer_and_supplier_token_accounts() {
    let env = Env::shared().await;
    let sol = env.solana().await.unwrap();
    let rpc = sol.rpc();

    let mint = Mint::unpack(&rpc.get_account_data(&sol.mint).await.unwrap()).unwrap();
    assert_eq!(mint.decimals, MINT_DECIMALS);
    let authority = read_keypair(&sol.mint_authority).unwrap();
    assert_eq!(Option::<_>::from(mint.mint_authority), Some(authority.pubkey()));

    let buyer = read_keypair(&sol.buyer).unwrap().pubkey();
    assert!(rpc.get_balance(&buyer).await.unwrap() > 0, "buyer has SOL for fees");
    let buyer_tokens = rpc.get_token_account_balance(&sol.token_account(&buyer)).await.unwrap();
    assert_eq!(buyer_tokens.amount, BUYER_TOKENS.to_string());
    assert_eq!(buyer_tokens.decimals, MINT_DECIMALS);

    assert_eq!(sol.suppliers.len(), 3);
    for supplier in &sol.suppliers {
        let wallet = read_keypair(supplier).unwrap().pubkey();
        assert!(rpc.get_balance(&wallet).await.unwrap() > 0, "supplier has SOL for fees");
        let data = rpc.get_account_data(&sol.token_account(&wallet)).await.unwrap();
        let account = TokenAccount::unpack(&data).unwrap();
        assert_eq!((account.owner, account.mint), (wallet, sol.mint));
    }
}

#[tokio::test]
async fn transfer_checked_with_a_memo_confirms_and_balances_read_back_exactly() {
    let env = Env::shared().await;
    let sol = env.solana().await.unwrap();
    let rpc = sol.rpc();
    let token = spl_token_interface::id();
    let faucet = read_keypair(&sol.faucet).unwrap();
    let authority = read_keypair(&sol.mint_authority).unwrap();
    let (sender, receiver) = (Keypair::new(), Keypair::new());
    let (from, to) = (sol.token_account(&sender.pubkey()), sol.token_account(&receiver.pubkey()));

    // Token accounts for two new wallets; the sender gets SOL for fees and 5 tokens.
    let setup = vec![
        solana_system_interface::instruction::transfer(
            &faucet.pubkey(),
            &sender.pubkey(),
            1_000_000_000,
        ),
        create_associated_token_account_idempotent(
            &faucet.pubkey(),
            &sender.pubkey(),
            &sol.mint,
            &token,
        ),
        create_associated_token_account_idempotent(
            &faucet.pubkey(),
            &receiver.pubkey(),
            &sol.mint,
            &token,
        ),
        spl_token_interface::instruction::mint_to_checked(
            &token,
            &sol.mint,
            &from,
            &authority.pubkey(),
            &[],
            5_000_000,
            MINT_DECIMALS,
        )
        .unwrap(),
    ];
    send_with_retry(&rpc, &setup, &faucet, &[&faucet, &authority]).await.unwrap();

    let memo = "gpumarket lease test/0: 1.25 tokens";
    let pay = vec![
        spl_token_interface::instruction::transfer_checked(
            &token,
            &from,
            &sol.mint,
            &to,
            &sender.pubkey(),
            &[],
            1_250_000,
            MINT_DECIMALS,
        )
        .unwrap(),
        spl_memo_interface::instruction::build_memo(
            &spl_memo_interface::v3::id(),
            memo.as_bytes(),
            &[&sender.pubkey()],
        ),
    ];
    let signature = send_with_retry(&rpc, &pay, &sender, &[&sender]).await.unwrap();

    let balance = |account| {
        let rpc = &rpc;
        async move { rpc.get_token_account_balance(&account).await.unwrap().amount }
    };
    assert_eq!(balance(from).await, "3750000");
    assert_eq!(balance(to).await, "1250000");
    let status = rpc.get_signature_statuses(&[signature]).await.unwrap().value[0].clone().unwrap();
    assert!(status.err.is_none(), "{status:?}");
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    processes_with_ids_mentioning(needle).into_iter().map(|(_, cmdline)| cmdline).collect()
}

/// The ids and command lines of the processes whose command line mentions `needle`.
fn processes_with_ids_mentioning(needle: &str) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(pid, cmdline)| cmdline.contains(needle) && gpumarket_tests::chaos::alive(*pid))
        .collect()
}

#[tokio::test]
async fn up_serves_until_sigterm_and_leaves_no_process_port_or_directory_behind() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("env");
    let started = Instant::now();
    let mut up = Up::start(UP, scratch.path(), &["--nodes", "h100=1x8,rtx4090=1x1"]).unwrap();
    let env_file = up
        .until("the env file", Duration::from_secs(180), || {
            std::fs::read_to_string(dir.join("env")).ok()
        })
        .await;
    eprintln!("gpumarket-env up ready in {:.1} s", started.elapsed().as_secs_f64());
    let vars: BTreeMap<&str, &str> =
        env_file.lines().filter_map(|line| line.strip_prefix("export ")?.split_once('=')).collect();
    for key in ["KUBECONFIG", "SOLANA_RPC_URL", "GPUMARKET_MINT", "GPUMARKET_BUYER_KEYPAIR"] {
        assert!(vars.contains_key(key), "{key} in the env file:\n{env_file}");
    }

    let kubeconfig = std::path::Path::new(vars["KUBECONFIG"]);
    let client = gpumarket_tests::control_plane::client(kubeconfig).await.unwrap();
    let nodes = Api::<Node>::all(client).list(&ListParams::default()).await.unwrap();
    let ready: Vec<String> =
        nodes.iter().filter(|n| node_ready_with_gpus(n)).map(|n| n.name_any()).collect();
    assert_eq!(ready, ["h100-0", "rtx4090-0"]);
    let rpc = solana_client::nonblocking::rpc_client::RpcClient::new(vars["SOLANA_RPC_URL"].into());
    rpc.get_version().await.unwrap();
    let server = kube::config::Kubeconfig::read_from(kubeconfig).unwrap().clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap();
    let ports: Vec<String> = [server.as_str(), vars["SOLANA_RPC_URL"]]
        .iter()
        .map(|url| url.rsplit_once("127.0.0.1:").unwrap().1.to_string())
        .collect();

    // A component killed with SIGKILL is restarted and the restart shown; up serves on.
    let scheduler = |dir: &str| {
        processes_with_ids_mentioning(dir)
            .into_iter()
            .find(|(_, cmdline)| {
                cmdline.split(' ').next().is_some_and(|p| p.ends_with("kube-scheduler"))
            })
            .map(|(pid, _)| pid)
    };
    let dir_name = dir.display().to_string();
    let killed = scheduler(&dir_name).expect("the scheduler of up's environment");
    std::process::Command::new("kill").args(["-KILL", &killed.to_string()]).status().unwrap();
    let shown = format!("restarting: kube-scheduler (pid {killed}) exited (signal: 9 (SIGKILL))");
    let log = scratch.path().join("up.log");
    up.until("the restart shown", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).ok().filter(|output| output.contains(&shown))
    })
    .await;
    up.until("the scheduler restarted", Duration::from_secs(30), || {
        scheduler(&dir_name).filter(|pid| *pid != killed)
    })
    .await;
    assert!(up.output().contains("restart 1 in 1 s"), "{}", up.output());

    up.stop().await.unwrap();
    assert!(!dir.exists(), "{} removed", dir.display());
    assert_eq!(processes_mentioning(&dir_name), Vec::<String>::new());
    for port in ports {
        let address = format!("127.0.0.1:{port}");
        assert!(std::net::TcpStream::connect(&address).is_err(), "{address} still listening");
    }
}

/// The controller binary of this test's profile (`cargo build -p gpumarket-controller`).
fn controller_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(|deps| deps.parent()).unwrap().join("gpumarket-controller");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build -p gpumarket-controller)",
        binary.display()
    );
    binary
}

/// As a Deployment's pod would be: the controller killed with SIGKILL is reported and started
/// again by the environment, and a GpuCluster applied after the kill is matched.
#[tokio::test]
async fn a_killed_controller_is_restarted_and_the_market_keeps_matching() {
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    let ns = env.namespace("restart").await.unwrap();
    let _supplier = Supplier::start(env, &client, "env-restart-a", "restart", 4, 1_000_000).await;
    let mut controller = std::process::Command::new(controller_binary());
    controller.env("KUBECONFIG", env.kubeconfig()).args([
        "--metrics-addr",
        "127.0.0.1:0",
        "--heartbeat-timeout",
        "30s",
    ]);
    let name = "restart-controller";
    let first = env.spawn_supervised(name, controller).unwrap();
    // Killed once it is at work (past its start-up), as a user would try it on the demo.
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::process::Command::new("kill").args(["-KILL", &first.to_string()]).status().unwrap();

    let exit = eventually("the kill reported", Duration::from_secs(10), || {
        std::future::ready(env.exits().into_iter().find(|e| e.name == name))
    })
    .await;
    assert_eq!(exit.pid, first);
    assert!(exit.status.contains("SIGKILL"), "{exit}");
    assert_eq!(exit.restart, 1, "{exit}");
    assert!(exit.to_string().contains("restart 1 in 1 s"), "{exit}");
    let second = eventually("the controller restarted", Duration::from_secs(10), || {
        std::future::ready(env.pid(name).ok().filter(|pid| *pid != first))
    })
    .await;
    assert!(gpumarket_tests::chaos::alive(second));
    env.ensure_running().unwrap();

    let clusters: Api<GpuCluster> = Api::namespaced(client.clone(), &ns);
    let cluster: GpuCluster = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuCluster",
        "metadata": {"name": "after-the-kill"},
        "spec": {
            "gpu": {"models": ["H100"]},
            "workers": 1,
            "gpusPerWorker": 4,
            "duration": "1h",
            "maxPricePerGpuHour": 5_000_000,
            "location": {"region": "restart"},
            "payment": {"buyerWallet": "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV"},
        },
    }))
    .unwrap();
    clusters.create(&PostParams::default(), &cluster).await.unwrap();
    eventually(
        "the cluster matched by the restarted controller",
        Duration::from_secs(60),
        || async {
            let cluster = clusters.get("after-the-kill").await.ok()?;
            (cluster.status?.phase == Some(ClusterPhase::Provisioning)).then_some(())
        },
    )
    .await;
    let leases = Api::<GpuLease>::all(client).list(&ListParams::default()).await.unwrap();
    assert!(
        leases
            .iter()
            .any(|l| l.spec.offer == "env-restart-a" && l.spec.cluster.name == "after-the-kill"),
        "a lease of the supplier's offer: {:?}",
        leases.iter().map(|l| &l.spec).collect::<Vec<_>>()
    );
    assert_eq!(env.pid(name).unwrap(), second, "not restarted again");
}
