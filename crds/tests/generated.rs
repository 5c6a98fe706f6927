//! The committed CRD YAML is exactly what the Rust types generate, and the example manifests
//! users copy deserialize into those types.

// A failing expectation is meant to panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use gpumarket_crds::{GpuCluster, GpuOffer, GpuTier, Placement};
use kube::CustomResourceExt;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = repo_root();
    let chart_crds = root.join("charts/gpumarket/crds");
    for (name, generated) in gpumarket_crds::crd_files().unwrap() {
        let mut copies = vec![root.join("crds").join(&name)];
        if chart_crds.is_dir() {
            copies.push(chart_crds.join(&name));
        }
        for path in copies {
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == generated,
                "{} is out of date: run `cargo run -p gpumarket-crds --bin crdgen` and commit",
                path.display()
            );
        }
    }
}

#[test]
fn every_crd_has_status_short_names_and_printer_columns() {
    for crd in gpumarket_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{name}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().is_some_and(|s| s.status.is_some()), "{name}");
        let columns = version.additional_printer_columns.as_ref().map_or(0, Vec::len);
        assert!(columns >= 3, "{name} has {columns} printer columns");
    }
}

#[test]
fn schemas_carry_cel_rules_with_messages() {
    for crd in gpumarket_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut rules = Vec::new();
        collect_rules(&schema, &mut rules);
        assert!(!rules.is_empty(), "{:?} has no CEL rules", crd.metadata.name);
        for rule in rules {
            let message = rule["message"].as_str().unwrap_or_default();
            assert!(message.len() > 20, "rule {} lacks a helpful message", rule["rule"]);
        }
    }
}

fn collect_rules<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(rules)) = map.get("x-kubernetes-validations") {
                out.extend(rules);
            }
            map.values().for_each(|v| collect_rules(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_rules(v, out)),
        _ => {}
    }
}

fn example_documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

#[test]
fn example_clusters_deserialize_with_their_meaning() {
    let clusters: Vec<GpuCluster> = example_documents("gpucluster.yaml")
        .into_iter()
        .map(|doc| serde_yaml::from_value(doc).unwrap())
        .collect();
    let big = &clusters[0].spec;
    assert_eq!(big.gpu.min_tier, Some(GpuTier::A100));
    assert_eq!(big.total_gpus(), 16);
    assert_eq!(big.duration().unwrap().as_secs(), 7200);
    assert_eq!(big.placement, Placement::Pack);
    assert!(big.gpu.accepts("H100", 81559));
    assert!(!big.gpu.accepts("A6000", 49140));
    assert_eq!(clusters[1].spec.placement, Placement::Spread);
}

#[test]
fn example_offer_deserializes() {
    let offers: Vec<GpuOffer> = example_documents("gpuoffer.yaml")
        .into_iter()
        .map(|doc| serde_yaml::from_value(doc).unwrap())
        .collect();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].spec.gpus.len(), 2);
    assert!(gpumarket_crds::common::is_valid_wallet(&offers[0].spec.wallet));
}

/// Every string, list and map of every schema has a bound (or is an enum or a date-time), and
/// every 32-bit integer a maximum or a CEL rule that bounds it, so that no object the API
/// server accepts is one the controller cannot read, and no object grows without limit.
#[test]
fn every_string_list_map_and_small_integer_is_bounded() {
    fn walk(path: &str, node: &serde_json::Value, unbounded: &mut Vec<String>) {
        let Some(map) = node.as_object() else { return };
        let is = |t: &str| map.get("type").and_then(|v| v.as_str()) == Some(t);
        let has = |k: &str| map.contains_key(k);
        let rules: Vec<&str> = map
            .get("x-kubernetes-validations")
            .and_then(|r| r.as_array())
            .map(|r| r.iter().filter_map(|r| r["rule"].as_str()).collect())
            .unwrap_or_default();
        let bounded = match map.get("type").and_then(|v| v.as_str()) {
            Some("string") => has("maxLength") || has("enum"),
            Some("array") => has("maxItems"),
            Some("object") if has("additionalProperties") => has("maxProperties"),
            Some("integer") if map.get("format").and_then(|f| f.as_str()) == Some("uint32") => {
                has("maximum")
                    || rules.iter().any(|r| r.contains("self <=") || r.contains("self =="))
            }
            _ => {
                !map.get("x-kubernetes-int-or-string").is_some_and(|v| v == true)
                    || has("maxLength")
            }
        };
        // `apiVersion` and `kind` at the root are the API server's own.
        let root_string = is("string") && path.matches('.').count() == 1;
        if !bounded && !root_string {
            unbounded.push(path.to_owned());
        }
        if let Some(properties) = map.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in properties {
                walk(&format!("{path}.{name}"), child, unbounded);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = map.get(key) {
                walk(&format!("{path}[]"), child, unbounded);
            }
        }
    }
    // The walk finds what it is meant to find.
    let sample = serde_json::json!({"type": "object", "properties": {
        "kind": {"type": "string"},
        "spec": {"type": "object", "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 9}},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "count": {"type": "integer", "format": "uint32"},
            "cpu": {"x-kubernetes-int-or-string": true},
        }},
    }});
    let mut found = Vec::new();
    walk("X", &sample, &mut found);
    found.sort();
    assert_eq!(found, ["X.spec.count", "X.spec.cpu", "X.spec.env", "X.spec.env[]", "X.spec.name"]);

    for crd in gpumarket_crds::crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut unbounded = Vec::new();
        walk(&crd.spec.names.kind, &schema["openAPIV3Schema"], &mut unbounded);
        assert!(unbounded.is_empty(), "unbounded in the schema: {unbounded:#?}");
    }
}

