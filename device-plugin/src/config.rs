//! The agent's command line (flags, each with an environment variable) and the supplier's
//! settings, validated before the agent touches the kubelet or the API server: a bad wallet, a
//! zero price or a GPU model without a price stops it with a message saying what to fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gpumarket_crds::OfferMode;
use gpumarket_crds::common::{is_valid_wallet, parse_duration, quantity_scaled};
use serde::Deserialize;
use solana_keypair::{Keypair, read_keypair_file};
use solana_signer::Signer;

use crate::source::Inventory;

/// gpumarket supplier agent: serves the node's GPUs to the kubelet and offers them on the market.
#[derive(Parser, Debug, Clone)]
#[command(name = "gpumarket-device-plugin", version)]
pub struct Args {
    /// Name of the node this agent runs on (its GpuOffer is named after it).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Solana wallet (base-58 public key) that receives the payouts.
    #[arg(long, env = "GPUMARKET_WALLET")]
    pub wallet: Option<String>,
    /// The payout wallet's keypair file (a Solana keypair: JSON array of 64 bytes, as
    /// `solana-keygen new` writes it), to sign the offer with: markets that require signed
    /// offers match only signed ones. The wallet is its public key when --wallet is not given.
    #[arg(long, env = "GPUMARKET_WALLET_KEYPAIR")]
    pub wallet_keypair: Option<PathBuf>,
    /// Price per GPU-hour of a GPU model in base units of the settlement mint, e.g.
    /// `--price H100=2200000`; repeat for each model. A price for a tier (H100) also covers the
    /// models of that tier (H200) that have none of their own.
    #[arg(
        long = "price",
        value_name = "MODEL=UNITS",
        env = "GPUMARKET_PRICES",
        value_delimiter = ','
    )]
    pub prices: Vec<String>,
    /// YAML file with `wallet`, `prices` (model: units), `region` and `zone`; flags win over it.
    #[arg(long, env = "GPUMARKET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Region the offer declares (default: the node's topology.kubernetes.io/region label).
    #[arg(long, env = "GPUMARKET_REGION")]
    pub region: Option<String>,
    /// Zone the offer declares (default: the node's topology.kubernetes.io/zone label).
    #[arg(long, env = "GPUMARKET_ZONE")]
    pub zone: Option<String>,
    /// `plugin`: be the node's kubelet device plugin; `offer-only`: only publish the offer (the
    /// node runs NVIDIA's device plugin or the GPU Operator).
    #[arg(long, value_enum, default_value = "plugin", env = "GPUMARKET_MODE")]
    pub mode: Mode,
    /// Extended resource the GPUs are scheduled by.
    #[arg(long, default_value = gpumarket_crds::common::GPU_RESOURCE, env = "GPUMARKET_RESOURCE_NAME")]
    pub resource_name: String,
    /// The kubelet's device-plugin directory (holds kubelet.sock and the plugin's socket).
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins", env = "GPUMARKET_SOCKET_DIR")]
    pub socket_dir: PathBuf,
    /// The kubelet's PodResources socket: which pods hold which devices (plugin mode).
    #[arg(
        long,
        default_value = crate::pod_resources::POD_RESOURCES_SOCKET,
        env = "GPUMARKET_POD_RESOURCES_SOCKET"
    )]
    pub pod_resources_socket: PathBuf,
    /// How long an allocation the agent's view of the leases does not explain yet (a worker pod
    /// bound a moment ago, not listed in its lease yet) waits for the lease watch before it is
    /// refused, e.g. `5s`.
    #[arg(long, default_value = "5s", value_parser = parse_lease_wait, env = "GPUMARKET_LEASE_WAIT")]
    pub lease_wait: Duration,
    /// Hand GPUs to containers as CDI devices (`nvidia.com/gpu=<uuid>`) besides
    /// NVIDIA_VISIBLE_DEVICES, and write the CDI spec of the node's GPUs to --cdi-spec-dir
    /// (plugin mode).
    #[arg(long, env = "GPUMARKET_CDI")]
    pub cdi: bool,
    /// Where the container runtime reads CDI specs (containerd and CRI-O read /etc/cdi and
    /// /var/run/cdi); the agent's spec is removed when it stops.
    #[arg(long, default_value = "/var/run/cdi", env = "GPUMARKET_CDI_SPEC_DIR")]
    pub cdi_spec_dir: PathBuf,
    /// Where the agent sees the node's root filesystem: the NVIDIA driver's device nodes and
    /// libraries for the CDI spec are looked up under it (the chart mounts the node's /dev and
    /// /usr under /host).
    #[arg(long, default_value = "/", env = "GPUMARKET_HOST_ROOT")]
    pub host_root: PathBuf,
    /// Print what the source discovers (GPUs, driver files) and the CDI spec as JSON, then exit;
    /// touches neither the kubelet nor the API server, and needs no wallet or prices.
    #[arg(long)]
    pub discover: bool,
    /// Where GPUs come from: `nvml`, or `fake:PATH` (a YAML file) for a simulated node.
    #[arg(long, default_value = "nvml", value_parser = parse_source, env = "GPUMARKET_SOURCE")]
    pub source: SourceSpec,
    /// How often the offer's heartbeat is renewed, e.g. `20s` or `1m`.
    #[arg(long, default_value = "20s", value_parser = parse_interval, env = "GPUMARKET_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Duration,
    /// CPU of the node kept out of what its offer shares among leases, for the pods it runs
    /// besides workers (this agent, the CNI, kube-proxy, monitoring): at least the sum of their
    /// CPU requests, as a quantity such as `500m`.
    #[arg(long, default_value = "0", value_parser = parse_cpu, env = "GPUMARKET_RESERVE_CPU")]
    pub reserve_cpu: u64,
    /// Memory kept out likewise, as a quantity such as `1Gi`.
    #[arg(long, default_value = "0", value_parser = parse_memory, env = "GPUMARKET_RESERVE_MEMORY")]
    pub reserve_memory: u64,
}

