//! The Helm chart: it lints and renders for the default and every example values file, the real
//! API server accepts what it renders, RBAC is least privilege, the supplier-isolation policy
//! holds against an impersonated agent, the fleet mode's agent runs a fleet's work with its
//! RBAC alone, buyers get their GpuCluster permissions (and no more)
//! through the built-in edit and view roles, and the Argo CD health checks (run by Argo CD's own
//! code, hack/tools/argocd-health) answer for every phase and condition the controller writes.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser as _;

use gpumarket_controller::cluster::status::{
    DEGRADED, FUNDED, MATCHED, RAY_READY, ended_status, set_condition,
};
use gpumarket_controller::fleet::tunnel::TunnelConfig;
use gpumarket_controller::market::offer::{AVAILABLE, availability};
use gpumarket_controller::settlement::FINALIZER;
use gpumarket_crds::{
    ClusterPhase, GpuCluster, GpuClusterStatus, GpuLease, GpuOffer, GpuOfferStatus,
};
use gpumarket_tests::tools::Tools;
use gpumarket_tests::{Env, GpuNode, eventually};
use jiff::Timestamp;
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/gpumarket")
}

fn example(file: &str) -> String {
    repo_root().join("examples").join(file).display().to_string()
}

/// One of the pinned tools `hack/tools/build.sh` builds (helm, kubectl).
fn tool(name: &str) -> Command {
    Tools::locate().command(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command, feeding it `stdin`; returns (success, stdout, stderr).
fn run(cmd: &mut Command, stdin: &str) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// Values every agent-enabled render needs.
const AGENT: &[&str] = &[
    "agent.enabled=true",
    "agent.wallet=7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV",
    "agent.prices.H100=2200000",
];

fn helm_args(values: &[&str], sets: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for file in values {
        args.extend(["-f".to_owned(), example(file)]);
    }
    for set in sets {
        args.extend(["--set".to_owned(), (*set).to_owned()]);
    }
    args
}

/// `helm template` output, or helm's error message.
fn try_render(namespace: &str, values: &[&str], sets: &[&str]) -> Result<String, String> {
    let (ok, stdout, stderr) = run(
        tool("helm")
            .args(["template", "gpumarket"])
            .arg(chart_dir())
            .args(["--namespace", namespace])
            .args(helm_args(values, sets)),
        "",
    );
    if ok { Ok(stdout) } else { Err(stderr) }
}

/// The rendered objects, as JSON.
fn render(values: &[&str], sets: &[&str]) -> Vec<Value> {
    let yaml = try_render("gpumarket", values, sets).unwrap_or_else(|e| panic!("{e}"));
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn has_kind(objects: &[Value], kind: &str) -> bool {
    objects.iter().any(|o| o["kind"] == kind)
}

fn args_of(workload: &Value) -> Vec<String> {
    let args = &workload["spec"]["template"]["spec"]["containers"][0]["args"];
    serde_json::from_value(args.clone()).unwrap()
}

/// Every (values files, extra --set) combination the chart ships or documents.
fn shipped_values() -> Vec<(Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (vec![], vec![]),
        (vec![], AGENT.to_vec()),
        (vec![], [AGENT, &["agent.cdi=true"]].concat()),
        (vec!["values-local.yaml"], vec![]),
        (vec!["values-supplier-offer-only.yaml"], vec![]),
        (vec!["values-fleet.yaml"], vec![]),
        (vec![], TUNNEL.to_vec()),
        (vec!["values-fleet.yaml"], FLEET_TUNNEL.to_vec()),
    ]
}

/// The hub's tunnel to fleets' Ray heads, on.
const TUNNEL: &[&str] =
    &["controller.tunnel.enabled=true", "controller.tunnel.tlsSecret=tunnel-tls"];
/// A fleet that holds the hub's tunnel.
const FLEET_TUNNEL: &[&str] =
    &["fleet.hubTunnel=https://hub.example.net:9444", "fleet.hubTunnelCASecret=hub-tunnel-ca"];

#[test]
fn helm_lint_passes_for_default_and_example_values() {
    for (values, sets) in shipped_values() {
        let (ok, stdout, stderr) = run(
            tool("helm")
                .arg("lint")
                .arg(chart_dir())
                .arg("--strict")
                .args(helm_args(&values, &sets)),
            "",
        );
        assert!(ok, "helm lint {values:?} {sets:?}:\n{stdout}{stderr}");
    }
}

/// (apiGroup, resource, verbs) of each resource a rendered ClusterRole names.
fn rules_of(objects: &[Value], name: &str) -> Vec<(String, String, Vec<String>)> {
    let role = find(objects, "ClusterRole", name);
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<String> = serde_json::from_value(rule["verbs"].clone()).unwrap();
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let (g, r) = (group.as_str().unwrap(), resource.as_str().unwrap());
                out.push((g.to_owned(), r.to_owned(), verbs.clone()));
            }
        }
    }
    out
}

#[test]
fn rbac_is_least_privilege_without_wildcards() {
    let objects = render(&[], AGENT);
    for role in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
        for rule in role["rules"].as_array().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                let values = rule[field].as_array().unwrap();
                assert!(!values.iter().any(|v| v == "*"), "wildcard in {role}");
            }
        }
    }
    let rules = |name: &str| rules_of(&objects, name);
    let verbs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        rules("gpumarket-agent"),
        vec![
            (
                "gpumarket.io".into(),
                "gpuoffers".into(),
                verbs(&["create", "get", "list", "watch", "patch", "update"])
            ),
            ("gpumarket.io".into(), "gpuoffers/status".into(), verbs(&["get", "patch", "update"])),
            // Plugin mode: its node's leases, to hand their GPUs only to their worker pods.
            ("gpumarket.io".into(), "gpuleases".into(), verbs(&["get", "list", "watch"])),
            ("".into(), "nodes".into(), verbs(&["get", "patch"])),
        ]
    );
    let controller = rules("gpumarket-controller");
    let resources: Vec<&str> = controller.iter().map(|(_, r, _)| r.as_str()).collect();
    for unneeded in ["secrets", "nodes"] {
        assert!(
            !resources.contains(&unneeded),
            "the controller reads no {unneeded}: {resources:?}"
        );
    }
    for needed in ["gpuclusters/status", "gpuoffers/status", "gpuleases", "rayclusters", "events"] {
        assert!(resources.contains(&needed), "controller lacks {needed}");
    }
    // The controller reads offers but never writes their spec; it reads pods (to meter from a
    // worker's readiness) and deletes those of ended leases, but never creates or changes one.
    for (_, resource, verbs) in &controller {
        if resource == "gpuoffers" {
            assert_eq!(verbs, &["get", "list", "watch"], "{resource}");
        }
        if resource == "pods" {
            assert_eq!(verbs, &["get", "list", "watch", "delete"], "{resource}");
        }
        // Settlement writes its records conditionally on the status it reads back (a refund
        // that cannot read it never happens).
        if ["gpuclusters/status", "gpuoffers/status", "gpuleases/status"]
            .contains(&resource.as_str())
        {
            assert!(verbs.iter().any(|v| v == "get"), "the controller cannot read {resource}");
        }
    }
    assert!(resources.contains(&"pods"), "controller cannot watch worker pods");
}

#[test]
fn fleet_mode_lists_nodes_and_runs_pods_and_services_in_its_workload_namespace_only() {
    let objects = render(&["values-fleet.yaml"], &["fleet.workloadNamespace=ray"]);
    for kind in ["DaemonSet", "ValidatingAdmissionPolicy"] {
        assert!(!has_kind(&objects, kind), "a fleet runs no {kind}");
    }
    let roles: Vec<&Value> =
        objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role").collect();
    assert_eq!(roles.len(), 2, "{roles:?}");
    let verbs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        rules_of(&objects, "gpumarket-fleet"),
        [("".into(), "nodes".into(), verbs(&["list"]))]
    );
    let role = find(&objects, "Role", "gpumarket-fleet");
    assert_eq!(role["metadata"]["namespace"], "ray");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["list", "create", "delete"]}])
    );
    assert_eq!(find(&objects, "RoleBinding", "gpumarket-fleet")["metadata"]["namespace"], "ray");
    let fleet = find(&objects, "Deployment", "gpumarket-fleet");
    let args = args_of(fleet);
    for expected in [
        "run",
        "--fleet=fleet-a",
        "--hub-kubeconfig=/var/run/secrets/gpumarket/hub/kubeconfig",
        "--wallet-keypair=/var/run/secrets/gpumarket/wallet/keypair.json",
        "--price=H100=2200000",
        "--namespace=ray",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} not in {args:?}");
    }
    let pod = &fleet["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["command"], json!(["/usr/local/bin/gpumarket-fleet"]));
    let secrets: Vec<&Value> =
        pod["volumes"].as_array().unwrap().iter().map(|v| &v["secret"]["secretName"]).collect();
    assert_eq!(secrets, [&json!("gpumarket-fleet-join"), &json!("gpumarket-wallet")]);
}

#[test]
fn leader_election_is_on_by_default_and_recreate_keeps_two_settlers_apart_without_it() {
    let lease_role = json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["gpumarket-controller"], "verbs": ["get", "patch", "update"]},
    ]);
    // The default: one replica, elected, rolled (the new pod waits for the old one's Lease).
    let default = render(&[], &[]);
    let deployment = find(&default, "Deployment", "gpumarket-controller");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let args = args_of(deployment);
    assert!(args.contains(&"--leader-election=true".to_owned()), "{args:?}");
    assert!(args.contains(&"--leader-election-lease=gpumarket-controller".to_owned()), "{args:?}");
    assert_eq!(deployment["spec"]["strategy"], json!({"type": "RollingUpdate"}));
    assert_eq!(find(&default, "Role", "gpumarket-controller-leader-election")["rules"], lease_role);
    assert!(!has_kind(&default, "PodDisruptionBudget"));

    // Turned off: no Lease, and the old pod is gone before the new one starts.
    let single = render(&[], &["controller.leaderElection=false"]);
    let deployment = find(&single, "Deployment", "gpumarket-controller");
    // (The controller elects by default: the chart says so explicitly.)
    let args = args_of(deployment);
    assert!(args.contains(&"--leader-election=false".to_owned()), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--leader-election-lease")), "{args:?}");
    assert_eq!(deployment["spec"]["strategy"], json!({"type": "Recreate"}));
    let roles: Vec<&Value> = single.iter().filter(|o| o["kind"] == "Role").collect();
    assert!(
        roles.iter().all(|r| r["metadata"]["name"] != "gpumarket-controller-leader-election"),
        "no lease permissions without leader election"
    );
    // Its records it keeps either way, in one ConfigMap of its namespace that suppliers cannot
    // write.
    assert_eq!(
        find(&single, "Role", "gpumarket-controller-records")["rules"],
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"],
             "resourceNames": ["gpumarket-offer-signing-times"], "verbs": ["get", "patch"]},
        ])
    );

    // More than one replica elects whatever leaderElection says.
    let replicated = render(&[], &["controller.replicas=3", "controller.leaderElection=false"]);
    let deployment = find(&replicated, "Deployment", "gpumarket-controller");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(args_of(deployment).contains(&"--leader-election=true".to_owned()));
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let budget = find(&replicated, "PodDisruptionBudget", "gpumarket-controller");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(
        find(&replicated, "Role", "gpumarket-controller-leader-election")["rules"],
        lease_role
    );
}