/// The patterns and bounds the controller checks in Rust are the ones the schemas enforce.
#[test]
fn schema_rules_use_the_shared_patterns_and_bounds() {
    use gpumarket_crds::common::{
        ENV_NAME_PATTERN, GPU_UUID_PATTERN, MAX_CPU_MILLICORES, MAX_GPU_MEMORY_MIB,
        MAX_MEMORY_BYTES, MAX_MEMORY_MIB, MAX_PRICE_PER_GPU_HOUR, MAX_RAY_CLUSTER_NAME_LENGTH,
        RAY_CLUSTER_NAME_PATTERN,
    };
    let schemas: Vec<(String, String)> = gpumarket_crds::crds()
        .into_iter()
        .map(|crd| {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            (crd.spec.names.kind, schema.to_string())
        })
        .collect();
    let schema = |kind: &str| &schemas.iter().find(|(k, _)| k == kind).unwrap().1;
    for kind in ["GpuOffer", "GpuLease"] {
        assert!(schema(kind).contains(GPU_UUID_PATTERN), "{kind}");
        assert!(schema(kind).contains(&format!("self <= {MAX_PRICE_PER_GPU_HOUR}")), "{kind}");
    }
    assert!(schema("GpuOffer").contains(&format!("self <= {MAX_GPU_MEMORY_MIB}")));
    let cluster = schema("GpuCluster");
    assert!(cluster.contains(ENV_NAME_PATTERN));
    assert!(cluster.contains(RAY_CLUSTER_NAME_PATTERN));
    assert!(
        cluster.contains(&format!("size(self.metadata.name) <= {MAX_RAY_CLUSTER_NAME_LENGTH}"))
    );
    assert!(cluster.contains(&format!("self <= {MAX_PRICE_PER_GPU_HOUR}")));
    assert!(cluster.contains(&format!("self <= {MAX_GPU_MEMORY_MIB}")));
    // CPU and memory: the same bounds where offers publish them, buyers ask and leases give.
    assert!(cluster.contains(&format!("self <= {MAX_CPU_MILLICORES}")));
    assert!(cluster.contains(&format!("self <= {MAX_MEMORY_MIB}")));
    for kind in ["GpuOffer", "GpuLease"] {
        assert!(schema(kind).contains(&format!("self <= {MAX_CPU_MILLICORES}")), "{kind}");
        assert!(schema(kind).contains(&format!("self <= {MAX_MEMORY_BYTES}")), "{kind}");
    }
}

/// Each field frozen once a cluster is matched has a rule of its own, whose message names it.
#[test]
fn each_frozen_cluster_field_has_its_own_message() {
    let crd = gpumarket_crds::GpuCluster::crd();
    let rules = crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
    let messages: Vec<String> = rules
        .x_kubernetes_validations
        .iter()
        .flatten()
        .filter_map(|r| r.message.clone())
        .filter(|m| m.contains("cannot change once the cluster is matched"))
        .collect();
    let fields = [
        "gpu",
        "workers",
        "gpusPerWorker",
        "maxPricePerGpuHour",
        "duration",
        "location",
        "minReputation",
        "placement",
        "perWorker",
    ];
    assert_eq!(messages.len(), fields.len(), "{messages:#?}");
    for field in fields {
        let prefix = format!("spec.{field} cannot change");
        assert_eq!(messages.iter().filter(|m| m.starts_with(&prefix)).count(), 1, "{field}");
    }
}