/// A CPU quantity in millicores.
fn parse_cpu(s: &str) -> Result<u64, String> {
    quantity_scaled(s, 3).ok_or_else(|| format!("{s:?}: write a CPU quantity such as 500m or 2"))
}

/// A memory quantity in bytes.
fn parse_memory(s: &str) -> Result<u64, String> {
    quantity_scaled(s, 0)
        .ok_or_else(|| format!("{s:?}: write a memory quantity such as 512Mi or 2Gi"))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plugin,
    OfferOnly,
}

impl From<Mode> for OfferMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Plugin => OfferMode::Plugin,
            Mode::OfferOnly => OfferMode::OfferOnly,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Nvml,
    Fake(PathBuf),
}

fn parse_source(s: &str) -> Result<SourceSpec, String> {
    match s.split_once(':') {
        None if s == "nvml" => Ok(SourceSpec::Nvml),
        Some(("fake", path)) if !path.is_empty() => Ok(SourceSpec::Fake(path.into())),
        _ => Err(format!("{s:?}: write nvml, or fake:PATH with the path of a fake device file")),
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the heartbeat interval must be longer than 0s".into()),
        other => other.map_err(|e| e.to_string()),
    }
}

fn parse_lease_wait(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d > Duration::from_secs(60) => Err(
            "the lease wait holds up the kubelet's admission of every pod: keep it at 60s or less"
                .into(),
        ),
        other => other.map_err(|e| e.to_string()),
    }
}

/// The supplier's settings, as a config file holds them.
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SupplierFile {
    wallet: Option<String>,
    #[serde(default)]
    prices: BTreeMap<String, u64>,
    region: Option<String>,
    zone: Option<String>,
}

/// Validated supplier settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Supplier {
    pub wallet: String,
    /// The wallet's key, when given: the offer is signed with it.
    pub wallet_key: Option<WalletKey>,
    /// Price per GPU-hour by upper-case model name.
    pub prices: BTreeMap<String, u64>,
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// The payout wallet's keypair. Shown and compared by its public key only: the secret never
/// reaches a log.
#[derive(Clone)]
pub struct WalletKey(pub Arc<Keypair>);

impl WalletKey {
    pub fn read(path: &Path) -> Result<WalletKey, ConfigError> {
        let keypair = read_keypair_file(path).map_err(|e| ConfigError::WalletKeypair {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(WalletKey(Arc::new(keypair)))
    }

    pub fn public_key(&self) -> String {
        self.0.pubkey().to_string()
    }
}

impl std::fmt::Debug for WalletKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalletKey({})", self.public_key())
    }
}

impl PartialEq for WalletKey {
    fn eq(&self, other: &Self) -> bool {
        self.public_key() == other.public_key()
    }
}