#[test]
fn buyer_roles_aggregate_into_the_built_in_roles_and_never_write_status_offers_or_leases() {
    let objects = render(&[], &[]);
    let aggregated = |name: &str| -> Vec<String> {
        let labels = find(&objects, "ClusterRole", name)["metadata"]["labels"].as_object().unwrap();
        let mut roles: Vec<String> = labels
            .iter()
            .filter(|(_, v)| *v == "true")
            .filter_map(|(k, _)| k.strip_prefix("rbac.authorization.k8s.io/aggregate-to-"))
            .map(str::to_owned)
            .collect();
        roles.sort();
        roles
    };
    assert_eq!(aggregated("gpumarket-buyer-edit"), ["admin", "edit"]);
    assert_eq!(aggregated("gpumarket-buyer-view"), ["admin", "edit", "view"]);
    let verbs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let write = verbs(&["create", "update", "patch", "delete", "get", "list", "watch"]);
    let read = verbs(&["get", "list", "watch"]);
    let group = "gpumarket.io".to_owned();
    assert_eq!(
        rules_of(&objects, "gpumarket-buyer-edit"),
        [(group.clone(), "gpuclusters".into(), write)]
    );
    assert_eq!(
        rules_of(&objects, "gpumarket-buyer-view"),
        [
            (group.clone(), "gpuclusters".into(), read.clone()),
            (group.clone(), "gpuoffers".into(), read.clone()),
            (group, "gpuleases".into(), read),
        ]
    );
    let off = render(&[], &["buyerRoles.enabled=false"]);
    for name in ["gpumarket-buyer-edit", "gpumarket-buyer-view"] {
        assert!(!off.iter().any(|o| o["metadata"]["name"] == name), "{name} rendered when off");
    }
}

/// The rule that keeps the controller (and the settlement key it mounts) off market nodes.
fn off_market_nodes() -> Value {
    json!({"key": "gpumarket.io/gpu-model", "operator": "DoesNotExist"})
}

fn controller_pod(objects: &[Value]) -> &Value {
    &find(objects, "Deployment", "gpumarket-controller")["spec"]["template"]["spec"]
}

#[test]
fn the_controller_stays_off_market_nodes_by_default_and_with_a_user_affinity() {
    let default = render(&[], &[]);
    let pod = controller_pod(&default);
    assert_eq!(
        pod["affinity"],
        json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [off_market_nodes()]}]}}})
    );
    assert!(pod.get("tolerations").is_none(), "no toleration of the supplier taint");

    // A user's affinity is kept; the rule is added to each of its (alternative) terms.
    let user = [
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=In",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]=system",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[1].matchFields[0].key=metadata.name",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[1].matchFields[0].operator=In",
        "controller.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[1].matchFields[0].values[0]=ops-0",
        "controller.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=100",
        "controller.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey=kubernetes.io/hostname",
    ];
    let merged = render(&[], &user);
    let affinity = &controller_pod(&merged)["affinity"];
    assert_eq!(
        affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([
            {"matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["system"]}, off_market_nodes()]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["ops-0"]}],
             "matchExpressions": [off_market_nodes()]},
        ])
    );
    assert_eq!(
        affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );

    // Only a preferred node affinity of the user's: the required rule is added beside it.
    let preferred = render(
        &[],
        &[
            "controller.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
            "controller.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].key=pool",
            "controller.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference.matchExpressions[0].operator=Exists",
        ],
    );
    let node = &controller_pod(&preferred)["affinity"]["nodeAffinity"];
    assert_eq!(node["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"], 1);
    assert_eq!(
        node["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        json!([{"matchExpressions": [off_market_nodes()]}])
    );

    // Turned off, the user's affinity alone (here none).
    let off = render(&[], &["controller.avoidSupplierNodes=false"]);
    assert!(controller_pod(&off).get("affinity").is_none());
}

#[test]
fn the_tunnel_is_opt_in_and_opens_its_endpoint_its_gateway_ports_and_token_reviews_only() {
    let off = render(&[], &[]);
    assert!(!off.iter().any(|o| o["metadata"]["name"] == "gpumarket-controller-tunnel"));
    let reviews = |objects: &[Value]| {
        rules_of(objects, "gpumarket-controller")
            .into_iter()
            .filter(|(_, resource, _)| resource == "tokenreviews")
            .map(|(_, _, verbs)| verbs)
            .collect::<Vec<_>>()
    };
    assert!(reviews(&off).is_empty(), "no token reviews without the tunnel");

    let on = render(&[], TUNNEL);
    assert_eq!(reviews(&on), [["create"]]);
    let service = find(&on, "Service", "gpumarket-controller-tunnel");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["ports"][0]["name"], "tunnel");
    // The leader points it at itself: no selector, which would reach standbys too.
    assert!(service["spec"]["selector"].is_null(), "{service}");
    let role = find(&on, "Role", "gpumarket-controller-tunnel");
    let slices = json!({"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"]});
    let (mut create, mut patch) = (slices.clone(), slices);
    create["verbs"] = json!(["create"]);
    patch["verbs"] = json!(["patch"]);
    patch["resourceNames"] = json!(["gpumarket-controller-tunnel"]);
    assert_eq!(role["rules"], json!([create, patch]), "its own EndpointSlice only");
    assert!(!off.iter().any(|o| o["metadata"]["name"] == "gpumarket-controller-tunnel"));
    let args = args_of(find(&on, "Deployment", "gpumarket-controller"));
    for expected in [
        "--tunnel-listen=0.0.0.0:9444",
        "--tunnel-tls-cert=/var/run/secrets/gpumarket/tunnel/tls.crt",
        "--tunnel-gateway-ports=30000-30999",
        "--tunnel-service=gpumarket-controller-tunnel",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    let env = &controller_pod(&on)["containers"][0]["env"];
    let gateway =
        env.as_array().unwrap().iter().find(|e| e["name"] == "GPUMARKET_TUNNEL_GATEWAY_ADDRESS");
    assert_eq!(gateway.unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let policy = find(&on, "NetworkPolicy", "gpumarket-controller");
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    let ports: Vec<&Value> = ingress.iter().map(|rule| &rule["ports"][0]).collect();
    assert_eq!(ports[1]["port"], "tunnel");
    assert_eq!((&ports[2]["port"], &ports[2]["endPort"]), (&json!(30000), &json!(30999)));

    let refused = try_render("gpumarket", &[], &["controller.tunnel.enabled=true"]);
    assert!(refused.expect_err("no certificate").contains("controller.tunnel.tlsSecret must name"));

    let fleet = render(&["values-fleet.yaml"], FLEET_TUNNEL);
    let args = args_of(find(&fleet, "Deployment", "gpumarket-fleet"));
    for expected in [
        "--hub-tunnel=https://hub.example.net:9444",
        "--hub-tunnel-ca=/var/run/secrets/gpumarket/hub-tunnel/ca.crt",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
}

#[test]
fn service_monitor_is_opt_in_and_scrapes_the_metrics_port() {
    assert!(!has_kind(&render(&[], &[]), "ServiceMonitor"));
    let objects = render(&[], &["controller.serviceMonitor.enabled=true"]);
    let monitor = find(&objects, "ServiceMonitor", "gpumarket-controller");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let service = find(&objects, "Service", "gpumarket-controller-metrics");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["spec"]["selector"]);
}

#[test]
fn settlement_key_and_rpc_url_come_from_the_existing_secret() {
    let objects = render(&[], &["settlement.existingSecret=my-keys"]);
    assert!(!has_kind(&objects, "Secret"), "the chart must never render a Secret");
    let pod = &find(&objects, "Deployment", "gpumarket-controller")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let rpc =
        container["env"].as_array().unwrap().iter().find(|e| e["name"] == "GPUMARKET_RPC_URL");
    assert_eq!(
        rpc.unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "my-keys", "key": "rpc-url"})
    );
    let args = args_of(find(&objects, "Deployment", "gpumarket-controller"));
    assert!(args.contains(&"--rpc-url=$(GPUMARKET_RPC_URL)".to_owned()), "{args:?}");
    assert!(
        args.contains(
            &"--settlement-keypair=/var/run/secrets/gpumarket/settlement/keypair.json".to_owned()
        ),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--stablecoin")), "{args:?}");
    let usdc = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v";
    let usdt = "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB";
    let set = format!("settlement.stablecoins={{{usdc},{usdt}}}");
    let with_stablecoins = render(&[], &[&set]);
    let args = args_of(find(&with_stablecoins, "Deployment", "gpumarket-controller"));
    let stablecoins: Vec<&String> = args.iter().filter(|a| a.starts_with("--stablecoin")).collect();
    assert_eq!(stablecoins, [&format!("--stablecoin={usdc}"), &format!("--stablecoin={usdt}")]);
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "my-keys");
    assert_eq!(
        pod["volumes"][0]["secret"]["items"],
        json!([{"key": "keypair.json", "path": "keypair.json"}])
    );
}

