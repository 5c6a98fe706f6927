//! The fleet of fake GPU nodes `gpumarket-env up` creates, from a readable spec such as
//! `h100=2x8,a100=2x8,rtx4090=4x1` (model = nodes x GPUs per node), spread over regions and
//! zones.

use std::str::FromStr;

use anyhow::{Context, Result, bail};

use crate::kwok::GpuNode;

/// One `model=NODESxGPUS` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeGroup {
    /// Canonical model name, e.g. `H100`, `RTX4090`.
    pub model: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
}

/// A list of node groups, parsed from `h100=2x8,rtx4090=4x1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMix(pub Vec<NodeGroup>);

impl FromStr for NodeMix {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<NodeMix> {
        let groups = spec
            .split(',')
            .filter(|entry| !entry.trim().is_empty())
            .map(|entry| {
                parse_group(entry.trim()).with_context(|| {
                    format!("node group {entry:?}: expected MODEL=NODESxGPUS, e.g. h100=2x8")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if groups.is_empty() {
            bail!("no node groups in {spec:?}: expected e.g. h100=2x8,rtx4090=4x1");
        }
        Ok(NodeMix(groups))
    }
}

fn parse_group(entry: &str) -> Result<NodeGroup> {
    let (model, counts) = entry.split_once('=').context("missing '='")?;
    let (nodes, gpus) = counts.split_once('x').context("missing 'x' between NODES and GPUS")?;
    let model = model.trim().to_uppercase();
    if model.is_empty() || !model.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("model {model:?} must be letters and digits, e.g. h100, a100, rtx4090");
    }
    let nodes: u32 = nodes.trim().parse().context("NODES is not a number")?;
    let gpus_per_node: u32 = gpus.trim().parse().context("GPUS is not a number")?;
    if nodes == 0 || gpus_per_node == 0 {
        bail!("NODES and GPUS must be at least 1");
    }
    Ok(NodeGroup { model, nodes, gpus_per_node })
}

impl NodeMix {
    /// The nodes, named `<model>-<i>` (lower case), dealt round-robin over `regions` and, in
    /// each region, over `zones_per_region` zones `<region>-a`, `<region>-b`, ...
    pub fn nodes(&self, regions: &[String], zones_per_region: u32) -> Result<Vec<GpuNode>> {
        if regions.is_empty() {
            bail!("at least one region is needed, e.g. --regions eu-west,us-east");
        }
        if !(1..=26).contains(&zones_per_region) {
            bail!("zones per region must be between 1 and 26, not {zones_per_region}");
        }
        let mut nodes = Vec::new();
        for group in &self.0 {
            for i in 0..group.nodes {
                let region = &regions[i as usize % regions.len()];
                let zone_index = (i as usize / regions.len()) as u32 % zones_per_region;
                let zone = format!("{region}-{}", char::from(b'a' + zone_index as u8));
                let name = format!("{}-{i}", group.model.to_lowercase());
                nodes.push(
                    GpuNode::new(&name, &group.model, group.gpus_per_node)
                        .region(region)
                        .zone(&zone),
                );
            }
        }
        Ok(nodes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_models_counts_and_gpus() {
        let mix: NodeMix = "h100=2x8, rtx4090=4x1".parse().unwrap();
        assert_eq!(
            mix.0,
            vec![
                NodeGroup { model: "H100".into(), nodes: 2, gpus_per_node: 8 },
                NodeGroup { model: "RTX4090".into(), nodes: 4, gpus_per_node: 1 },
            ]
        );
    }

    #[test]
    fn refuses_malformed_groups_with_the_expected_shape() {
        for bad in ["", "h100", "h100=2", "h100=0x8", "h100=2x0", "h 100=1x1", "h100=ax8"] {
            let error = format!("{:#}", bad.parse::<NodeMix>().unwrap_err());
            assert!(error.contains("e.g."), "{bad:?}: {error}");
        }
    }

    #[test]
    fn spreads_nodes_over_regions_then_zones() {
        let mix: NodeMix = "a100=5x8".parse().unwrap();
        let regions = vec!["eu-west".to_string(), "us-east".to_string()];
        let placed: Vec<(String, String, Option<String>)> = mix
            .nodes(&regions, 2)
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.region, n.zone))
            .collect();
        let expect = |name: &str, region: &str, zone: &str| {
            (name.to_string(), region.to_string(), Some(zone.to_string()))
        };
        assert_eq!(
            placed,
            vec![
                expect("a100-0", "eu-west", "eu-west-a"),
                expect("a100-1", "us-east", "us-east-a"),
                expect("a100-2", "eu-west", "eu-west-b"),
                expect("a100-3", "us-east", "us-east-b"),
                expect("a100-4", "eu-west", "eu-west-a"),
            ]
        );
    }

    #[test]
    fn nodes_carry_model_gpus_and_memory() {
        let nodes = "rtx4090=1x1".parse::<NodeMix>().unwrap().nodes(&["local".into()], 1).unwrap();
        assert_eq!(nodes[0].model, "RTX4090");
        assert_eq!(nodes[0].gpus, 1);
        assert_eq!(nodes[0].memory_mib, 24_564);
    }
}
