//! Proof of compute against the real API server: the controller (in-process, challenging every
//! few seconds with small matrices and a CPU-sized reference throughput) challenges idle offers
//! of supplier agents (in-process, offer-only, fake device sources). An honest agent is
//! verified; one that answers wrong, late, with an answer computed for another node, or a
//! "64×H100" node that computes at the speed of 64 RTX 3090s, ends with `ComputeVerified`
//! False and its reason in the status. An offer whose GPU is leased is not challenged until the
//! lease is gone.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use solana_sdk::signature::Keypair;
use std::time::Duration;

use gpumarket_controller::market::proof::{ProofSettings, relative_throughput};
use gpumarket_controller::{Config, Settings};
use gpumarket_crds::GpuOffer;
use gpumarket_crds::proof::COMPUTE_VERIFIED;
use gpumarket_device_plugin::agent::{Agent, AgentConfig};
use gpumarket_device_plugin::config::{Mode, Supplier, WalletKey};
use gpumarket_device_plugin::offer::Reserve;
use gpumarket_device_plugin::proof::{PROOF_FIELD_MANAGER, answer, compute};
use gpumarket_device_plugin::registration::PluginSocket;
use gpumarket_device_plugin::source::fake::FakeSource;
use gpumarket_tests::{Env, GpuNode, eventually};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};

const REGION: &str = "poc-west";
const WAIT: Duration = Duration::from_secs(60);
/// Matrices of side 64 (2·64³ = 524288 multiply-adds per GPU) at a reference of 1e6/s: an H100
/// has 0.52 s, an RTX 3090 7.3 s, plus a grace of 3 s for the round trips.
const SETTINGS: ProofSettings = ProofSettings {
    interval: Duration::from_secs(3),
    grace: Duration::from_secs(3),
    reference_ops_per_second: 1_000_000,
    max_dimension: 64,
    failures_before_unverified: 1,
    throughput_permille: std::collections::BTreeMap::new(),
};

/// Tests take turns: every controller watches the whole API server.
static TURN: Mutex<()> = Mutex::const_new(());

async fn setup() -> (MutexGuard<'static, ()>, &'static Env, Client) {
    let turn = TURN.lock().await;
    let env = Env::shared().await;
    let client = env.client().await.unwrap();
    (turn, env, client)
}

/// Aborts the task when dropped: controllers and agents live as long as their test.
struct Running(tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn controller(client: &Client) -> Running {
    let config = Config {
        settings: Settings {
            heartbeat_timeout: Duration::from_secs(5),
            // No lease object backs the claim the lease test writes; it must not be reclaimed.
            orphan_grace: Duration::from_secs(600),
            proof_of_compute: Some(SETTINGS),
            ..Settings::default()
        },
        ..Config::default()
    };
    let client = client.clone();
    Running(tokio::spawn(async move {
        gpumarket_controller::run(client, config).await.expect("controller");
    }))
}

/// A fake node of `gpus` H100s (`GPU-<node>-<i>`) with `challenges` as its fake's knobs.
fn fake(node: &str, gpus: u32, challenges: &str) -> FakeSource {
    let gpus: Vec<String> = (0..gpus)
        .map(|i| {
            format!(
                "  - {{uuid: GPU-{node}-{i}, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}}"
            )
        })
        .collect();
    FakeSource::from_yaml(&format!("gpus:\n{}\n{challenges}", gpus.join("\n"))).unwrap()
}

/// The supplier agent of a new KWOK node `node` of `gpus` H100s (`GPU-<node>-<i>`),
/// offer-only, on a fake source with `challenges` as its knobs.
async fn agent(env: &Env, client: &Client, node: &str, gpus: u32, challenges: &str) -> Running {
    env.add_gpu_nodes(&[GpuNode::new(node, "H100", gpus).region(REGION)]).await.unwrap();
    // Signed, as the controller matches only signed offers.
    let wallet = WalletKey(Arc::new(Keypair::new()));
    let config = AgentConfig {
        node_name: node.into(),
        supplier: Supplier {
            wallet: wallet.public_key(),
            wallet_key: Some(wallet),
            prices: [("H100".to_string(), 2_000_000)].into(),
            region: Some(REGION.into()),
            zone: None,
        },
        mode: Mode::OfferOnly,
        socket: PluginSocket { dir: env.dir().to_owned(), resource_name: "nvidia.com/gpu".into() },
        cdi: false,
        cdi_spec_dir: env.dir().join("cdi"),
        heartbeat: Duration::from_secs(1),
        pod_resources_socket: env.dir().join("pod-resources.sock"),
        lease_wait: Duration::from_secs(1),
        reserve: Reserve::default(),
    };
    let agent = Agent::prepare(config, Arc::new(fake(node, gpus, challenges))).unwrap();
    let client = client.clone();
    Running(tokio::spawn(async move {
        agent.run(Some(client)).await.expect("agent");
    }))
}

fn verified(offer: &GpuOffer) -> Option<Condition> {
    let status = offer.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == COMPUTE_VERIFIED).cloned()
}

/// Waits for `node`'s `ComputeVerified` condition to have `status` and `reason`; the condition.
async fn verdict(offers: &Api<GpuOffer>, node: &str, status: &str, reason: &str) -> Condition {
    eventually(&format!("{node}: ComputeVerified {status} ({reason})"), WAIT, || async {
        let offer = offers.get_opt(node).await.ok().flatten()?;
        verified(&offer).filter(|c| c.status == status && c.reason == reason)
    })
    .await
}