#[test]
fn containers_are_hardened() {
    let objects = render(&["values-supplier-offer-only.yaml"], &["controller.enabled=true"]);
    for (kind, name) in [("Deployment", "gpumarket-controller"), ("DaemonSet", "gpumarket-agent")] {
        let pod = &find(&objects, kind, name)["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        let security = &pod["containers"][0]["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
    }
    let probes = &find(&objects, "Deployment", "gpumarket-controller")["spec"]["template"]["spec"]
        ["containers"][0];
    assert_eq!(probes["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(probes["readinessProbe"]["httpGet"]["path"], "/readyz");
}

#[test]
fn only_plugin_mode_mounts_the_kubelet_device_plugin_directory() {
    let plugin = render(&[], AGENT);
    let agent = find(&plugin, "DaemonSet", "gpumarket-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/var/lib/kubelet/device-plugins");
    let args = args_of(agent);
    for expected in [
        "--node-name=$(NODE_NAME)",
        "--mode=plugin",
        "--price=H100=2200000",
        "--socket-dir=/var/lib/kubelet/device-plugins",
    ] {
        assert!(args.contains(&expected.to_owned()), "{expected} missing from {args:?}");
    }
    let tolerated: Vec<&Value> =
        pod["tolerations"].as_array().unwrap().iter().map(|t| &t["key"]).collect();
    assert!(
        tolerated.contains(&&json!("gpumarket.io/supplier")),
        "the agent must tolerate its own taint"
    );

    let offer_only = render(&["values-supplier-offer-only.yaml"], &[]);
    assert!(!has_kind(&offer_only, "Deployment"), "a supplier fleet runs no controller");
    let agent = find(&offer_only, "DaemonSet", "gpumarket-agent");
    assert!(
        agent["spec"]["template"]["spec"].get("volumes").is_none(),
        "offer-only mounts nothing"
    );
    let args = args_of(agent);
    assert!(args.contains(&"--mode=offer-only".to_owned()));
    assert!(!args.iter().any(|a| a.starts_with("--socket-dir")), "{args:?}");
}

/// The agent pod's volume and its mount named `name`, `null` for either it lacks.
fn volume_and_mount(agent: &Value, name: &str) -> (Value, Value) {
    let pod = &agent["spec"]["template"]["spec"];
    let named = |list: &Value| {
        list.as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    (named(&pod["volumes"]), named(&pod["containers"][0]["volumeMounts"]))
}

#[test]
fn cdi_mounts_the_hosts_spec_directory_and_the_driver_read_only() {
    let cdi: Vec<&str> = AGENT.iter().copied().chain(["agent.cdi=true"]).collect();
    let objects = render(&[], &cdi);
    let agent = find(&objects, "DaemonSet", "gpumarket-agent");
    let (volume, mount) = volume_and_mount(agent, "cdi-specs");
    assert_eq!(volume["hostPath"], json!({"path": "/var/run/cdi", "type": "DirectoryOrCreate"}));
    assert_eq!(mount["mountPath"], "/var/run/cdi");
    assert_ne!(mount["readOnly"], true, "the agent writes its spec there");
    for (name, host_path) in [("host-dev", "/dev"), ("host-usr", "/usr")] {
        let (volume, mount) = volume_and_mount(agent, name);
        assert_eq!(volume["hostPath"]["path"], host_path, "{name}");
        assert_eq!(mount["mountPath"], format!("/host{host_path}"), "{name}");
        assert_eq!(mount["readOnly"], true, "{name}");
    }
    let args = args_of(agent);
    for expected in ["--cdi", "--cdi-spec-dir=/var/run/cdi", "--host-root=/host"] {
        assert!(args.contains(&expected.to_owned()), "{expected} missing from {args:?}");
    }

    let elsewhere: Vec<&str> = cdi.iter().copied().chain(["agent.cdiSpecDir=/etc/cdi"]).collect();
    let objects = render(&[], &elsewhere);
    let (volume, _) = volume_and_mount(find(&objects, "DaemonSet", "gpumarket-agent"), "cdi-specs");
    assert_eq!(volume["hostPath"]["path"], "/etc/cdi");

    // A fake node's files are named by its device file: nothing of the host is read.
    let fake: Vec<&str> = cdi.iter().copied().chain(["agent.source=fake:/etc/gpus.yaml"]).collect();
    let objects = render(&[], &fake);
    let agent = find(&objects, "DaemonSet", "gpumarket-agent");
    assert!(volume_and_mount(agent, "cdi-specs").0.is_object());
    assert!(volume_and_mount(agent, "host-dev").0.is_null());
    assert!(!args_of(agent).iter().any(|a| a.starts_with("--host-root")));

    // Without CDI, and in offer-only mode (NVIDIA's plugin serves the GPUs), no spec is written.
    let objects = render(&[], AGENT);
    assert!(
        volume_and_mount(find(&objects, "DaemonSet", "gpumarket-agent"), "cdi-specs").0.is_null()
    );
    let offer_only: Vec<&str> = cdi.iter().copied().chain(["agent.mode=offer-only"]).collect();
    let objects = render(&[], &offer_only);
    let agent = find(&objects, "DaemonSet", "gpumarket-agent");
    assert!(agent["spec"]["template"]["spec"].get("volumes").is_none());
    assert!(!args_of(agent).contains(&"--cdi".to_owned()));
}

#[test]
fn every_agent_keeps_the_reserve_out_of_its_offer() {
    // In both modes: the node's other pods need room whoever serves its GPUs.
    for (values, expected) in [
        (render(&[], AGENT), ["--reserve-cpu=500m", "--reserve-memory=1Gi"]),
        (
            render(&["values-supplier-offer-only.yaml"], &["agent.reserve.cpu=1500m"]),
            ["--reserve-cpu=1500m", "--reserve-memory=1Gi"],
        ),
    ] {
        let args = args_of(find(&values, "DaemonSet", "gpumarket-agent"));
        for arg in expected {
            assert!(args.contains(&arg.to_owned()), "{arg} missing from {args:?}");
        }
    }
}

#[test]
fn bad_values_are_refused_with_a_message_that_says_what_to_change() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["agent.enabled=true", "agent.prices.H100=1"],
            "agent.wallet must be the supplier's Solana wallet",
        ),
        (
            &["agent.enabled=true", "agent.wallet=7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV"],
            "agent.prices must give at least one price",
        ),
        (
            &["agent.enabled=true", "agent.mode=daemon"],
            "value must be one of 'plugin', 'offer-only'",
        ),
        (&["agent.wallet=0OIl0OIl"], "does not match pattern"),
        (&["agent.reserve.memory=lots"], "/agent/reserve/memory"),
        (&["agent.cdiSpecDir=var/run/cdi"], "does not match pattern"),
        (&["controller.replicas=0"], "minimum"),
        (&["fleet.enabled=true"], "fleet.name must be the name of this fleet's GpuFleet"),
        (&["fleet.enabled=true", "fleet.name=a"], "fleet.joinSecret must name the Secret"),
        (
            &["fleet.enabled=true", "fleet.name=a", "fleet.joinSecret=j"],
            "agent.walletKeypairSecret must name the Secret",
        ),
        (&["fleet.enabled=true", "agent.enabled=true"], "fleet.enabled and agent.enabled exclude"),
        (&["fleet.name=Fleet_A"], "/fleet/name"),
        (&["settlement.stablecoins={0OIl0OIl}"], "/settlement/stablecoins/0"),
    ];
    for (sets, expected) in cases {
        let error = try_render("gpumarket", &[], sets).expect_err("must be refused");
        assert!(error.contains(expected), "{sets:?}: {error}");
    }
}

#[test]
fn supplier_isolation_policy_matches_only_the_agent() {
    let objects = render(&[], AGENT);
    let policy = find(&objects, "ValidatingAdmissionPolicy", "gpumarket-supplier-isolation");
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == \"system:serviceaccount:gpumarket:gpumarket-agent\""
    );
    let binding =
        find(&objects, "ValidatingAdmissionPolicyBinding", "gpumarket-supplier-isolation");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    // Without an agent there is nothing to isolate (the fleet-isolation policy stays).
    let names: Vec<Value> = render(&[], &[])
        .iter()
        .filter(|o| o["kind"] == "ValidatingAdmissionPolicy")
        .map(|o| o["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, [json!("gpumarket-fleet-isolation")]);
}

/// An Argo CD Application of examples/argocd/, as YAML.
fn application(file: &str) -> Value {
    let text = std::fs::read_to_string(example(&format!("argocd/{file}"))).unwrap();
    let app: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        (&app["apiVersion"], &app["kind"]),
        (&json!("argoproj.io/v1alpha1"), &json!("Application"))
    );
    // This repository, as the chart names it.
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(app["spec"]["source"]["repoURL"], chart["home"], "{file}");
    app
}

#[test]
fn argocd_buyer_application_syncs_the_example_gpuclusters_into_its_namespace() {
    let app = application("gpucluster-application.yaml");
    let source = &app["spec"]["source"];
    let file = repo_root()
        .join(source["path"].as_str().unwrap())
        .join(source["directory"]["include"].as_str().unwrap());
    let text = std::fs::read_to_string(&file).unwrap();
    let clusters: Vec<GpuCluster> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    assert!(!clusters.is_empty());
    for cluster in clusters {
        let namespace = json!(cluster.metadata.namespace);
        assert_eq!(
            app["spec"]["destination"]["namespace"], namespace,
            "{:?}",
            cluster.metadata.name
        );
    }
    assert!(app["spec"].get("ignoreDifferences").is_none());
}

#[test]
fn argocd_supplier_application_installs_the_chart_and_the_health_checks_the_readme_names() {
    let app = application("supplier-application.yaml");
    let source = &app["spec"]["source"];
    let chart = repo_root().join(source["path"].as_str().unwrap());
    assert_eq!(chart, chart_dir());
    // Rendered as Argo CD renders it: the release is named after the Application, value files
    // are relative to the chart's path.
    let release = app["metadata"]["name"].as_str().unwrap();
    let namespace = app["spec"]["destination"]["namespace"].as_str().unwrap();
    let mut helm = tool("helm");
    helm.args(["template", release]).arg(&chart).args(["--namespace", namespace]);
    for values in source["helm"]["valueFiles"].as_array().unwrap() {
        let path = chart.join(values.as_str().unwrap());
        assert!(path.is_file(), "{values}");
        helm.arg("-f").arg(path);
    }
    let (ok, yaml, stderr) = run(&mut helm, "");
    assert!(ok, "{stderr}");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &Value| !doc.is_null())
        .collect();

    // The README's merge command reads that release's health ConfigMap.
    let readme = std::fs::read_to_string(example("argocd/README.md")).unwrap();
    let named = readme.split("get configmap ").nth(1).and_then(|rest| rest.split(' ').next());
    let configmap = format!("{release}-argocd-health");
    assert_eq!(named, Some(configmap.as_str()));
    assert_eq!(
        readme.split("kubectl -n ").nth(2).and_then(|rest| rest.split(' ').next()),
        Some(namespace)
    );
    let data = find(&objects, "ConfigMap", &configmap)["data"].as_object().unwrap();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "resource.customizations.health.gpumarket.io_GpuCluster",
            "resource.customizations.health.gpumarket.io_GpuOffer"
        ]
    );
}

// ---- Argo CD health checks, judged by Argo CD's own code ----

/// Argo CD's verdicts (status, message) on `objects`, with the chart's health ConfigMap, as
/// rendered, merged into argocd-cm: `argocd-health` (hack/tools/argocd-health) runs the checks
/// through Argo CD's settings and health code, in gopher-lua as the application controller does.
fn argocd_health(objects: &[Value]) -> Vec<(String, String)> {
    let rendered = render(&[], &[]);
    let configmap = find(&rendered, "ConfigMap", "gpumarket-argocd-health");
    let file = tempfile::NamedTempFile::new().unwrap();
    // JSON is YAML too.
    serde_json::to_writer(&file, configmap).unwrap();
    let stdin: String = objects.iter().map(|o| format!("{o}\n")).collect();
    let (ok, stdout, stderr) =
        run(tool("argocd-health").arg("--argocd-cm").arg(file.path()), &stdin);
    assert!(ok, "argocd-health failed:\n{stdout}{stderr}");
    let verdicts: Vec<(String, String)> = stdout
        .lines()
        .map(|line| {
            let verdict: Value = serde_json::from_str(line).unwrap();
            let field = |name: &str| verdict[name].as_str().unwrap_or_default().to_owned();
            (field("status"), field("message"))
        })
        .collect();
    assert_eq!(verdicts.len(), objects.len(), "{stdout}");
    verdicts
}

