//! Vocabulary shared by the three resources: GPU tiers, money, durations, wallets.

use std::fmt;

use kube::KubeSchema;
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
/// NVML uuid of a GPU or MIG device, e.g. `GPU-5f3a9c1e-0b7d-4e2a-9c41-1d2e3f4a5b60`.
pub const GPU_UUID_PATTERN: &str = "^(GPU|MIG)-[A-Za-z0-9-]+$";
/// Longest GPU uuid accepted.
pub const MAX_GPU_UUID_LENGTH: usize = 128;
/// Environment variable name accepted for Ray workers (what KubeRay and the kubelet accept
/// everywhere, not only on the newest API servers).
pub const ENV_NAME_PATTERN: &str = "^[-._a-zA-Z][-._a-zA-Z0-9]*$";
/// A GpuCluster's name is its RayCluster's name: a DNS-1035 label (KubeRay refuses others).
pub const RAY_CLUSTER_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// KubeRay's longest RayCluster name (it derives longer names of pods and services from it).
pub const MAX_RAY_CLUSTER_NAME_LENGTH: usize = 53;
/// Highest price per GPU-hour, in base units, an offer may ask or a request accept: with at
/// most 16384 GPUs (1024 workers × 16) for at most 2160 hours, price × GPUs × hours stays
/// below `u64::MAX` (3.5e18 < 1.8e19).
pub const MAX_PRICE_PER_GPU_HOUR: u64 = 100_000_000_000;
/// Largest GPU memory, in MiB, an offer may list or a request ask for (1 TiB).
pub const MAX_GPU_MEMORY_MIB: u64 = 1_048_576;
/// Most CPU, in millicores, a node may publish or a worker get or ask for (4096 cores).
pub const MAX_CPU_MILLICORES: u64 = 4_096_000;
/// Most memory, in bytes, a node may publish or a worker get (64 TiB).
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;
/// Most memory, in MiB, a buyer may ask for each worker (64 TiB).
pub const MAX_MEMORY_MIB: u64 = MAX_MEMORY_BYTES >> 20;

/// CPU and memory in whole millicores and bytes: what a node lets pods request (a GpuOffer's
/// `spec.allocatable`), or what each worker of a lease gets (a GpuLease's `spec.workerResources`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct HostResources {
    /// CPU in millicores (1000 = one core).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096000").message("cpuMillicores must be between 1 and 4096000 (4096 cores): CPU in millicores, e.g. 64000 for 64 cores"))]
    pub cpu_millicores: u64,
    /// Memory in bytes.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 70368744177664").message("memoryBytes must be between 1 and 70368744177664 (64 TiB): memory in bytes, e.g. 274877906944 for 256 GiB"))]
    pub memory_bytes: u64,
}

impl HostResources {
    /// CPU and memory of a Node's `status.allocatable` (what the kubelet admits pods against),
    /// within the bounds the schema accepts; `None` when either is missing, unreadable or zero.
    pub fn from_allocatable(
        allocatable: &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    ) -> Option<HostResources> {
        let read = |name: &str, scale: u32, max: u64| {
            let value = quantity_scaled(&allocatable.get(name)?.0, scale)?;
            (value > 0).then_some(value.min(max))
        };
        Some(HostResources {
            cpu_millicores: read("cpu", 3, MAX_CPU_MILLICORES)?,
            memory_bytes: read("memory", 0, MAX_MEMORY_BYTES)?,
        })
    }
}

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

