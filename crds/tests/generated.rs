//! The committed CRD YAML is exactly what the Rust types generate, and the example manifests
//! users copy deserialize into those types.

// A failing expectation is meant to panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use gpumarket_crds::{GpuCluster, GpuOffer, GpuTier, Placement};

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
    assert_eq!(big.total_gpus(), 32);
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