/// Runs every (case, object, status, message) through Argo CD at once; names each case that
/// gets another verdict.
fn assert_health(cases: &[(&str, Value, &str, &str)]) {
    let objects: Vec<Value> = cases.iter().map(|(_, obj, _, _)| obj.clone()).collect();
    let wrong: Vec<String> = cases
        .iter()
        .zip(argocd_health(&objects))
        .filter(|((_, _, status, message), (got, said))| {
            (got.as_str(), said.as_str()) != (*status, *message)
        })
        .map(|((case, obj, status, message), (got, said))| {
            format!(
                "{case}: expected {status} {message:?}, Argo CD says {got} {said:?}\n  status: {}",
                obj["status"]
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn minute(n: i64) -> Timestamp {
    Timestamp::from_second(1_798_761_600 + n * 60).unwrap()
}

/// (type, ok, reason, message) as the controller writes conditions: through its own setter.
type Cond<'a> = (&'a str, bool, &'a str, &'a str);

fn conditions(list: &[Cond<'_>]) -> Vec<Condition> {
    let mut conditions = Vec::new();
    for (type_, ok, reason, message) in list {
        set_condition(&mut conditions, type_, *ok, reason, (*message).into(), minute(0), Some(1));
    }
    conditions
}

/// The example GpuCluster (`llm-finetune`, 2 workers) at generation 1, with `status`.
fn cluster(status: Option<GpuClusterStatus>) -> GpuCluster {
    let text = std::fs::read_to_string(example("gpucluster.yaml")).unwrap();
    let mut cluster: GpuCluster =
        serde_yaml::from_str(text.split("\n---").next().unwrap()).unwrap();
    cluster.metadata.generation = Some(1);
    cluster.status = status;
    cluster
}

fn cluster_status(phase: Option<ClusterPhase>, list: &[Cond<'_>]) -> GpuClusterStatus {
    GpuClusterStatus {
        phase,
        conditions: conditions(list),
        observed_generation: Some(1),
        ..Default::default()
    }
}

fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap()
}

/// `obj` with its status replaced by `status` (JSON the typed status cannot hold).
fn with_status(mut obj: Value, status: Value) -> Value {
    obj["status"] = status;
    obj
}

#[test]
fn gpucluster_health_follows_phase_and_conditions() {
    use ClusterPhase::*;
    let funded = (FUNDED, true, "DepositCovers", "deposit 160 covers 160");
    let short = (FUNDED, false, "DepositShort", "deposit 10 is below the 160 required");
    let matching = (MATCHED, false, "Matching", "looking for GPUs");
    let no_supply = (MATCHED, false, "NoMatchingSupply", "no A100 offers in eu-west");
    let bound = (MATCHED, true, "Bound", "32 GPUs bound through 4 leases");
    let placed = (DEGRADED, false, "AllWorkersPlaced", "all 4 workers have GPUs");
    let lost = "1 of 4 workers have no GPUs: looking for replacement GPUs";
    let missing = (DEGRADED, true, "MissingWorkers", lost);
    let all_lost = (DEGRADED, true, "MissingWorkers", "4 of 4 workers have no GPUs: no offers");
    let no_ray =
        (RAY_READY, false, "NoRayCluster", "the RayCluster is created once GPUs are bound");
    let starting = (RAY_READY, false, "Provisioning", "waiting for KubeRay to start the pods");
    let ready = (RAY_READY, true, "Ready", "the RayCluster is ready");

    let live =
        |phase, list: &[Cond<'_>]| to_json(&cluster(Some(cluster_status(Some(phase), list))));
    let running = cluster_status(Some(Running), &[bound, funded, ready, placed]);
    // How the controller ends a cluster, from the status it had.
    let ended = |from: &GpuClusterStatus, phase, reason, message: &str| {
        ended_status(&cluster(Some(from.clone())), &[], phase, reason, message.into(), minute(9))
    };
    let dry =
        "escrow exhausted: lease llm-finetune-0 ended OutOfFunds; deposit more for a new cluster";
    let out_of_funds = ended(&running, Failed, "OutOfFunds", dry);
    let invalid = ended(
        &cluster_status(Some(Pending), &[matching, short]),
        Failed,
        "InvalidSpec",
        "spec.duration: invalid duration \"2 hours\"",
    );
    let expired = ended(&running, Completed, "Expired", "ran its duration 2h");
    // A spec edited after the controller last looked (generation 2, observedGeneration 1).
    let edited = |status: GpuClusterStatus| {
        let mut cluster = cluster(Some(status));
        cluster.metadata.generation = Some(2);
        to_json(&cluster)
    };
    let mut deleting = cluster(Some(running.clone()));
    deleting.metadata.deletion_timestamp = Some(Time(minute(9)));
    deleting.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let base = to_json(&cluster(None));

    assert_health(&[
        ("no status", base.clone(), "Progressing", "Waiting for the gpumarket controller"),
        (
            "empty status",
            with_status(base.clone(), json!({})),
            "Progressing",
            "Waiting for the gpumarket controller",
        ),
        (
            "conditions without a phase",
            to_json(&cluster(Some(cluster_status(None, &[no_supply, short])))),
            "Progressing",
            "deposit 10 is below the 160 required",
        ),
        (
            "phase without conditions",
            with_status(base.clone(), json!({"phase": "Pending"})),
            "Progressing",
            "Waiting for matching GPUs",
        ),
        ("Pending, matching", live(Pending, &[matching]), "Progressing", "looking for GPUs"),
        (
            "Pending, no supply",
            live(Pending, &[no_supply, funded]),
            "Progressing",
            "no A100 offers in eu-west",
        ),
        (
            "Pending, deposit short (said before the supply)",
            live(Pending, &[no_supply, short]),
            "Progressing",
            "deposit 10 is below the 160 required",
        ),
        (
            "Matched",
            live(Matched, &[bound, funded, no_ray]),
            "Progressing",
            "the RayCluster is created once GPUs are bound",
        ),
        (
            "Matched, no conditions",
            live(Matched, &[]),
            "Progressing",
            "GPUs bound, Ray cluster starting",
        ),
        (
            "Provisioning",
            live(Provisioning, &[bound, funded, starting, placed]),
            "Progressing",
            "waiting for KubeRay to start the pods",
        ),
        (
            "Provisioning again after every worker was lost",
            live(Provisioning, &[bound, funded, no_ray, all_lost]),
            "Progressing",
            "4 of 4 workers have no GPUs: no offers",
        ),
        ("Running", to_json(&cluster(Some(running.clone()))), "Healthy", "Ray cluster running"),
        ("Running, no conditions", live(Running, &[]), "Healthy", "Ray cluster running"),
        (
            "Running, a worker lost",
            live(Running, &[bound, funded, ready, missing]),
            "Degraded",
            lost,
        ),
        (
            "Running, spec ahead of the status",
            edited(running.clone()),
            "Progressing",
            "Waiting for the gpumarket controller to observe the latest spec",
        ),
        (
            "Expiring",
            to_json(&cluster(Some(GpuClusterStatus { phase: Some(Expiring), ..running.clone() }))),
            "Progressing",
            "Ending: deleting the RayCluster and ending its leases",
        ),
        ("Completed", to_json(&cluster(Some(expired))), "Healthy", "Expired: ran its duration 2h"),
        ("Completed, no conditions", live(Completed, &[]), "Healthy", "Ran its duration"),
        (
            "Failed out of funds (Degraded False from when it ran)",
            to_json(&cluster(Some(out_of_funds.clone()))),
            "Degraded",
            &format!("OutOfFunds: {dry}"),
        ),
        (
            "Failed on an invalid spec (deposit short)",
            to_json(&cluster(Some(invalid))),
            "Degraded",
            "InvalidSpec: spec.duration: invalid duration \"2 hours\"",
        ),
        (
            "Failed, spec edited since (the controller no longer looks)",
            edited(out_of_funds),
            "Degraded",
            &format!("OutOfFunds: {dry}"),
        ),
        ("Failed, no conditions", live(Failed, &[]), "Degraded", "Failed"),
        (
            "unknown phase",
            with_status(base, json!({"phase": "Hibernating", "observedGeneration": 1})),
            "Unknown",
            "Unknown phase Hibernating",
        ),
        (
            "deleted, waiting for its refund (Argo CD's own verdict)",
            to_json(&deleting),
            "Progressing",
            &format!("Pending deletion; blocked by finalizers: {FINALIZER}"),
        ),
    ]);
}

/// A node's GpuOffer of two H100s (generation 1), with `status`, its heartbeat at minute 0.
fn offer(status: Option<GpuOfferStatus>) -> GpuOffer {
    let spec = json!({
        "nodeName": "n1", "wallet": WALLET, "pricePerGpuHour": 1, "region": "eu-west",
        "gpus": [{"uuid": "GPU-1", "model": "H100", "memoryMib": 81559},
                 {"uuid": "GPU-2", "model": "H100", "memoryMib": 81559}]
    });
    let mut offer = GpuOffer::new("n1", serde_json::from_value(spec).unwrap());
    offer.metadata.generation = Some(1);
    offer.status = status;
    offer
}

/// The agent's report: GPU health (uuid, health, reason), free GPUs, a heartbeat at minute 0.
fn reported(gpus: Value, free: u32) -> GpuOfferStatus {
    GpuOfferStatus {
        gpus: serde_json::from_value(gpus).unwrap(),
        free_gpus: Some(free),
        last_heartbeat: Some(Time(minute(0))),
        ..Default::default()
    }
}

/// `offer` as the controller's offer reconcile leaves it at `now`: Available set from its
/// own `availability`, observedGeneration current.
fn assessed(mut offer: GpuOffer, now: Timestamp) -> Value {
    let (ok, reason, message) = availability(&offer, now, Duration::from_secs(30));
    let status = offer.status.get_or_insert_default();
    set_condition(&mut status.conditions, AVAILABLE, ok, reason, message, now, Some(1));
    status.observed_generation = Some(1);
    to_json(&offer)
}

#[test]
fn gpuoffer_health_follows_gpu_health_and_availability() {
    let healthy = json!([{"uuid": "GPU-1", "health": "Healthy", "lease": "l-1"},
                         {"uuid": "GPU-2", "health": "Healthy"}]);
    let one_sick = json!([{"uuid": "GPU-1", "health": "Healthy"},
                          {"uuid": "GPU-2", "health": "Unhealthy", "reason": "XID 79"}]);
    let all_sick = json!([{"uuid": "GPU-1", "health": "Unhealthy"},
                          {"uuid": "GPU-2", "health": "Unhealthy"}]);
    let unreported = json!([{"uuid": "GPU-1"}, {"uuid": "GPU-2"}]);
    let mut bad_wallet = offer(Some(reported(healthy.clone(), 2)));
    bad_wallet.spec.wallet = "not-a-key".into();
    let bad_wallet = assessed(bad_wallet, minute(0));
    // The agent fixed its wallet (generation 2); the controller has not looked yet.
    let mut fixed_wallet = bad_wallet.clone();
    fixed_wallet["metadata"]["generation"] = json!(2);
    fixed_wallet["spec"]["wallet"] = json!(WALLET);
    let mut healthy_condition_false = offer(Some(reported(healthy.clone(), 2)));
    healthy_condition_false.status.as_mut().unwrap().conditions =
        conditions(&[("Healthy", false, "Xid", "XID 79 on GPU-2")]);
    let base = to_json(&offer(None));

    assert_health(&[
        (
            "no status",
            base.clone(),
            "Progressing",
            "Waiting for the first heartbeat of the supplier agent",
        ),
        (
            "empty status",
            with_status(base, json!({})),
            "Progressing",
            "Waiting for the gpumarket controller to assess the offer",
        ),
        (
            "reported, not assessed yet",
            to_json(&offer(Some(reported(healthy.clone(), 2)))),
            "Progressing",
            "Waiting for the gpumarket controller to assess the offer",
        ),
        (
            "available, one GPU leased",
            assessed(offer(Some(reported(healthy.clone(), 1))), minute(0)),
            "Healthy",
            "1 of 2 GPUs free",
        ),
        (
            "available, health not reported yet",
            assessed(offer(Some(reported(unreported, 2))), minute(0)),
            "Healthy",
            "2 of 2 GPUs free",
        ),
        (
            "heartbeat stale",
            assessed(offer(Some(reported(healthy, 2))), minute(5)),
            "Degraded",
            "no heartbeat from the node's agent within 30s",
        ),
        (
            "invalid wallet",
            bad_wallet.clone(),
            "Degraded",
            bad_wallet["status"]["conditions"][0]["message"].as_str().unwrap(),
        ),
        (
            "spec ahead of the status",
            fixed_wallet,
            "Progressing",
            "Waiting for the gpumarket controller to assess the latest spec",
        ),
        (
            "one GPU unhealthy, still available",
            assessed(offer(Some(reported(one_sick, 1))), minute(0)),
            "Degraded",
            "1 of 2 GPUs unhealthy (GPU-2: XID 79)",
        ),
        (
            "every GPU unhealthy",
            assessed(offer(Some(reported(all_sick, 0))), minute(0)),
            "Degraded",
            "2 of 2 GPUs unhealthy (GPU-1)",
        ),
        (
            "Healthy condition False",
            to_json(&healthy_condition_false),
            "Degraded",
            "XID 79 on GPU-2",
        ),
    ]);
}

#[test]
fn argocd_health_configmap_carries_the_lua_files_under_argocd_cm_keys() {
    let objects = render(&[], &[]);
    let data = &find(&objects, "ConfigMap", "gpumarket-argocd-health")["data"];
    for (kind, file) in
        [("GpuCluster", "gpucluster-health.lua"), ("GpuOffer", "gpuoffer-health.lua")]
    {
        let script = std::fs::read_to_string(chart_dir().join("argocd").join(file)).unwrap();
        let key = format!("resource.customizations.health.gpumarket.io_{kind}");
        assert_eq!(data[&key].as_str().map(str::trim_end), Some(script.trim_end()), "{key}");
    }
}

// ---- Against the real API server ----

fn kubectl(env: &Env) -> Command {
    let mut cmd = tool("kubectl");
    cmd.arg("--kubeconfig").arg(env.kubeconfig());
    cmd
}

#[tokio::test]
async fn the_api_server_accepts_every_rendered_manifest() -> anyhow::Result<()> {
    let env = Env::shared().await;
    let ns = env.namespace("chart-dry-run").await?;
    for (values, sets) in shipped_values() {
        // With the CRDs: the API server must accept the committed schemas (CEL cost budget).
        let (ok, yaml, stderr) = run(
            tool("helm")
                .args(["template", "gpumarket"])
                .arg(chart_dir())
                .args(["--namespace", &ns, "--include-crds"])
                .args(helm_args(&values, &sets)),
            "",
        );
        assert!(ok, "{stderr}");
        let (ok, stdout, stderr) = run(
            kubectl(env).args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--dry-run=server",
                "-f",
                "-",
            ]),
            &yaml,
        );
        assert!(ok, "{values:?} {sets:?} refused by the API server:\n{stdout}\n{stderr}");
    }
    Ok(())
}

/// A client that acts as `user` (a service account) with the node-name extra of a pod-bound
/// token when `node` is given, the way the API server sees the agent's requests.
async fn impersonating(env: &Env, user: &str, node: Option<&str>) -> anyhow::Result<kube::Client> {
    let namespace = user.split(':').nth(2).unwrap_or_default();
    let groups = vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{namespace}"),
        "system:authenticated".into(),
    ];
    let extra = node.map(|n| HashMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])]));
    acting_as(env, user, groups, extra).await
}