#[tokio::test]
async fn honest_agents_are_verified_and_late_wrong_or_borrowed_answers_are_refused() {
    let (_turn, env, client) = setup().await;
    let offers: Api<GpuOffer> = Api::all(client.clone());

    let _honest = agent(env, &client, "poc-honest", 2, "").await;
    let _wrong = agent(env, &client, "poc-wrong", 1, "challenges: {answer: wrong}").await;
    // 524288 operations at 50000/s: 10.5 s, where an H100 has 3.5 s.
    let _late = agent(env, &client, "poc-late", 1, "challenges: {opsPerSecond: 50000}").await;
    // 64 GPUs, computing together as fast as 64 RTX 3090s would.
    let rtx_speed =
        64 * SETTINGS.reference_ops_per_second * u64::from(relative_throughput("RTX3090")) / 1000;
    let knobs = format!("challenges: {{opsPerSecond: {rtx_speed}}}");
    let _fleet = agent(env, &client, "poc-64h100", 64, &knobs).await;
    // Its own source never answers; the test answers for it with products computed for
    // poc-honest's offer instead of its own.
    let _borrowed = agent(env, &client, "poc-borrowed", 1, "challenges: {answer: silent}").await;
    let _controller = controller(&client);
    let borrower = {
        let offers = offers.clone();
        Running(tokio::spawn(async move {
            let source = fake("poc-borrowed", 1, "");
            let apply = PatchParams::apply(PROOF_FIELD_MANAGER).force();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(offer) = offers.get("poc-borrowed").await else { continue };
                let challenge = offer.status.and_then(|s| s.proof_of_compute?.challenge);
                let Some(challenge) = challenge else { continue };
                let products = compute("poc-honest", &challenge, &source).unwrap().unwrap();
                let patch = json!({
                    "apiVersion": "gpumarket.io/v1alpha1",
                    "kind": "GpuOffer",
                    "status": {"computeAnswer": answer(&challenge, &products)},
                });
                let _ = offers.patch_status("poc-borrowed", &apply, &Patch::Apply(&patch)).await;
            }
        }))
    };

    let honest = verdict(&offers, "poc-honest", "True", "Verified").await;
    assert!(
        honest.message.contains("2 GPUs computed their products in time"),
        "{}",
        honest.message
    );
    let wrong = verdict(&offers, "poc-wrong", "False", "WrongAnswer").await;
    assert!(wrong.message.contains("not rows of this challenge's product"), "{}", wrong.message);
    let late = verdict(&offers, "poc-late", "False", "Late").await;
    assert!(
        late.message.contains("no commitment") || late.message.contains("came after"),
        "{}",
        late.message
    );
    let fleet = verdict(&offers, "poc-64h100", "False", "Late").await;
    println!("64×H100 at RTX 3090 speed: {}", fleet.message);
    let borrowed = verdict(&offers, "poc-borrowed", "False", "WrongAnswer").await;
    assert!(borrowed.message.contains("for this node"), "{}", borrowed.message);
    drop(borrower);

    // The honest agent keeps passing; the tally counts every verdict.
    eventually("poc-honest verified twice", WAIT, || async {
        let offer = offers.get("poc-honest").await.ok()?;
        let proof = offer.status?.proof_of_compute?;
        (proof.passed >= 2 && proof.failed == 0).then_some(())
    })
    .await;
    let failed = offers.get("poc-wrong").await.unwrap().status.unwrap().proof_of_compute.unwrap();
    assert!(failed.failed >= 1 && failed.passed == 0, "{failed:?}");
}

#[tokio::test]
async fn leased_gpus_are_not_challenged_until_the_lease_is_gone() {
    let (_turn, env, client) = setup().await;
    let offers: Api<GpuOffer> = Api::all(client.clone());
    let _leased = agent(env, &client, "poc-leased", 2, "").await;
    let _idle = agent(env, &client, "poc-idle", 1, "").await;
    eventually("poc-leased published", WAIT, || async {
        offers.get_opt("poc-leased").await.ok().flatten()?.status?.last_heartbeat
    })
    .await;
    // One GPU claimed by a lease, as the controller's binding writes it.
    let claim = PatchParams::apply("test-binding").force();
    let leased = json!({
        "apiVersion": "gpumarket.io/v1alpha1",
        "kind": "GpuOffer",
        "status": {"gpus": [{"uuid": "GPU-poc-leased-1", "lease": "poc-lease"}]},
    });
    offers.patch_status("poc-leased", &claim, &Patch::Apply(&leased)).await.unwrap();
    let _controller = controller(&client);

    // Meanwhile the idle offer is challenged and verified twice.
    eventually("poc-idle verified twice", WAIT, || async {
        let proof = offers.get("poc-idle").await.ok()?.status?.proof_of_compute?;
        (proof.passed >= 2).then_some(())
    })
    .await;
    let offer = offers.get("poc-leased").await.unwrap();
    let status = offer.status.clone().unwrap();
    assert!(offer.is_available(), "{:?}", status.conditions);
    assert_eq!(status.proof_of_compute, None, "a leased offer was challenged");
    assert_eq!(verified(&offer), None);

    // The lease is gone: the offer is idle and challenged like any other.
    let released = json!({"apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuOffer", "status": {}});
    offers.patch_status("poc-leased", &claim, &Patch::Apply(&released)).await.unwrap();
    verdict(&offers, "poc-leased", "True", "Verified").await;
    println!("{} verified once its lease was gone", offer.name_any());
}