impl Eq for WalletKey {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "--wallet-keypair {path}: {message}: give the payout wallet's Solana keypair file (a JSON array of 64 bytes)"
    )]
    WalletKeypair { path: String, message: String },
    #[error(
        "--wallet {wallet} is not the public key of --wallet-keypair ({keypair}): give the keypair of the payout wallet, or leave --wallet out"
    )]
    WalletNotKeypair { wallet: String, keypair: String },
    #[error("no wallet: pass --wallet with the Solana public key (base-58) that receives payouts")]
    MissingWallet,
    #[error(
        "--wallet {0:?} is not a Solana public key: give the base-58 address of the payout wallet (32 bytes, e.g. 7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV)"
    )]
    InvalidWallet(String),
    #[error(
        "--price {0:?}: write MODEL=UNITS, e.g. --price H100=2200000 (base units of the mint per GPU-hour)"
    )]
    MalformedPrice(String),
    #[error(
        "the price of {0} is 0: give a price per GPU-hour greater than 0 in base units of the mint"
    )]
    ZeroPrice(String),
    #[error(
        "no price given: pass --price MODEL=UNITS for the GPU models of this node, e.g. --price H100=2200000"
    )]
    NoPrices,
    #[error(
        "this node has {model} GPUs ({product}) but no price for them: add --price {model}=UNITS{tier_hint}"
    )]
    UnpricedModel { model: String, product: String, tier_hint: String },
    #[error(
        "--{flag} {value:?}: write lower-case letters, digits and '-', starting with a letter, e.g. eu-west"
    )]
    InvalidLocation { flag: &'static str, value: String },
    #[error(
        "no region for node {node}: pass --region (e.g. --region eu-west) or label the node topology.kubernetes.io/region"
    )]
    MissingRegion { node: String },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
}

impl Supplier {
    /// Flags over the config file, then validation.
    pub fn from_args(args: &Args) -> Result<Supplier, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let error = |message: String| ConfigError::File {
                    path: path.display().to_string(),
                    message,
                };
                let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
                serde_yaml::from_str(&text).map_err(|e| error(e.to_string()))?
            }
            None => SupplierFile::default(),
        };
        let mut prices: BTreeMap<String, u64> = file
            .prices
            .into_iter()
            .map(|(model, units)| (model.to_ascii_uppercase(), units))
            .collect();
        for price in &args.prices {
            let (model, units) = parse_price(price)?;
            prices.insert(model, units);
        }
        let wallet_key = args.wallet_keypair.as_deref().map(WalletKey::read).transpose()?;
        let wallet = args.wallet.clone().or(file.wallet);
        let wallet = match (wallet, &wallet_key) {
            (Some(wallet), Some(key)) if wallet != key.public_key() => {
                return Err(ConfigError::WalletNotKeypair { wallet, keypair: key.public_key() });
            }
            (Some(wallet), _) => wallet,
            (None, Some(key)) => key.public_key(),
            (None, None) => return Err(ConfigError::MissingWallet),
        };
        Supplier::validated(Supplier {
            wallet,
            wallet_key,
            prices,
            region: args.region.clone().or(file.region),
            zone: args.zone.clone().or(file.zone),
        })
    }

    /// A fleet's settings: its wallet's keypair (the GpuFleet's wallet on the hub is its public
    /// key), which signs every offer, its `--price` flags and location.
    pub fn for_fleet(
        wallet_key: WalletKey,
        prices: &[String],
        region: Option<String>,
        zone: Option<String>,
    ) -> Result<Supplier, ConfigError> {
        let prices = prices.iter().map(|p| parse_price(p)).collect::<Result<_, _>>()?;
        let wallet = wallet_key.public_key();
        Supplier::validated(Supplier { wallet, wallet_key: Some(wallet_key), prices, region, zone })
    }

    fn validated(self) -> Result<Supplier, ConfigError> {
        if !is_valid_wallet(&self.wallet) {
            return Err(ConfigError::InvalidWallet(self.wallet));
        }
        if self.prices.is_empty() {
            return Err(ConfigError::NoPrices);
        }
        if let Some((model, _)) = self.prices.iter().find(|(_, units)| **units == 0) {
            return Err(ConfigError::ZeroPrice(model.clone()));
        }
        check_location("region", self.region.as_deref())?;
        check_location("zone", self.zone.as_deref())?;
        Ok(self)
    }

    /// Price per GPU-hour of the node: each GPU's model priced by its own name, else by its
    /// tier's name; a node with several models is offered at the highest of their prices (and a
    /// node that lost its GPUs at the lowest price given, so its offer stays valid).
    pub fn node_price(&self, inventory: &Inventory) -> Result<u64, ConfigError> {
        let mut highest = 0;
        if inventory.gpus.is_empty() {
            return self.prices.values().min().copied().ok_or(ConfigError::NoPrices);
        }
        for gpu in &inventory.gpus {
            let model = gpu.model();
            let tier = gpu.tier();
            let price = self
                .prices
                .get(&model.to_ascii_uppercase())
                .or_else(|| {
                    self.prices
                        .get(tier.as_str())
                        .filter(|_| tier != gpumarket_crds::GpuTier::Other)
                })
                .ok_or_else(|| ConfigError::UnpricedModel {
                    tier_hint: if tier.as_str() != model && tier != gpumarket_crds::GpuTier::Other {
                        format!(" (or {tier}=UNITS for its tier)")
                    } else {
                        String::new()
                    },
                    model,
                    product: gpu.product_name.clone(),
                })?;
            highest = highest.max(*price);
        }
        Ok(highest)
    }
}