/// A client that acts as a person `user` (authenticated, in no other group).
async fn as_person(env: &Env, user: &str) -> anyhow::Result<kube::Client> {
    acting_as(env, user, vec!["system:authenticated".into()], None).await
}

/// The admin's client impersonating `user` in `groups`, with `extra` user info.
async fn acting_as(
    env: &Env,
    user: &str,
    groups: Vec<String>,
    extra: Option<HashMap<String, Vec<String>>>,
) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(env.kubeconfig())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(groups);
    config.auth_info.impersonate_user_extra = extra;
    Ok(kube::Client::try_from(config)?)
}

/// The message of the API error a write must fail with.
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            status.message
        }
        other => panic!("expected the write to be refused, got {other:?}"),
    }
}

/// Installs the chart with `examples/values-local.yaml` into `ns` for real (KWOK runs its
/// controller and agent pods as simulated pods), with a settlement Secret; returns the prefix
/// of its object names. The release is named after the namespace so that its cluster-scoped
/// objects are unique too. The environment has installed the CRDs already (the same files, see
/// crds/tests/generated.rs).
async fn install_chart(
    env: &Env,
    admin: &kube::Client,
    ns: &str,
    sets: &[&str],
) -> anyhow::Result<String> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "gpumarket-settlement"},
        "stringData": {"keypair.json": "[]", "rpc-url": "http://127.0.0.1:1"}
    }))?;
    Api::<Secret>::namespaced(admin.clone(), ns).create(&PostParams::default(), &secret).await?;
    Ok(helm_install(env, ns, &["values-local.yaml"], sets))
}

/// `helm install` of the chart into `ns` (the release named after it, CRDs skipped); returns
/// the prefix of its object names.
fn helm_install(env: &Env, ns: &str, values: &[&str], sets: &[&str]) -> String {
    let (ok, stdout, stderr) = run(
        tool("helm")
            .args(["install", ns])
            .arg(chart_dir())
            .args(["--namespace", ns, "--skip-crds", "--kubeconfig"])
            .arg(env.kubeconfig())
            .args(helm_args(values, sets)),
        "",
    );
    assert!(ok, "helm install:\n{stdout}\n{stderr}");
    format!("{ns}-gpumarket")
}

/// Tests that install the chart take turns: the controller started by one would otherwise
/// write the status of the other's offers.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn heartbeat() -> Patch<Value> {
    Patch::Merge(json!({"status": {"lastHeartbeat": "2026-01-01T00:00:00Z"}}))
}

