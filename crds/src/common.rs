//! Vocabulary shared by the three resources: GPU tiers, money, durations, wallets.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every gpumarket resource.
pub const GROUP: &str = "gpumarket.io";
/// Extended resource that GPUs are requested by.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Taint the supplier agent puts on a marketplace node so that only leased pods land there.
pub const SUPPLIER_TAINT: &str = "gpumarket.io/supplier";
/// Label on a node (and its offer) naming the region the supplier declared.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Label on a node (and its offer) naming the zone the supplier declared.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Decimal places of the default settlement mint (USDC-like).
pub const DEFAULT_MINT_DECIMALS: u8 = 6;

/// Base-58 alphabet check for a Solana public key; the length range covers 32-byte keys.
pub const WALLET_PATTERN: &str = "^[1-9A-HJ-NP-Za-km-z]{32,44}$";
/// DNS-label-like region or zone name, e.g. `eu-west` or `eu-west-1a`.
pub const LOCATION_PATTERN: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Canonical GPU model name, e.g. `H100`, `A100`, `RTX4090`.
pub const MODEL_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";

/// The GPU hierarchy of the market, best first: H100 > A100 > A6000 > RTX 4090 > RTX 3090 > other.
///
/// Ordering follows the hierarchy, so `tier >= GpuTier::A100` reads as "A100 or better".
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum GpuTier {
    Other,
    #[serde(rename = "RTX3090")]
    Rtx3090,
    #[serde(rename = "RTX4090")]
    Rtx4090,
    A6000,
    A100,
    H100,
}

impl GpuTier {
    /// Every tier, best first.
    pub const ALL: [GpuTier; 6] = [
        GpuTier::H100,
        GpuTier::A100,
        GpuTier::A6000,
        GpuTier::Rtx4090,
        GpuTier::Rtx3090,
        GpuTier::Other,
    ];

    /// Tier of a canonical model name. Hopper/Blackwell data-centre parts count as H100 class;
    /// anything not named in the hierarchy is `Other`.
    pub fn of_model(model: &str) -> GpuTier {
        match model.to_ascii_uppercase().as_str() {
            "H100" | "H200" | "GH200" | "B100" | "B200" | "GB200" => GpuTier::H100,
            "A100" => GpuTier::A100,
            "A6000" | "RTXA6000" | "L40" | "L40S" => GpuTier::A6000,
            "RTX4090" => GpuTier::Rtx4090,
            "RTX3090" => GpuTier::Rtx3090,
            _ => GpuTier::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GpuTier::H100 => "H100",
            GpuTier::A100 => "A100",
            GpuTier::A6000 => "A6000",
            GpuTier::Rtx4090 => "RTX4090",
            GpuTier::Rtx3090 => "RTX3090",
            GpuTier::Other => "Other",
        }
    }
}

impl fmt::Display for GpuTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the GPUs of a node talk to each other.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Interconnect {
    #[serde(rename = "NVLink")]
    NvLink,
    #[default]
    #[serde(rename = "PCIe")]
    Pcie,
}

/// How a supplier node serves its GPUs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OfferMode {
    /// The gpumarket agent is the node's kubelet device plugin.
    #[default]
    Plugin,
    /// NVIDIA's device plugin (or GPU Operator) serves the GPUs; the agent only publishes the offer.
    OfferOnly,
}

/// Where the workers of a cluster go when several equally cheap choices exist.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// As few nodes as possible (fast interconnect, fewer failure domains to pay for).
    #[default]
    Pack,
    /// As many nodes as possible (one GPU failure costs less of the cluster).
    Spread,
}

/// An amount of the settlement mint in base units, shown with the mint's decimals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount {
    pub base_units: u64,
    pub decimals: u8,
}

impl Amount {
    pub fn new(base_units: u64) -> Self {
        Amount { base_units, decimals: DEFAULT_MINT_DECIMALS }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.decimals == 0 {
            return write!(f, "{}", self.base_units);
        }
        let scale = 10u64.pow(u32::from(self.decimals));
        write!(
            f,
            "{}.{:0width$}",
            self.base_units / scale,
            self.base_units % scale,
            width = usize::from(self.decimals)
        )
    }
}

/// Whether `s` is a base-58 Solana public key (exactly 32 bytes once decoded).
pub fn is_valid_wallet(s: &str) -> bool {
    bs58::decode(s).into_vec().is_ok_and(|bytes| bytes.len() == 32)
}

/// A duration as written in a spec: Go/Kubernetes notation restricted to whole h, m and s units
/// (`90m`, `2h30m`, `720h`), the same strings the schema's CEL `duration()` rules accept.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, DurationError> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(DurationError(s.to_owned())),
        };
        let n: u64 = digits.parse().map_err(|_| DurationError(s.to_owned()))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError(s.to_owned()))?;
        digits.clear();
    }
    if !digits.is_empty() || s.is_empty() {
        return Err(DurationError(s.to_owned()));
    }
    Ok(std::time::Duration::from_secs(total))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: write whole hours, minutes and seconds such as 90m, 2h30m or 720h"
)]
pub struct DurationError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_order_like_the_hierarchy() {
        let mut sorted = GpuTier::ALL;
        sorted.sort();
        sorted.reverse();
        assert_eq!(sorted, GpuTier::ALL);
        assert!(GpuTier::of_model("H200") >= GpuTier::A100);
        assert_eq!(GpuTier::of_model("rtx4090"), GpuTier::Rtx4090);
        assert_eq!(GpuTier::of_model("T4"), GpuTier::Other);
    }

    #[test]
    fn tier_serialises_by_its_market_name() {
        for tier in GpuTier::ALL {
            assert_eq!(serde_json::to_value(tier).ok(), Some(tier.as_str().into()));
        }
    }

    #[test]
    fn amounts_show_the_mint_decimals() {
        assert_eq!(Amount::new(2_500_000).to_string(), "2.500000");
        assert_eq!(Amount::new(7).to_string(), "0.000007");
        assert_eq!(Amount { base_units: 12, decimals: 0 }.to_string(), "12");
    }

    #[test]
    fn wallets_must_decode_to_32_bytes() {
        assert!(is_valid_wallet("11111111111111111111111111111111"));
        assert!(is_valid_wallet("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"));
        assert!(!is_valid_wallet("1111"));
        assert!(!is_valid_wallet("0OIl0OIl0OIl0OIl0OIl0OIl0OIl0OIl"));
    }

    #[test]
    fn durations_parse_like_the_schema_rule() {
        assert_eq!(parse_duration("2h30m").map(|d| d.as_secs()), Ok(9000));
        assert_eq!(parse_duration("10m").map(|d| d.as_secs()), Ok(600));
        assert_eq!(parse_duration("45s").map(|d| d.as_secs()), Ok(45));
        for bad in ["", "2", "1d", "h", "1.5h", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad} must be refused");
        }
    }
}