/// Whether `s` has the shape of an NVML uuid ([`GPU_UUID_PATTERN`], at most
/// [`MAX_GPU_UUID_LENGTH`] characters).
pub fn is_valid_gpu_uuid(s: &str) -> bool {
    let rest = s.strip_prefix("GPU-").or_else(|| s.strip_prefix("MIG-"));
    s.len() <= MAX_GPU_UUID_LENGTH
        && rest.is_some_and(|r| {
            !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether `s` is an environment variable name workers accept ([`ENV_NAME_PATTERN`]).
pub fn is_valid_env_name(s: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphabetic() || b == b'-' || b == b'.' || b == b'_';
    let mut bytes = s.bytes();
    bytes.next().is_some_and(word) && bytes.all(|b| word(b) || b.is_ascii_digit())
}

/// Whether `s` can name a RayCluster ([`RAY_CLUSTER_NAME_PATTERN`], at most
/// [`MAX_RAY_CLUSTER_NAME_LENGTH`] characters).
pub fn is_valid_ray_cluster_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    s.len() <= MAX_RAY_CLUSTER_NAME_LENGTH
        && bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes.last().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `s` is a Kubernetes resource quantity that is not negative (`500m`, `4`, `16Gi`,
/// `1e3`), by the grammar of `resource.Quantity`.
pub fn is_valid_quantity(s: &str) -> bool {
    /// The length of the `<number>` at the start of `s` (`1`, `1.5`, `1.`, `.5`), if any.
    fn number(s: &str) -> Option<usize> {
        let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
        let whole = digits(s);
        let mut len = whole;
        let mut fraction = 0;
        if s[len..].starts_with('.') {
            fraction = digits(&s[len + 1..]);
            len += 1 + fraction;
        }
        (whole + fraction > 0).then_some(len)
    }
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let Some(len) = number(unsigned) else { return false };
    match &unsigned[len..] {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        suffix => suffix.strip_prefix(['e', 'E']).is_some_and(|exponent| {
            let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            number(exponent) == Some(exponent.len())
        }),
    }
}

/// The value of a Kubernetes quantity (`500m`, `64`, `512Gi`, `1e3`) times `10^scale`, rounded
/// down: `quantity_scaled(q, 3)` is CPU in millicores, `quantity_scaled(q, 0)` memory in bytes.
/// `None` for what is not a quantity that is not negative, or does not fit in a `u64`.
pub fn quantity_scaled(s: &str, scale: u32) -> Option<u64> {
    if !is_valid_quantity(s) {
        return None;
    }
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let end = unsigned.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let mantissa: u128 = format!("0{whole}{fraction}").parse().ok()?;
    let mut exponent = i64::from(scale) - i64::try_from(fraction.len()).ok()?;
    let mut binary = 0u32;
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            binary = 10 * (1 + "KMGTPE".find(&suffix[..1])? as u32);
        }
        "n" => exponent -= 9,
        "u" => exponent -= 6,
        "m" => exponent -= 3,
        "k" => exponent += 3,
        "M" | "G" | "T" | "P" | "E" => exponent += 3 * (2 + "MGTPE".find(suffix)? as i64),
        scientific => exponent += scientific[1..].parse::<i64>().ok()?,
    }
    let value = mantissa.checked_mul(1u128.checked_shl(binary)?)?;
    let power = |e: i64| u32::try_from(e).ok().and_then(|e| 10u128.checked_pow(e));
    let value = if exponent >= 0 {
        value.checked_mul(power(exponent)?)?
    } else {
        // A divisor too large for u128 leaves nothing of the value.
        power(-exponent).map_or(0, |divisor| value / divisor)
    };
    u64::try_from(value).ok()
}

/// Schema transforms that bound the strings, lists and maps inside Kubernetes' own types
/// (`EnvVar`, `ResourceRequirements`, `Condition`), which carry no bounds of their own: an
/// unbounded field lets one object grow to the API server's request limit, and makes a CEL
/// rule over it too costly for the API server to install.
pub mod bounds {
    use schemars::Schema;
    use serde_json::{Map, Value};

    struct Limits {
        /// `maxLength` of strings that have none.
        string: u64,
        /// ...of the strings of these property names instead.
        named: &'static [(&'static str, u64)],
        /// `maxLength` of int-or-string values (quantities).
        int_or_string: u64,
        /// `maxItems` of lists that have none.
        items: u64,
        /// `maxProperties` of maps that have none.
        properties: u64,
    }

    fn has_type(node: &Map<String, Value>, name: &str) -> bool {
        match node.get("type") {
            Some(Value::String(t)) => t == name,
            Some(Value::Array(types)) => types.iter().any(|t| t == name),
            _ => false,
        }
    }

    fn bound(node: &mut Map<String, Value>, max_length: u64, limits: &Limits) {
        let absent = |node: &Map<String, Value>, key: &str| !node.contains_key(key);
        if node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            if absent(node, "maxLength") {
                node.insert("maxLength".into(), limits.int_or_string.into());
            }
        } else if has_type(node, "string") && absent(node, "maxLength") {
            node.insert("maxLength".into(), max_length.into());
        }
        if has_type(node, "array") && absent(node, "maxItems") {
            node.insert("maxItems".into(), limits.items.into());
        }
        if node.get("additionalProperties").is_some_and(Value::is_object)
            && absent(node, "maxProperties")
        {
            node.insert("maxProperties".into(), limits.properties.into());
        }
        if let Some(Value::Object(properties)) = node.get_mut("properties") {
            for (name, child) in properties.iter_mut() {
                let length = limits
                    .named
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(limits.string, |&(_, length)| length);
                if let Value::Object(child) = child {
                    bound(child, length, limits);
                }
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(Value::Object(child)) = node.get_mut(key) {
                bound(child, limits.string, limits);
            }
        }
        for key in ["anyOf", "allOf", "oneOf"] {
            if let Some(Value::Array(children)) = node.get_mut(key) {
                for child in children.iter_mut().filter_map(Value::as_object_mut) {
                    bound(child, max_length, limits);
                }
            }
        }
    }

    fn apply(schema: &mut Schema, limits: &Limits) {
        if let Some(node) = schema.as_object_mut() {
            bound(node, limits.string, limits);
        }
    }

    /// `ResourceRequirements`: at most 16 resources in `limits` and in `requests`, quantities
    /// of at most 64 characters, at most 16 claims.
    pub fn resources(schema: &mut Schema) {
        let limits =
            Limits { string: 253, named: &[], int_or_string: 64, items: 16, properties: 16 };
        apply(schema, &limits);
    }

    /// A list of `EnvVar`: names of at most 256 characters, values of at most 32 KiB, other
    /// strings (references) of at most 1024.
    pub fn env(schema: &mut Schema) {
        let limits = Limits {
            string: 1024,
            named: &[("name", 256), ("value", 32_768)],
            int_or_string: 64,
            items: 64,
            properties: 16,
        };
        apply(schema, &limits);
    }

    /// A list of `Condition`: the lengths the Kubernetes API itself documents for conditions
    /// (type 316, reason 1024, message 32768), at most 16 conditions.
    pub fn conditions(schema: &mut Schema) {
        let limits = Limits {
            string: 64,
            named: &[("type", 316), ("reason", 1024), ("message", 32_768)],
            int_or_string: 64,
            items: 16,
            properties: 16,
        };
        apply(schema, &limits);
    }

    /// A map of short settings: at most 32 entries of at most 1024 characters.
    pub fn settings(schema: &mut Schema) {
        let limits =
            Limits { string: 1024, named: &[], int_or_string: 64, items: 16, properties: 32 };
        apply(schema, &limits);
    }
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
    fn gpu_uuids_have_the_nvml_shape() {
        for good in ["GPU-5f3a9c1e-0b7d-4e2a-9c41-1d2e3f4a5b60", "GPU-ctl-a-0", "MIG-1", "GPU-0"] {
            assert!(is_valid_gpu_uuid(good), "{good}");
        }
        let long = format!("GPU-{}", "a".repeat(MAX_GPU_UUID_LENGTH));
        for bad in ["", "GPU-", "../etc", "GPU-../etc", "gpu-0", "GPU-a b", "GPU-a.b", &long] {
            assert!(!is_valid_gpu_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn env_names_and_ray_cluster_names() {
        for good in ["NCCL_DEBUG", "_X", "a.b-c", "x9"] {
            assert!(is_valid_env_name(good), "{good}");
        }
        for bad in ["", "9X", "A=B", "A B", "Ä"] {
            assert!(!is_valid_env_name(bad), "{bad}");
        }
        for good in ["llm", "llm-finetune-2", &"a".repeat(MAX_RAY_CLUSTER_NAME_LENGTH)] {
            assert!(is_valid_ray_cluster_name(good), "{good}");
        }
        let long = "a".repeat(MAX_RAY_CLUSTER_NAME_LENGTH + 1);
        for bad in ["", "llm.finetune", "1llm", "llm-", "LLM", &long] {
            assert!(!is_valid_ray_cluster_name(bad), "{bad}");
        }
    }

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for good in ["0", "4", "500m", "1.5", "16Gi", "1e3", "2E-2", ".5", "1.", "+1k", "100n"] {
            assert!(is_valid_quantity(good), "{good}");
        }
        for bad in ["", "2Gx", "-1", "Gi", "1 Gi", "1e", "1.2.3", ".", "1KiB", "e3"] {
            assert!(!is_valid_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn a_nodes_allocatable_is_read_within_bounds() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let node = |cpu: &str, memory: &str| {
            std::collections::BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.into())),
                ("memory".to_string(), Quantity(memory.into())),
                ("nvidia.com/gpu".to_string(), Quantity("8".into())),
            ])
        };
        assert_eq!(
            HostResources::from_allocatable(&node("63900m", "515933004Ki")),
            Some(HostResources { cpu_millicores: 63_900, memory_bytes: 528_315_396_096 })
        );
        assert_eq!(
            HostResources::from_allocatable(&node("100k", "1Ei")),
            Some(HostResources {
                cpu_millicores: MAX_CPU_MILLICORES,
                memory_bytes: MAX_MEMORY_BYTES
            })
        );
        assert_eq!(HostResources::from_allocatable(&node("0", "1Gi")), None);
        assert_eq!(HostResources::from_allocatable(&node("8", "lots")), None);
        assert_eq!(HostResources::from_allocatable(&Default::default()), None);
    }

    #[test]
    fn quantities_scale_to_millicores_and_bytes_rounding_down() {
        for (quantity, scale, value) in [
            ("64", 3, Some(64_000)),
            ("1500m", 3, Some(1_500)),
            ("0.5", 3, Some(500)),
            ("+2.", 3, Some(2_000)),
            ("1u", 3, Some(0)),
            ("1999u", 3, Some(1)),
            ("2k", 0, Some(2_000)),
            ("1e3", 0, Some(1_000)),
            ("15E-1", 0, Some(1)),
            ("32827456Ki", 0, Some(33_615_314_944)),
            ("1.5Gi", 0, Some(1_610_612_736)),
            ("1M", 0, Some(1_000_000)),
            ("1E", 0, Some(1_000_000_000_000_000_000)),
            ("16Ei", 0, None),
            ("20E", 0, None),
            ("-1", 0, None),
            ("lots", 0, None),
            ("1e-400", 3, Some(0)),
        ] {
            assert_eq!(quantity_scaled(quantity, scale), value, "{quantity} × 10^{scale}");
        }
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