#[tokio::test]
async fn installed_chart_confines_each_agent_to_its_node_and_keeps_the_controller_off_secrets()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let env = Env::shared().await;
    let ns = env.namespace("chart-install").await?;
    env.add_gpu_nodes(&[GpuNode::new("chart-a", "H100", 2), GpuNode::new("chart-b", "H100", 2)])
        .await?;
    let admin = env.client().await?;

    let fullname = install_chart(env, &admin, &ns, &[]).await?;
    let other: Secret = serde_json::from_value(json!({"metadata": {"name": "buyer-credentials"}}))?;
    Api::<Secret>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &other).await?;

    let offers_admin: Api<GpuOffer> = Api::all(admin.clone());
    let offer_for = |node: &str| -> GpuOffer {
        let mut offer = offer(None);
        offer.metadata.name = Some(node.into());
        offer.spec.node_name = node.into();
        offer
    };
    offers_admin.create(&PostParams::default(), &offer_for("chart-b")).await?;

    let agent_user = format!("system:serviceaccount:{ns}:{fullname}-agent");
    let agent = impersonating(env, &agent_user, Some("chart-a")).await?;
    let offers: Api<GpuOffer> = Api::all(agent.clone());
    let pp = PatchParams::default();

    // The policy takes effect once the API server has loaded it.
    let mut message = String::new();
    for _ in 0..60 {
        match offers.patch_status("chart-b", &pp, &heartbeat()).await {
            Err(e) => {
                message = refusal::<GpuOffer>(Err(e));
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    assert_eq!(
        message,
        format!(
            "gpuoffers.gpumarket.io \"chart-b\" is forbidden: ValidatingAdmissionPolicy \
             '{fullname}-supplier-isolation' with binding '{fullname}-supplier-isolation' denied \
             request: the gpumarket supplier agent of node chart-a may write only its own \
             GpuOffer named chart-a, not chart-b"
        )
    );

    // The agent creates its own node's offer, and no other.
    offers.create(&PostParams::default(), &offer_for("chart-a")).await?;
    let message = refusal(offers.create(&PostParams::default(), &offer_for("chart-c")).await);
    assert!(message.contains("may write only its own GpuOffer named chart-a, not chart-c"));

    // The controller's share of the status: reputation, stake and a leased GPU.
    let controlled = json!({"status": {
        "stake": {"account": "11111111111111111111111111111111", "bonded": 5_000_000},
        "reputation": {"uptimePermille": 990, "leasesCompleted": 3, "leasesFailed": 0, "score": 900},
        "gpus": [{"uuid": "GPU-1", "health": "Healthy", "lease": "lease-1"}, {"uuid": "GPU-2", "health": "Healthy"}]
    }});
    offers_admin.patch_status("chart-a", &pp, &Patch::Merge(controlled)).await?;

    // Its own heartbeat, GPU health and price are the agent's to write.
    offers.patch_status("chart-a", &pp, &heartbeat()).await?;
    let health = json!({"status": {"gpus": [
        {"uuid": "GPU-1", "health": "Unhealthy", "reason": "XID 79", "lease": "lease-1"},
        {"uuid": "GPU-2", "health": "Healthy"}]}});
    offers.patch_status("chart-a", &pp, &Patch::Merge(health)).await?;
    offers
        .patch("chart-a", &pp, &Patch::Merge(json!({"spec": {"pricePerGpuHour": 2_300_000}})))
        .await?;
    // ...and so is its answer to a proof-of-compute challenge, but not the challenge or verdict.
    let answer = json!({"status": {"computeAnswer": {"nonce": "ab", "commitments": []}}});
    offers.patch_status("chart-a", &pp, &Patch::Merge(answer)).await?;

    let forbidden = [
        (
            json!({"status": {"reputation": {"uptimePermille": 1000, "leasesCompleted": 9, "leasesFailed": 0, "score": 1000}}}),
            "status.reputation of a GpuOffer is written only by the gpumarket controller",
        ),
        (
            json!({"status": {"stake": {"account": "11111111111111111111111111111111", "bonded": 1}}}),
            "status.stake of a GpuOffer is written only by the gpumarket controller",
        ),
        (
            json!({"status": {"gpus": [{"uuid": "GPU-1", "health": "Healthy"}, {"uuid": "GPU-2", "health": "Healthy"}]}}),
            "status.gpus[].lease of a GpuOffer is written only by the gpumarket controller",
        ),
        (
            json!({"status": {"gpus": [{"uuid": "GPU-1", "health": "Healthy", "lease": "lease-1"}, {"uuid": "GPU-2", "health": "Healthy", "lease": "mine"}]}}),
            "status.gpus[].lease of a GpuOffer is written only by the gpumarket controller",
        ),
        (
            json!({"status": {"proofOfCompute": {"passed": 9, "failed": 0}}}),
            "status.proofOfCompute of a GpuOffer (the challenge and its tally) is written only by the gpumarket controller",
        ),
        (
            json!({"status": {"conditions": [{"type": "ComputeVerified", "status": "True", "reason": "Verified", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
            "status.conditions of a GpuOffer (Available, Verified, ComputeVerified) are written only by the gpumarket controller",
        ),
    ];
    for (patch, expected) in forbidden {
        let message =
            refusal(offers.patch_status("chart-a", &pp, &Patch::Merge(patch.clone())).await);
        assert!(message.contains(expected), "{patch}: {message}");
    }
    let unchanged = offers_admin.get_status("chart-a").await?.status.unwrap_or_default();
    assert_eq!(unchanged.stake.map(|s| s.bonded), Some(5_000_000));
    assert_eq!(unchanged.reputation.map(|r| r.score), Some(900));

    // Nodes: its own, not another.
    let nodes: Api<Node> = Api::all(agent.clone());
    let label = Patch::Merge(json!({"metadata": {"labels": {"gpumarket.io/offer": "true"}}}));
    nodes.patch("chart-a", &pp, &label).await?;
    let message = refusal(nodes.patch("chart-b", &pp, &label).await);
    assert!(
        message.contains("may write only its own Node named chart-a, not chart-b"),
        "{message}"
    );
    agent_marks_its_node_but_cannot_unmark_or_relabel_it(&admin, &nodes, "chart-a").await?;

    // A token that is not bound to a node (e.g. `kubectl create token`) writes nothing.
    let unbound = impersonating(env, &agent_user, None).await?;
    let message =
        refusal(Api::<GpuOffer>::all(unbound).patch_status("chart-a", &pp, &heartbeat()).await);
    assert!(
        message.contains("must authenticate with the service-account token of a pod"),
        "{message}"
    );

    // The controller reads no Secret, not even its own key Secret (that one is a mounted file).
    let controller =
        impersonating(env, &format!("system:serviceaccount:{ns}:{fullname}-controller"), None)
            .await?;
    let secrets: Api<Secret> = Api::namespaced(controller.clone(), &ns);
    for name in ["buyer-credentials", "gpumarket-settlement"] {
        refusal(secrets.get(name).await);
    }
    refusal(secrets.list(&ListParams::default()).await);
    // ...while it does reach what it reconciles.
    Api::<GpuCluster>::all(controller.clone()).list(&ListParams::default()).await?;
    let stake = Patch::Merge(
        json!({"status": {"stake": {"account": "11111111111111111111111111111111", "bonded": 6_000_000}}}),
    );
    Api::<GpuOffer>::all(controller).patch_status("chart-b", &pp, &stake).await?;
    Ok(())
}

/// `mark_node`, retried while the node's status heartbeats race its resourceVersion check.
async fn mark(nodes: &Api<Node>, name: &str, model: &str) -> anyhow::Result<()> {
    for _ in 0..10 {
        match gpumarket_device_plugin::node::mark_node(nodes, name, Some(model)).await {
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            other => return Ok(other?),
        }
    }
    anyhow::bail!("mark_node of {name} conflicted 10 times")
}

/// Through the supplier-isolation policy, the agent of `name` (`nodes` acts as it) taints and
/// labels its Node as `mark_node` does, and cannot take the taint off again, touch other taints,
/// system labels or annotations, remove the market-node label, or change the rest of the spec.
async fn agent_marks_its_node_but_cannot_unmark_or_relabel_it(
    admin: &kube::Client,
    nodes: &Api<Node>,
    name: &str,
) -> anyhow::Result<()> {
    let pp = PatchParams::default();
    let nodes_admin: Api<Node> = Api::all(admin.clone());
    let dedicated = json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"});
    let admin_taint = Patch::Merge(json!({"spec": {"taints": [dedicated]}}));
    nodes_admin.patch(name, &pp, &admin_taint).await?;
    let before = nodes_admin.get(name).await?;

    // What the agent does: taint (beside the admin's taint), label with the model, relabel.
    mark(nodes, name, "A100").await?;
    mark(nodes, name, "H100").await?;
    let marked = nodes_admin.get(name).await?;
    let taints = marked.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let taints: Vec<(&str, &str)> =
        taints.iter().map(|t| (t.key.as_str(), t.effect.as_str())).collect();
    assert_eq!(taints, [("dedicated", "NoSchedule"), ("gpumarket.io/supplier", "NoSchedule")]);
    assert_eq!(marked.metadata.labels.as_ref().unwrap()["gpumarket.io/gpu-model"], "H100");

    let supplier = json!({"key": "gpumarket.io/supplier", "effect": "NoSchedule"});
    let untaint = "may not remove or change the gpumarket.io/supplier:NoSchedule taint";
    let other_taints = "may add only the gpumarket.io/supplier:NoSchedule taint to its Node; \
                        it may not add, remove or change any other taint";
    let system_label = |key: &str| {
        format!("may add, change or remove only gpumarket.io/ labels of its Node, not {key} ")
    };
    let forbidden = [
        (json!({"spec": {"taints": [dedicated]}}), untaint.to_owned()),
        (json!({"spec": {"taints": []}}), untaint.to_owned()),
        (
            json!({"spec": {"taints": [dedicated, {"key": "gpumarket.io/supplier", "effect": "PreferNoSchedule"}]}}),
            untaint.to_owned(),
        ),
        (json!({"spec": {"taints": [supplier]}}), other_taints.to_owned()),
        (
            json!({"spec": {"taints": [dedicated, supplier, {"key": "example.com/mine", "effect": "NoSchedule"}]}}),
            other_taints.to_owned(),
        ),
        (
            json!({"metadata": {"labels": {"kubernetes.io/hostname": "chart-b"}}}),
            system_label("kubernetes.io/hostname"),
        ),
        (
            json!({"metadata": {"labels": {"topology.kubernetes.io/region": "elsewhere"}}}),
            system_label("topology.kubernetes.io/region"),
        ),
        (
            json!({"metadata": {"labels": {"topology.kubernetes.io/region": null}}}),
            system_label("topology.kubernetes.io/region"),
        ),
        (
            json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "elsewhere-1a"}}}),
            system_label("topology.kubernetes.io/zone"),
        ),
        (
            json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
            system_label("node-role.kubernetes.io/control-plane"),
        ),
        (
            json!({"metadata": {"labels": {"node.kubernetes.io/instance-type": "big"}}}),
            system_label("node.kubernetes.io/instance-type"),
        ),
        (
            json!({"metadata": {"labels": {"gpumarket.io/gpu-model": null}}}),
            "may change but not remove the gpumarket.io/gpu-model label of its Node".to_owned(),
        ),
        (
            json!({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "30"}}}),
            "may add, change or remove only gpumarket.io/ annotations of its Node, not \
             node.alpha.kubernetes.io/ttl"
                .to_owned(),
        ),
        (
            json!({"spec": {"unschedulable": true}}),
            "may change only the taints of its Node's spec".to_owned(),
        ),
        (
            json!({"spec": {"providerID": "kwok://elsewhere"}}),
            "may change only the taints of its Node's spec".to_owned(),
        ),
    ];
    for (patch, expected) in forbidden {
        let message = refusal(nodes.patch(name, &pp, &Patch::Merge(patch.clone())).await);
        assert!(message.contains(&expected), "{patch}: {message}");
    }

    // ...while its own labels and annotations are its to write.
    let own = json!({"metadata": {"labels": {"gpumarket.io/gpu-model": "A100", "gpumarket.io/x": "1"},
                                  "annotations": {"gpumarket.io/note": "mine"}}});
    nodes.patch(name, &pp, &Patch::Merge(own)).await?;
    let after = nodes_admin.get(name).await?;
    let system = |node: &Node| {
        node.metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("gpumarket.io/"))
            .collect::<Vec<_>>()
    };
    assert_eq!(system(&after), system(&before), "system labels unchanged");
    assert_eq!(after.spec.and_then(|s| s.taints).map(|t| t.len()), Some(2));
    Ok(())
}