fn parse_price(s: &str) -> Result<(String, u64), ConfigError> {
    let malformed = || ConfigError::MalformedPrice(s.to_owned());
    let (model, units) = s.split_once('=').ok_or_else(malformed)?;
    let model = model.trim();
    if model.is_empty() || !model.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(malformed());
    }
    let units: u64 = units.trim().parse().map_err(|_| malformed())?;
    Ok((model.to_ascii_uppercase(), units))
}

/// The same rule as the GpuOffer schema's region/zone pattern.
pub(crate) fn check_location(flag: &'static str, value: Option<&str>) -> Result<(), ConfigError> {
    let Some(value) = value else { return Ok(()) };
    let bytes = value.as_bytes();
    let valid = (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last().is_some_and(|b| *b != b'-');
    if valid { Ok(()) } else { Err(ConfigError::InvalidLocation { flag, value: value.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Gpu;

    const WALLET: &str = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";

    fn args(extra: &[&str]) -> Args {
        let base = ["gpumarket-device-plugin", "--node-name", "n1"];
        Args::try_parse_from(base.iter().chain(extra)).expect("valid flags")
    }

    fn inventory(products: &[&str]) -> Inventory {
        let gpus = products
            .iter()
            .enumerate()
            .map(|(i, p)| Gpu {
                uuid: format!("GPU-{i}"),
                product_name: p.to_string(),
                memory_mib: 1,
                pci_bus_id: String::new(),
                nvlink_peers: Default::default(),
                numa_node: None,
                device_node: None,
            })
            .collect();
        Inventory { gpus, ..Default::default() }
    }

    #[test]
    fn invalid_settings_say_what_to_fix() {
        let cases: [(&[&str], ConfigError); 6] = [
            (&["--price", "H100=1"], ConfigError::MissingWallet),
            (&["--wallet", "0OIl", "--price", "H100=1"], ConfigError::InvalidWallet("0OIl".into())),
            (&["--wallet", WALLET], ConfigError::NoPrices),
            (&["--wallet", WALLET, "--price", "H100=0"], ConfigError::ZeroPrice("H100".into())),
            (
                &["--wallet", WALLET, "--price", "H100=-5"],
                ConfigError::MalformedPrice("H100=-5".into()),
            ),
            (
                &["--wallet", WALLET, "--price", "H100=1", "--region", "EU_West"],
                ConfigError::InvalidLocation { flag: "region", value: "EU_West".into() },
            ),
        ];
        for (flags, expected) in cases {
            assert_eq!(Supplier::from_args(&args(flags)), Err(expected), "{flags:?}");
        }
        let message = ConfigError::ZeroPrice("H100".into()).to_string();
        assert!(message.contains("greater than 0"), "{message}");
    }

    #[test]
    fn flags_parse_with_defaults_the_chart_relies_on() {
        let a = args(&["--wallet", WALLET, "--price", "h100=2200000", "--price", "A100=1400000"]);
        assert_eq!(a.mode, Mode::Plugin);
        assert_eq!(a.resource_name, "nvidia.com/gpu");
        assert_eq!(a.socket_dir, PathBuf::from("/var/lib/kubelet/device-plugins"));
        assert_eq!(a.source, SourceSpec::Nvml);
        assert_eq!(
            a.pod_resources_socket,
            PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock")
        );
        assert_eq!(a.lease_wait, Duration::from_secs(5));
        assert_eq!((a.reserve_cpu, a.reserve_memory), (0, 0), "nothing kept out unless asked");
        assert_eq!(
            (a.cdi_spec_dir.as_path(), a.host_root.as_path()),
            (std::path::Path::new("/var/run/cdi"), std::path::Path::new("/"))
        );
        let supplier = Supplier::from_args(&a).expect("valid");
        assert_eq!(supplier.prices.get("H100"), Some(&2_200_000));

        let a = args(&[
            "--mode",
            "offer-only",
            "--source",
            "fake:/tmp/gpus.yaml",
            "--heartbeat-interval",
            "5s",
            "--cdi",
            "--reserve-cpu",
            "750m",
            "--reserve-memory",
            "1.5Gi",
        ]);
        assert_eq!(
            (a.mode, a.heartbeat_interval, a.cdi),
            (Mode::OfferOnly, Duration::from_secs(5), true)
        );
        assert_eq!((a.reserve_cpu, a.reserve_memory), (750, 1_610_612_736));
        assert_eq!(a.source, SourceSpec::Fake("/tmp/gpus.yaml".into()));
        for bad in [
            ["--source", "cuda"],
            ["--heartbeat-interval", "0s"],
            ["--mode", "daemon"],
            ["--lease-wait", "10m"],
            ["--reserve-cpu", "-1"],
            ["--reserve-memory", "lots"],
        ] {
            let base = ["gpumarket-device-plugin", "--node-name", "n1"];
            assert!(Args::try_parse_from(base.iter().chain(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_wallet_keypair_signs_for_the_wallet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wallet.json");
        let keypair = Keypair::new();
        solana_keypair::write_keypair_file(&keypair, &path).expect("write");
        let path = path.to_str().expect("utf-8");
        let supplier = Supplier::from_args(&args(&["--wallet-keypair", path, "--price", "H100=1"]))
            .expect("the wallet is the keypair's");
        assert_eq!(supplier.wallet, keypair.pubkey().to_string());
        assert_eq!(supplier.wallet_key.as_ref().map(WalletKey::public_key), Some(supplier.wallet));
        assert!(!format!("{:?}", supplier.wallet_key).contains(&keypair.to_base58_string()));

        let other = Supplier::from_args(&args(&[
            "--wallet-keypair",
            path,
            "--wallet",
            WALLET,
            "--price",
            "H100=1",
        ]));
        assert_eq!(
            other,
            Err(ConfigError::WalletNotKeypair {
                wallet: WALLET.into(),
                keypair: keypair.pubkey().to_string()
            })
        );
        let missing = Supplier::from_args(&args(&[
            "--wallet-keypair",
            "/nonexistent/wallet.json",
            "--price",
            "H100=1",
        ]))
        .expect_err("no such file");
        assert!(missing.to_string().contains("--wallet-keypair /nonexistent"), "{missing}");
    }

    #[test]
    fn the_config_file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("supplier.yaml");
        std::fs::write(
            &path,
            format!("wallet: {WALLET}\nprices: {{H100: 5, A100: 3}}\nregion: eu-west\n"),
        )
        .expect("write");
        let a = args(&[
            "--config",
            path.to_str().expect("utf-8"),
            "--price",
            "H100=7",
            "--zone",
            "eu-west-1a",
        ]);
        let supplier = Supplier::from_args(&a).expect("valid");
        assert_eq!(supplier.prices, BTreeMap::from([("A100".into(), 3), ("H100".into(), 7)]));
        assert_eq!(
            (supplier.region.as_deref(), supplier.zone.as_deref()),
            (Some("eu-west"), Some("eu-west-1a"))
        );
    }

    #[test]
    fn node_price_covers_every_discovered_model() {
        let supplier = Supplier::from_args(&args(&[
            "--wallet",
            WALLET,
            "--price",
            "H100=9",
            "--price",
            "RTX4090=2",
        ]))
        .expect("valid");
        assert_eq!(supplier.node_price(&inventory(&["NVIDIA H100 80GB HBM3"])), Ok(9));
        assert_eq!(supplier.node_price(&inventory(&["NVIDIA H200"])), Ok(9), "priced by its tier");
        assert_eq!(
            supplier.node_price(&inventory(&["NVIDIA GeForce RTX 4090", "NVIDIA H100 PCIe"])),
            Ok(9)
        );
        let error = supplier
            .node_price(&inventory(&["NVIDIA A100-SXM4-80GB"]))
            .expect_err("A100 has no price");
        assert!(error.to_string().contains("add --price A100=UNITS"), "{error}");
    }
}