/// The controller and the supplier agent, run in-process with exactly the permissions the chart
/// gives their service accounts (impersonated; the agent with its node's token, so through the
/// supplier-isolation policy), and the controller with leader election on the chart's Lease,
/// take a GpuCluster from Pending to a created RayCluster; the leader points the tunnel's
/// Service at itself. A missing permission stalls them.
#[tokio::test]
async fn controller_and_agent_work_with_exactly_the_charts_permissions() -> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    gpumarket_tests::log_to_test_output();
    let env = Env::shared().await;
    let ns = env.namespace("chart-rbac").await?;
    let (node, region) = ("chart-rbac-h100", "chart-rbac");
    env.add_gpu_nodes(&[GpuNode::new(node, "H100", 2).region(region)]).await?;
    let admin = env.client().await?;
    // With the tunnel, whose permissions are exercised too.
    let tunnel = ["controller.tunnel.enabled=true", "controller.tunnel.tlsSecret=tunnel-tls"];
    let fullname = install_chart(env, &admin, &ns, &tunnel).await?;

    // The real agent (offer-only, a fake device file), as the chart's agent service account
    // with its node's token: it taints its node and publishes and heartbeats the node's offer.
    let as_agent =
        impersonating(env, &format!("system:serviceaccount:{ns}:{fullname}-agent"), Some(node))
            .await?;
    let devices = tempfile::NamedTempFile::new()?;
    std::fs::write(
        devices.path(),
        "gpus:\n  - {uuid: GPU-1, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}\n  \
         - {uuid: GPU-2, productName: NVIDIA H100 80GB HBM3, memoryMib: 81559}\n",
    )?;
    let source = format!("fake:{}", devices.path().display());
    // The agent signs its offer with the wallet's keypair, as the market requires.
    let wallet = tempfile::NamedTempFile::new()?;
    solana_sdk::signer::keypair::write_keypair_file(
        &solana_sdk::signature::Keypair::new(),
        wallet.path(),
    )
    .map_err(|e| anyhow::anyhow!("writing the wallet keypair: {e}"))?;
    let wallet = wallet.path().display().to_string();
    let args = gpumarket_device_plugin::config::Args::parse_from([
        "gpumarket-device-plugin",
        "--node-name",
        node,
        "--mode",
        "offer-only",
        "--source",
        &source,
        "--wallet-keypair",
        &wallet,
        "--price",
        "H100=2200000",
        "--heartbeat-interval",
        "1s",
    ]);
    let supplier = gpumarket_device_plugin::config::Supplier::from_args(&args)?;
    let devices_source = std::sync::Arc::new(
        gpumarket_device_plugin::source::fake::FakeSource::from_file(devices.path())?,
    );
    let agent = gpumarket_device_plugin::agent::Agent::prepare(
        gpumarket_device_plugin::agent::AgentConfig::new(&args, supplier),
        devices_source,
    )?;
    let agent = tokio::spawn(agent.run(Some(as_agent)));

    let as_controller =
        impersonating(env, &format!("system:serviceaccount:{ns}:{fullname}-controller"), None)
            .await?;
    let tunnel_port = gpumarket_tests::ports::free_tcp_ports(1)?[0];
    const POD_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 0, 99);
    let config = gpumarket_controller::Config {
        settings: gpumarket_controller::Settings {
            heartbeat_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        namespace: ns.clone(),
        metrics_addr: None,
        leader_election: Some(gpumarket_controller::LeaderElection {
            namespace: ns.clone(),
            lease_name: format!("{fullname}-controller"),
            identity: "chart-test".into(),
            lease_duration: Duration::from_secs(15),
        }),
        tunnel: Some(TunnelConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], tunnel_port)),
            tls: None,
            // The pod IP the Service is pointed at (no cluster runs in a fleet here, so no
            // gateway listens on it; Kubernetes refuses loopback endpoints).
            gateway_address: POD_IP,
            gateway_ports: None,
            service: Some(format!("{fullname}-controller-tunnel")),
        }),
        ..Default::default()
    };
    let shutdown = config.shutdown.clone();
    // RBAC caches catch up with the new bindings within moments; start once they have.
    for _ in 0..40 {
        let probe = Api::<GpuLease>::all(as_controller.clone()).list(&ListParams::default()).await;
        if probe.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let controller = tokio::spawn(gpumarket_controller::run(as_controller, config));

    let cluster: GpuCluster = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster",
        "metadata": {"name": "rbac"},
        "spec": {"gpu": {"models": ["H100"]}, "workers": 1, "gpusPerWorker": 2, "duration": "1h",
                 "maxPricePerGpuHour": 5_000_000, "location": {"region": region},
                 "payment": {"buyerWallet": WALLET}}
    }))?;
    let clusters: Api<GpuCluster> = Api::namespaced(admin.clone(), &ns);
    clusters.create(&PostParams::default(), &cluster).await?;

    let ray = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("ray.io", "v1", "RayCluster"),
        "rayclusters",
    );
    let rays: Api<kube::api::DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &ray);
    // Provisioning: leases bound, the RayCluster created.
    let mut phase = None;
    for _ in 0..120 {
        if controller.is_finished() {
            panic!("the controller stopped: {:?}", controller.await);
        }
        phase = clusters.get_status("rbac").await?.status.and_then(|s| s.phase);
        if phase == Some(ClusterPhase::Provisioning) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(phase, Some(ClusterPhase::Provisioning), "after 30 s");
    assert_eq!(rays.list(&ListParams::default()).await?.items.len(), 1);
    let leases = Api::<GpuLease>::all(admin.clone()).list(&ListParams::default()).await?;
    assert!(leases.items.iter().any(|l| l.spec.offer == node), "no GpuLease on {node}");
    let lease: k8s_openapi::api::coordination::v1::Lease =
        Api::namespaced(admin.clone(), &ns).get(&format!("{fullname}-controller")).await?;
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("chart-test"));
    // Leading, it serves the tunnel and points the tunnel's Service at itself.
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
    let slice = eventually("the tunnel's EndpointSlice", Duration::from_secs(30), || async {
        slices.get_opt(&format!("{fullname}-controller-tunnel")).await.ok()?
    })
    .await;
    let labels = slice.metadata.labels.unwrap_or_default();
    let service = format!("{fullname}-controller-tunnel");
    assert_eq!(labels.get("kubernetes.io/service-name"), Some(&service));
    let endpoints = slice.endpoints.unwrap_or_default();
    let addresses: Vec<Vec<String>> = endpoints.iter().map(|e| e.addresses.clone()).collect();
    assert_eq!(addresses, [[POD_IP.to_string()]]);
    let ports = slice.ports.unwrap_or_default();
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].port),
        (Some("tunnel"), Some(tunnel_port.into()))
    );
    let taints = Api::<Node>::all(admin.clone()).get(node).await?.spec.and_then(|s| s.taints);
    assert!(
        taints.unwrap_or_default().iter().any(|t| t.key == "gpumarket.io/supplier"),
        "the agent taints its own node"
    );
    // Shutdown gives the election Lease up at once (the next replica need not wait it out).
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), controller).await?;
    stopped??;
    let lease: k8s_openapi::api::coordination::v1::Lease =
        Api::namespaced(admin.clone(), &ns).get(&format!("{fullname}-controller")).await?;
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None, "released on shutdown");
    agent.abort();
    Ok(())
}

/// Whether `client`'s user may `verb` `resource` (of gpumarket.io) in `namespace` (all
/// namespaces when empty), as the API server's authorizer answers a SelfSubjectAccessReview.
async fn allowed(client: &kube::Client, verb: &str, resource: &str, namespace: &str) -> bool {
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({"spec": {
        "resourceAttributes": {"group": "gpumarket.io", "resource": resource, "verb": verb,
                               "namespace": namespace}}}))
    .unwrap();
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

/// A buyer's GpuCluster manifest, as `kubectl apply` sends it.
fn buyer_manifest(name: &str, workers: u32) -> Value {
    json!({"apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuCluster", "metadata": {"name": name},
           "spec": {"gpu": {"models": ["H100"]}, "workers": workers, "gpusPerWorker": 1,
                    "duration": "1h", "maxPricePerGpuHour": 1_000_000,
                    "payment": {"buyerWallet": WALLET}}})
}

/// Issue 15: buyers get their permissions through the built-in roles. The chart's buyer
/// ClusterRoles, applied for real, are aggregated by the controller-manager into edit, admin and
/// view. A RoleBinding to edit in one namespace lets a buyer apply, change and delete GpuClusters
/// there and nowhere else, but never write their status, an offer or a lease; view only reads.
/// Every refusal is the real request's 403.
#[tokio::test]
async fn buyers_bound_to_the_built_in_roles_manage_the_gpuclusters_of_their_namespace_only()
-> anyhow::Result<()> {
    let _turn = TURN.lock().await;
    let env = Env::shared().await;
    let admin = env.client().await?;
    let mine = env.namespace("buyer-mine").await?;
    let other = env.namespace("buyer-other").await?;

    // The chart's buyer roles, as `helm install` would create them (release named after the
    // namespace, so that its cluster-scoped roles are unique).
    let (ok, yaml, stderr) = run(
        tool("helm").args(["template", &mine]).arg(chart_dir()).args([
            "--namespace",
            &mine,
            "--show-only",
            "templates/buyer-rbac.yaml",
        ]),
        "",
    );
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = run(kubectl(env).args(["apply", "--server-side", "-f", "-"]), &yaml);
    assert!(ok, "{stdout}\n{stderr}");
    let user =
        |name: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name});
    let role = |name: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name});
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &mine);
    for (person, built_in) in [("alice", "edit"), ("bob", "view")] {
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{person}-{built_in}")},
            "roleRef": role(built_in), "subjects": [user(person)]}))?;
        bindings.create(&PostParams::default(), &binding).await?;
    }
    // Carol views the whole cluster (a ClusterRoleBinding): the market's offers and leases too.
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let carol = format!("{mine}-carol-view");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": carol}, "roleRef": role("view"), "subjects": [user("carol")]}))?;
    cluster_bindings.create(&PostParams::default(), &binding).await?;

    let (alice, bob, carol_client) = (
        as_person(env, "alice").await?,
        as_person(env, "bob").await?,
        as_person(env, "carol").await?,
    );
    // The aggregation controller copies the rules into the built-in roles within moments.
    for (client, verb, resource, namespace) in [
        (&alice, "create", "gpuclusters", mine.as_str()),
        (&bob, "list", "gpuclusters", mine.as_str()),
        (&carol_client, "list", "gpuleases", ""),
    ] {
        eventually(&format!("{verb} {resource} aggregated"), Duration::from_secs(30), || async {
            allowed(client, verb, resource, namespace).await.then_some(())
        })
        .await;
    }

    // Objects the buyer must not touch: another team's cluster, an offer, a lease.
    let theirs: GpuCluster = serde_json::from_value(buyer_manifest("theirs", 1))?;
    Api::<GpuCluster>::namespaced(admin.clone(), &other)
        .create(&PostParams::default(), &theirs)
        .await?;
    let offer_name = format!("{mine}-offer");
    let mut market_offer: GpuOffer = offer(None);
    market_offer.metadata.name = Some(offer_name.clone());
    market_offer.spec.node_name = offer_name.clone();
    Api::<GpuOffer>::all(admin.clone()).create(&PostParams::default(), &market_offer).await?;
    let lease_name = format!("{mine}-lease");
    let lease: GpuLease = serde_json::from_value(json!({
        "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuLease", "metadata": {"name": lease_name},
        "spec": {"cluster": {"namespace": other, "name": "theirs",
                             "uid": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"},
                 "offer": offer_name, "supplierWallet": WALLET, "gpus": ["GPU-1"], "workers": 1,
                 "pricePerGpuHour": 1_000_000, "startTime": "2026-01-01T00:00:00Z"}}))?;
    Api::<GpuLease>::all(admin.clone()).create(&PostParams::default(), &lease).await?;

    // Alice (edit in her namespace): applies, changes, reads and deletes her GpuClusters.
    let apply = PatchParams::apply("kubectl");
    let clusters: Api<GpuCluster> = Api::namespaced(alice.clone(), &mine);
    clusters.patch("train", &apply, &Patch::Apply(buyer_manifest("train", 1))).await?;
    let changed =
        clusters.patch("train", &apply, &Patch::Apply(buyer_manifest("train", 2))).await?;
    assert_eq!(changed.spec.workers, 2);
    let merged = Patch::Merge(json!({"metadata": {"labels": {"team": "ml"}}}));
    clusters.patch("train", &PatchParams::default(), &merged).await?;
    let mut replaced = clusters.get("train").await?;
    replaced.spec.duration = "2h".into();
    clusters.replace("train", &PostParams::default(), &replaced).await?;
    let second: GpuCluster = serde_json::from_value(buyer_manifest("second", 1))?;
    clusters.create(&PostParams::default(), &second).await?;
    assert_eq!(clusters.list(&ListParams::default()).await?.items.len(), 2);
    // ...but not their status: the controller's record of leases, escrow and refund.
    let forged = json!({"status": {"phase": "Running", "amountRefunded": 1}});
    refusal(clusters.patch_status("train", &PatchParams::default(), &Patch::Merge(&forged)).await);
    let mut status = clusters.get("train").await?;
    status.status = serde_json::from_value(forged["status"].clone())?;
    refusal(clusters.replace_status("train", &PostParams::default(), &status).await);
    // ...nor anything in another namespace.
    let elsewhere: Api<GpuCluster> = Api::namespaced(alice.clone(), &other);
    refusal(elsewhere.create(&PostParams::default(), &second).await);
    refusal(elsewhere.patch("mine", &apply, &Patch::Apply(buyer_manifest("mine", 1))).await);
    refusal(elsewhere.get("theirs").await);
    refusal(elsewhere.list(&ListParams::default()).await);
    refusal(elsewhere.delete("theirs", &DeleteParams::default()).await);
    // ...nor offers or leases (cluster-scoped: a RoleBinding does not even let her read them).
    let offers: Api<GpuOffer> = Api::all(alice.clone());
    refusal(offers.create(&PostParams::default(), &market_offer).await);
    refusal(offers.replace(&offer_name, &PostParams::default(), &market_offer).await);
    refusal(offers.patch(&offer_name, &PatchParams::default(), &heartbeat()).await);
    refusal(offers.patch_status(&offer_name, &PatchParams::default(), &heartbeat()).await);
    refusal(offers.delete(&offer_name, &DeleteParams::default()).await);
    refusal(offers.get(&offer_name).await);
    let leases: Api<GpuLease> = Api::all(alice.clone());
    let ended = Patch::Merge(json!({"status": {"phase": "Ended"}}));
    refusal(leases.create(&PostParams::default(), &lease).await);
    refusal(leases.replace(&lease_name, &PostParams::default(), &lease).await);
    refusal(leases.patch(&lease_name, &PatchParams::default(), &ended).await);
    refusal(leases.patch_status(&lease_name, &PatchParams::default(), &ended).await);
    refusal(leases.delete(&lease_name, &DeleteParams::default()).await);

    // Bob (view in the same namespace): reads, writes nothing.
    let viewed: Api<GpuCluster> = Api::namespaced(bob.clone(), &mine);
    assert_eq!(viewed.get("train").await?.spec.workers, 2);
    assert_eq!(viewed.list(&ListParams::default()).await?.items.len(), 2);
    let third: GpuCluster = serde_json::from_value(buyer_manifest("third", 1))?;
    refusal(viewed.create(&PostParams::default(), &third).await);
    refusal(viewed.patch("train", &apply, &Patch::Apply(buyer_manifest("train", 1))).await);
    refusal(viewed.delete("train", &DeleteParams::default()).await);
    refusal(Api::<GpuCluster>::namespaced(bob.clone(), &other).get("theirs").await);

    // Carol (view everywhere) reads the market's offers and leases, and writes none.
    Api::<GpuOffer>::all(carol_client.clone()).get(&offer_name).await?;
    Api::<GpuLease>::all(carol_client.clone()).get(&lease_name).await?;
    refusal(
        Api::<GpuLease>::all(carol_client.clone())
            .patch(&lease_name, &PatchParams::default(), &ended)
            .await,
    );

    // Alice deletes her own clusters.
    for name in ["train", "second"] {
        clusters.delete(name, &DeleteParams::default()).await?;
    }
    assert!(clusters.list(&ListParams::default()).await?.items.is_empty());

    Api::<GpuLease>::all(admin.clone()).delete(&lease_name, &DeleteParams::default()).await?;
    Api::<GpuOffer>::all(admin.clone()).delete(&offer_name, &DeleteParams::default()).await?;
    cluster_bindings.delete(&carol, &DeleteParams::default()).await?;
    Ok(())
}

/// The chart's fleet mode, installed for real: the real fleet agent, acting as the chart's fleet
/// ServiceAccount in its cluster and with its join credential on the hub (one API server plays
/// both here), offers the fleet's GPU node, runs the Ray head, its Service and a worker for the
/// work placed on it, reports them, and removes them when the work ends; it reads no Secret and
/// starts nothing outside its workload namespace.
#[tokio::test]
async fn fleet_agent_works_with_exactly_the_charts_fleet_permissions() -> anyhow::Result<()> {
    use gpumarket_crds::{FLEET_NAMESPACE, GpuFleet, fleet_offer_name};
    use gpumarket_device_plugin::fleet::{self, FleetConfig, join::join_objects, workload};
    use k8s_openapi::api::core::v1::{Pod, Service};

    let _turn = TURN.lock().await;
    let env = Env::shared().await;
    let ns = env.namespace("chart-fleet").await?;
    let (name, node) = ("chart-fleet", "chart-fleet-gpu");
    env.add_gpu_nodes(&[GpuNode::new(node, "H100", 2)]).await?;
    let admin = env.client().await?;
    let fullname = helm_install(env, &ns, &["values-fleet.yaml"], &[&format!("fleet.name={name}")]);
    let wallet = gpumarket_device_plugin::config::WalletKey(std::sync::Arc::new(
        solana_sdk::signature::Keypair::new(),
    ));
    let join: String = join_objects(name, &wallet.public_key())
        .map_err(anyhow::Error::msg)?
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
        .collect();
    let (ok, stdout, stderr) = run(kubectl(env).args(["apply", "--server-side", "-f", "-"]), &join);
    assert!(ok, "{stdout}{stderr}");

    let in_fleet =
        impersonating(env, &format!("system:serviceaccount:{ns}:{fullname}-fleet"), None).await?;
    let on_hub =
        impersonating(env, &format!("system:serviceaccount:{FLEET_NAMESPACE}:{name}"), None)
            .await?;
    // RBAC caches catch up with the new bindings within moments; start once they have.
    eventually("the chart's fleet RBAC in force", Duration::from_secs(10), || async {
        Api::<Node>::all(in_fleet.clone()).list(&ListParams::default()).await.ok()
    })
    .await;
    let config = FleetConfig {
        name: name.into(),
        wallet_key: wallet,
        prices: vec!["H100=2200000".into()],
        region: Some(name.into()),
        zone: None,
        heartbeat: Duration::from_secs(1),
        workload_check: Duration::from_millis(500),
        namespace: ns.clone(),
        reserve: gpumarket_device_plugin::offer::Reserve::default(),
        tunnel: None,
    };
    let agent = tokio::spawn(fleet::run(in_fleet.clone(), on_hub, config));
    let wait = Duration::from_secs(60);
    let offer = fleet_offer_name(name, node);
    let offers: Api<GpuOffer> = Api::all(admin.clone());
    eventually("the fleet's offer on the hub", wait, || async {
        offers.get_opt(&offer).await.unwrap().filter(|o| o.status.is_some())
    })
    .await;

    // Work placed on the fleet (as the hub's controller writes it).
    let fleets: Api<GpuFleet> = Api::all(admin.clone());
    let uid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let assign = |assignments: Value| {
        Patch::Apply(json!({
            "apiVersion": "gpumarket.io/v1alpha1", "kind": "GpuFleet",
            "status": {"assignments": assignments},
        }))
    };
    let work = json!([{"lease": "chart-fleet-l1", "offer": offer,
        "cluster": {"namespace": "buyers", "name": "llm", "uid": uid},
        "workers": 1, "gpusPerWorker": 2, "image": "rayproject/ray:2.41.0-gpu"}]);
    let as_hub = PatchParams::apply("gpumarket-controller").force();
    fleets.patch_status(name, &as_hub, &assign(work)).await?;
    let report = eventually("the fleet to report its worker", wait, || async {
        let fleet = fleets.get(name).await.unwrap();
        fleet.workload("chart-fleet-l1").filter(|w| w.workers == 1).cloned()
    })
    .await;
    assert_eq!(report.access, Some(workload::head_access(&ns, uid)));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let head = workload::head_name(uid);
    assert!(pods.get_opt(&head).await?.is_some(), "the Ray head runs in the fleet");
    assert!(services.get_opt(&head).await?.is_some(), "with its Service");

    // Nothing beyond: no Secret, no pod elsewhere, no Node written.
    let refused = refusal(
        Api::<Secret>::namespaced(in_fleet.clone(), &ns).list(&ListParams::default()).await,
    );
    assert!(refused.contains("cannot list resource \"secrets\""), "{refused}");
    let elsewhere: Pod = serde_json::from_value(json!({"metadata": {"name": "x"},
        "spec": {"containers": [{"name": "x", "image": "x"}]}}))?;
    let other = env.namespace("chart-fleet-other").await?;
    refusal(
        Api::<Pod>::namespaced(in_fleet.clone(), &other)
            .create(&PostParams::default(), &elsewhere)
            .await,
    );
    let label = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    refusal(Api::<Node>::all(in_fleet.clone()).patch(node, &PatchParams::default(), &label).await);

    // The work ends: the fleet removes the head, its Service and the worker.
    fleets.patch_status(name, &as_hub, &assign(json!([]))).await?;
    let managed = ListParams::default().labels(&format!("{}=true", workload::MANAGED_LABEL));
    eventually("the fleet to remove what it ran", wait, || async {
        let left = pods.list(&managed).await.unwrap().items.len()
            + services.list(&managed).await.unwrap().items.len();
        (left == 0).then_some(())
    })
    .await;
    agent.abort();
    let fleet_offers = ListParams::default().labels(&format!("gpumarket.io/fleet={name}"));
    offers.delete_collection(&DeleteParams::default(), &fleet_offers).await?;
    fleets.delete(name, &DeleteParams::default()).await?;
    Ok(())
}
