//! `kubectl gpumarket` against the real API server and the real validator, with the controller
//! settling in-process: a quote is what the market then charges for the same spec, a deposit is
//! exact and sent once however often it is run, status says what the buyer needs to know, and
//! a supplier's earnings are its on-chain payouts to the base unit; stake and unstake move the
//! offer wallet's own tokens.
//!
//! The plugin runs in-process through its library entry (`plugin::run`, what the binary's
//! `main` calls) with the arguments a user types. KWOK makes the Ray pods Ready. Tests take
//! turns: each starts a controller that watches the whole API server.
// A failing expectation is meant to panic, in helpers as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gpumarket_controller::plugin::{self, Cli};
use gpumarket_controller::settlement::pricing::{
    PYTH_RECEIVER, PriceFeed, PriceUpdate, price_update_account,
};
use gpumarket_controller::settlement::{SettlementConfig, Settler};
use gpumarket_controller::{Config, Settings};
use gpumarket_crds::{
    ClusterPhase, GpuCluster, GpuLease, GpuOffer, LeasePhase, SettlementRecord, SettlementState,
};
use gpumarket_tests::metrics::{self, sample, scrape};
use gpumarket_tests::ports::free_tcp_ports;
use gpumarket_tests::solana::read_keypair;
use gpumarket_tests::supplier::{Supplier, add_node, signed_offer};
use gpumarket_tests::{Env, Solana, eventually};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::Value;
use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::Signer;
use tokio::sync::{Mutex, MutexGuard};

const WAIT: Duration = Duration::from_secs(60);
/// 1000 base units per GPU-second.
const PRICE: u64 = 3_600_000;

static TURN: Mutex<()> = Mutex::const_new(());

/// A test's turn, environment, namespace, and a controller settling on the validator with its
/// own settlement authority (stopped when dropped).
struct Market {
    _turn: MutexGuard<'static, ()>,
    env: &'static Env,
    client: Client,
    ns: String,
    sol: &'static Solana,
    controller: tokio::task::JoinHandle<()>,
    /// Where the controller serves its metrics, on 127.0.0.1.
    metrics_port: u16,
    /// The pricing flags the plugin is given (none for a market in base units).
    price_flags: Vec<String>,
    _keys: tempfile::TempDir,
}

impl Market {
    async fn start(namespace: &str) -> Market {
        Market::start_with(namespace, None).await
    }

    /// A market of these mints, when given; else of the environment's mint alone.
    async fn start_with(namespace: &str, usd: Option<Pricing>) -> Market {
        let turn = TURN.lock().await;
        gpumarket_tests::log_to_test_output();
        let env = Env::shared().await;
        let client = env.client().await.unwrap();
        let ns = env.namespace(namespace).await.unwrap();
        let sol = env.solana().await.unwrap();
        let keys = tempfile::tempdir().unwrap();
        let keypair = keys.path().join("settlement.json");
        sol.settlement_authority(&keypair).await.unwrap();
        let mint = usd.as_ref().map_or(sol.mint, |usd| usd.token);
        let mut settlement = SettlementConfig::new(
            sol.rpc_url.clone(),
            keypair,
            mint.to_string(),
            Duration::from_secs(3),
        );
        settlement.poll_interval = Duration::from_secs(1);
        settlement.price_feed = usd.as_ref().and_then(|usd| usd.feed.clone());
        settlement.stablecoins = usd.as_ref().map_or_else(Vec::new, |usd| usd.stablecoins.clone());
        // The plugin is told the same feed and stablecoins, as the controller's flags would be
        // mirrored.
        let price_flags = usd.map_or_else(Vec::new, |usd| {
            let mut flags = Vec::new();
            if let Some(feed) = usd.feed {
                flags.extend(["--price-feed".to_owned(), feed.account.to_string()]);
                flags
                    .extend(["--price-max-age".to_owned(), format!("{}s", feed.max_age.as_secs())]);
            }
            for stablecoin in usd.stablecoins {
                flags.extend(["--stablecoin".to_owned(), stablecoin.to_string()]);
            }
            flags
        });
        let settler = Arc::new(Settler::new(settlement).unwrap());
        let metrics_port = free_tcp_ports(1).unwrap()[0];
        let config = Config {
            settings: Settings { heartbeat_timeout: Duration::from_secs(4), ..Settings::default() },
            metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
            ..Config::default()
        };
        let controller = tokio::spawn({
            let client = client.clone();
            async move {
                gpumarket_controller::run_settling(client, config, settler).await.unwrap();
            }
        });
        env.start_kuberay(&ns).unwrap();
        eventually("the controller ready", Duration::from_secs(60), || async {
            metrics::ready(metrics_port).await.then_some(())
        })
        .await;
        Market {
            _turn: turn,
            env,
            client,
            ns,
            sol,
            controller,
            metrics_port,
            price_flags,
            _keys: keys,
        }
    }

    /// `kubectl gpumarket ARGS` in this test's namespace, with the environment's kubeconfig
    /// and RPC endpoint: what it printed, or its error.
    async fn plugin(&self, args: &[&str]) -> anyhow::Result<String> {
        let kubeconfig = self.env.kubeconfig().display().to_string();
        let mut argv = vec!["kubectl-gpumarket", "--kubeconfig", &kubeconfig, "-n", &self.ns];
        argv.extend(["--rpc-url", &self.sol.rpc_url]);
        argv.extend(self.price_flags.iter().map(String::as_str));
        argv.extend(args);
        let mut out = Vec::new();
        plugin::run(Cli::try_parse_from(argv)?, &mut out).await?;
        Ok(String::from_utf8(out)?)
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let out = self.plugin(&args).await.unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn clusters(&self) -> Api<GpuCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn leases_of(&self, cluster: &GpuCluster) -> Vec<GpuLease> {
        let uid = cluster.uid().unwrap();
        let all = Api::<GpuLease>::all(self.client.clone()).list(&Default::default()).await;
        all.unwrap().items.into_iter().filter(|l| l.spec.cluster.uid == uid).collect()
    }
}

/// A market's mints: its own `token` (at `feed`'s rate when there is one: prices in USD) and
/// `stablecoins` paid 1:1.
struct Pricing {
    token: Pubkey,
    feed: Option<PriceFeed>,
    stablecoins: Vec<Pubkey>,
}

impl Drop for Market {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

/// A manifest of one H100 worker of `gpus` GPUs in `region` for an hour, written to `dir`.
fn manifest(
    dir: &Path,
    name: &str,
    region: &str,
    gpus: u32,
    max_price: u64,
    buyer: &Pubkey,
) -> String {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: gpumarket.io/v1alpha1\nkind: GpuCluster\nmetadata:\n  name: {name}\n\
             spec:\n  gpu:\n    models: [H100]\n  workers: 1\n  gpusPerWorker: {gpus}\n  \
             duration: 1h\n  maxPricePerGpuHour: {max_price}\n  location:\n    region: {region}\n  \
             payment:\n    buyerWallet: {buyer}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_quote_is_what_the_market_charges_and_a_deposit_is_exact_and_sent_once() {
    // A stablecoin listed by mistake (no such mint on this chain) holds up nothing else.
    let sol = Env::shared().await.solana().await.unwrap();
    let mints = Pricing { token: sol.mint, feed: None, stablecoins: vec![Pubkey::new_unique()] };
    let market = Market::start_with("plugin-buyer", Some(mints)).await;
    let (sol, clusters) = (market.sol, market.clusters());
    let buyer = read_keypair(&sol.buyer).unwrap();
    let supplier_key = read_keypair(&sol.suppliers[0]).unwrap();
    let supplier = supplier_key.pubkey();
    let dearer = read_keypair(&sol.suppliers[1]).unwrap();
    let _cheap = Supplier::start_paid_to(
        market.env,
        &market.client,
        "plugin-a",
        "plugin",
        2,
        PRICE,
        &supplier_key,
    )
    .await;
    let _dear = Supplier::start_paid_to(
        market.env,
        &market.client,
        "plugin-b",
        "plugin",
        2,
        2 * PRICE,
        &dearer,
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let job = manifest(files.path(), "job", "plugin", 2, 5_000_000, &buyer.pubkey());
    let supplier_before = sol.balance(&supplier).await.unwrap();
    let buyer_keypair = sol.buyer.display().to_string();

    // Quote before applying: the cheaper node, 2 GPUs × 3.6 per hour for an hour.
    let quotes = market.json(&["quote", "-f", &job]).await;
    let quoted = &quotes[0]["matched"];
    assert_eq!(quoted["pricePerHour"], 2 * PRICE, "{quotes}");
    assert_eq!(quoted["total"], 2 * PRICE);
    assert_eq!(quoted["deposit"], 2 * PRICE);
    assert_eq!(quoted["workers"][0]["node"], "plugin-a");
    let text = market.plugin(&["quote", "-f", &job]).await.unwrap();
    assert!(text.contains("price:    7.200000 per hour") && text.contains("plugin-a"), "{text}");
    // Too low a price: it says so, and what price would match.
    let cheap = manifest(files.path(), "cheap", "plugin", 2, PRICE / 2, &buyer.pubkey());
    let text = market.plugin(&["quote", "-f", &cheap]).await.unwrap();
    assert!(text.contains("exceed the price"), "{text}");
    assert!(text.contains("would match with spec.maxPricePerGpuHour: 3600000"), "{text}");
    assert!(clusters.get_opt("job").await.unwrap().is_none(), "quote writes nothing");

    // Applied: the deposit is exactly what the controller asks for, and sent once.
    let spec = plugin::parse_clusters(&std::fs::read_to_string(&job).unwrap(), &market.ns).unwrap();
    let created = clusters.create(&PostParams::default(), &spec[0]).await.unwrap();
    let sent = market.json(&["deposit", "job", "--keypair", &buyer_keypair]).await;
    assert_eq!(sent["sent"], 2 * PRICE, "{sent}");
    let escrow: Pubkey = sent["escrow"].as_str().unwrap().parse().unwrap();
    assert_eq!(sol.account_balance(&escrow).await.unwrap(), Some(2 * PRICE));
    // Covered, or already bound by the controller (which refuses: the deposit was checked).
    let again = match market.plugin(&["deposit", "job", "--keypair", &buyer_keypair]).await {
        Ok(out) => out,
        Err(refused) => refused.to_string(),
    };
    assert!(again.contains("nothing sent"), "{again}");
    assert_eq!(sol.account_balance(&escrow).await.unwrap(), Some(2 * PRICE), "sent once");

    // The market charges what was quoted, on the quoted node.
    let running = eventually("the cluster Running", WAIT, || async {
        let c = clusters.get("job").await.ok()?;
        (c.status.as_ref()?.phase == Some(ClusterPhase::Running)).then_some(c)
    })
    .await;
    assert_eq!(running.status.as_ref().unwrap().hourly_rate, Some(2 * PRICE));
    let leases = market.leases_of(&created).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].spec.offer, "plugin-a");
    let refused = market.plugin(&["deposit", "job", "--keypair", &buyer_keypair]).await;
    let refused = refused.expect_err("a bound cluster takes no deposit").to_string();
    assert!(refused.contains("needs no deposit") && refused.contains("nothing sent"), "{refused}");

    // Status, once the lease has served a few seconds.
    eventually("the lease serving", WAIT, || async {
        market.leases_of(&created).await.first()?.status.as_ref()?.serving_since.clone()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = market.json(&["status", "job"]).await;
    assert_eq!(status["phase"], "Running", "{status}");
    assert_eq!(status["waiting"], Value::Array(vec![]), "nothing holds it up: {status}");
    assert_eq!(status["leases"][0]["node"], "plugin-a");
    assert_eq!(status["hourlyRate"], 2 * PRICE);
    assert!(status["costSoFar"].as_u64().unwrap() >= 2 * 4 * 1000, "{status}");
    assert_eq!(status["escrow"], escrow.to_string());
    let text = market.plugin(&["status", "job"]).await.unwrap();
    assert!(text.starts_with(&format!("GpuCluster {}/job: Running", market.ns)), "{text}");
    assert!(text.contains("plugin-a") && text.contains("rate:        7.200000 per hour"), "{text}");
    let yaml = market.plugin(&["status", "job", "-o", "yaml"]).await.unwrap();
    assert!(yaml.contains("phase: Running\n") && yaml.contains("node: plugin-a\n"), "{yaml}");

    // What the buyer was charged never reads higher than what it cost.
    let (settled, cost) = eventually("a payout", WAIT, || async {
        let status = clusters.get("job").await.ok()?.status?;
        Some((status.amount_settled.filter(|paid| *paid > 0)?, status.cost_accrued?))
    })
    .await;
    assert!(cost >= settled, "costAccrued {cost} below amountSettled {settled}");

    // Deleted: the supplier is paid for the time served and the rest refunded; its earnings
    // are what reached its wallet on chain, to the base unit.
    clusters.delete("job", &DeleteParams::default()).await.unwrap();
    eventually("the GpuCluster refunded and gone", Duration::from_secs(90), || async {
        clusters.get_opt("job").await.unwrap().is_none().then_some(())
    })
    .await;
    let lease = &market.leases_of(&created).await[0];
    assert_eq!(lease.status.as_ref().unwrap().phase, Some(LeasePhase::Settled));
    let received = sol.balance(&supplier).await.unwrap() - supplier_before;
    assert!(received > 0);
    let earned = market.json(&["earnings", "--wallet", &supplier.to_string()]).await;
    assert_eq!(earned["total"]["paid"], received, "{earned}");
    assert_eq!(earned["total"]["pending"], 0);
    assert_eq!(earned["total"]["servedGpuSeconds"], received / 1000);
    assert_eq!(earned["byModel"]["H100"]["paid"], received);
    assert_eq!(earned["nodes"][0]["node"], "plugin-a");
    let days = earned["byDay"].as_object().unwrap();
    assert_eq!(days.values().map(|d| d["paid"].as_u64().unwrap()).sum::<u64>(), received);
    let text = market.plugin(&["earnings", "--wallet", &supplier.to_string()]).await.unwrap();
    assert!(text.contains("plugin-a") && text.contains("reputation"), "{text}");

    // The controller's metrics say the same.
    let node = "{model=\"H100\",node=\"plugin-a\"}";
    let paid = format!("gpumarket_supplier_paid_base_units{node}");
    let metrics = eventually("the earnings in the metrics", Duration::from_secs(15), || async {
        let text = scrape(market.metrics_port).await.ok()?;
        (sample(&text, &paid) == Some(received as f64)).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&metrics, &format!("gpumarket_supplier_pending_base_units{node}")),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, &format!("gpumarket_supplier_served_gpu_seconds{node}")),
        Some((received / 1000) as f64)
    );
    // The lag covers every lease the API server holds, some of them other tests' that this
    // settlement authority cannot pay: only its presence is this test's (its value is
    // `settlement::earnings`'s unit tests').
    assert!(sample(&metrics, "gpumarket_settlement_lag_seconds").is_some(), "{metrics}");
}

/// Confirmed payouts of a cluster's leases that moved tokens.
async fn confirmed_payouts(market: &Market, cluster: &GpuCluster) -> Vec<SettlementRecord> {
    let leases = market.leases_of(cluster).await;
    let records = leases.into_iter().filter_map(|l| l.status).flat_map(|s| s.settlements);
    records.filter(|r| r.state == SettlementState::Confirmed && r.amount > 0).collect()
}

/// Issue 18: a market priced in USD takes its own token at a Pyth feed's rate and a USD
/// stablecoin 1:1; each cluster pays in the mint it names, and a stale feed holds up only the
/// token's payouts.
#[tokio::test]
async fn a_usd_priced_cluster_pays_the_market_token_at_the_recorded_rate_and_waits_out_a_stale_feed()
 {
    const TOKEN: u64 = 1_000_000_000; // 9 decimals
    const USDC: u64 = 1_000_000; // 6 decimals
    let env = Env::shared().await;
    let sol = env.solana().await.unwrap();
    let buyer = read_keypair(&sol.buyer).unwrap();
    let token = sol.new_mint(9, &[(buyer.pubkey(), 1_000 * TOKEN)]).await.unwrap();
    let usdc = sol.new_mint(6, &[(buyer.pubkey(), 1_000 * USDC)]).await.unwrap();
    // The token's USD feed, posted as the Pyth receiver writes it: `price` × 10^-8 USD.
    let (account, feed_id) = (Pubkey::new_unique(), [0x5e; 32]);
    let post = |price: i64, age: i64| {
        let update = PriceUpdate {
            fully_verified: true,
            feed_id,
            price,
            conf: price.unsigned_abs() / 1000,
            exponent: -8,
            publish_time: jiff::Timestamp::now().as_second() - age,
        };
        let data = price_update_account(&update, &Pubkey::new_unique());
        async move { sol.post_account(&account, &PYTH_RECEIVER, &data).await.unwrap() }
    };
    post(250_000_000, 0).await; // $2.50: one micro-USD is 400 base units
    let feed = PriceFeed {
        feed_id: Some(feed_id),
        max_age: Duration::from_secs(120),
        ..PriceFeed::new(account)
    };
    let usd = Pricing { token, feed: Some(feed), stablecoins: vec![usdc] };
    let market = Market::start_with("plugin-usd", Some(usd)).await;
    let clusters = market.clusters();
    // A wallet of its own: its earnings are this market's alone.
    let supplier_key = solana_sdk::signature::Keypair::new();
    let supplier = supplier_key.pubkey();
    let _node =
        Supplier::start_paid_to(env, &market.client, "plugin-usd", "usd", 2, PRICE, &supplier_key)
            .await;
    let _usdc_node = Supplier::start_paid_to(
        env,
        &market.client,
        "plugin-usdc",
        "usdc",
        2,
        PRICE,
        &supplier_key,
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let job = manifest(files.path(), "usd", "usd", 2, 5_000_000, &buyer.pubkey());
    let spec = plugin::parse_clusters(&std::fs::read_to_string(&job).unwrap(), &market.ns).unwrap();
    let buyer_before = sol.balance_in(&buyer.pubkey(), &token).await.unwrap();
    let buyer_usdc_before = sol.balance_in(&buyer.pubkey(), &usdc).await.unwrap();
    let created = clusters.create(&PostParams::default(), &spec[0]).await.unwrap();
    // The same request paying in the stablecoin, and one naming a mint the market does not take.
    let paying_in = |name: &str, region: &str, mint: &Pubkey| {
        let job = manifest(files.path(), name, region, 2, 5_000_000, &buyer.pubkey());
        let text = std::fs::read_to_string(&job).unwrap();
        let mut cluster = plugin::parse_clusters(&text, &market.ns).unwrap().remove(0);
        cluster.spec.payment.mint = Some(mint.to_string());
        cluster
    };
    let in_usdc =
        clusters.create(&PostParams::default(), &paying_in("usdc", "usdc", &usdc)).await.unwrap();
    let foreign = Pubkey::new_unique();
    clusters.create(&PostParams::default(), &paying_in("foreign", "usdc", &foreign)).await.unwrap();
    let refused = eventually("the foreign mint refused", WAIT, || async {
        let status = clusters.get("foreign").await.ok()?.status?;
        (status.phase == Some(ClusterPhase::Failed))
            .then(|| serde_json::to_string(&status).unwrap())
    })
    .await;
    assert!(
        refused.contains(&format!("spec.payment.mint {foreign} is not a mint this market accepts"))
            && refused.contains(&usdc.to_string()),
        "the buyer is told which mints are accepted: {refused}"
    );

    // $3.60 per GPU-hour × 2 GPUs × 1 h = $7.20 = 2.88 tokens at $2.50, sent exactly.
    let keypair = sol.buyer.display().to_string();
    let sent = market.json(&["deposit", "usd", "--keypair", &keypair]).await;
    assert_eq!(sent["required"], 2_880_000_000u64, "{sent}");
    assert_eq!(sent["sent"], 2_880_000_000u64, "{sent}");
    let escrow: Pubkey = sent["escrow"].as_str().unwrap().parse().unwrap();
    assert_eq!(sol.account_balance(&escrow).await.unwrap(), Some(2_880_000_000));
    // In the stablecoin, the same $7.20 is 7.2 of it, 1:1.
    let sent = market.json(&["deposit", "usdc", "--keypair", &keypair]).await;
    assert_eq!(
        (&sent["required"], &sent["sent"]),
        (&7_200_000.into(), &7_200_000.into()),
        "{sent}"
    );
    let usdc_escrow: Pubkey = sent["escrow"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sol.balance_in(&buyer.pubkey(), &usdc).await.unwrap(),
        buyer_usdc_before - 7_200_000
    );
    for name in ["usd", "usdc"] {
        eventually("the clusters Running", WAIT, || async {
            let c = clusters.get(name).await.ok()?;
            (c.status.as_ref()?.phase == Some(ClusterPhase::Running)).then_some(())
        })
        .await;
    }

    // Status tells what the token escrow is worth at the rate now, in USD.
    let status = market.json(&["status", "usd"]).await;
    let left = status["depositLeft"].as_u64().unwrap_or_default();
    assert!(
        status["escrowConverted"] == true && (3_600_000..=7_200_000).contains(&left),
        "{status}"
    );

    // Payouts move the micro-USD they cover × 400 base units, and record the rate.
    let first = eventually("a payout at $2.50", WAIT, || async {
        confirmed_payouts(&market, &created).await.into_iter().next()
    })
    .await;
    let rate = first.conversion.clone().unwrap();
    assert_eq!((rate.price, rate.exponent), (250_000_000, -8));
    assert!(first.amount > 0 && rate.tokens == first.amount * 400, "{first:?}");

    // A stale price: nothing more is paid in the token, and the cluster does not run out of
    // funds; the stablecoin cluster goes on being paid, 1:1, nothing converted.
    post(250_000_000, 3600).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // what was in flight lands
    let paused = confirmed_payouts(&market, &created).await.len();
    let usdc_paid = confirmed_payouts(&market, &in_usdc).await.len();
    tokio::time::sleep(Duration::from_secs(9)).await; // three settlement periods
    assert_eq!(confirmed_payouts(&market, &created).await.len(), paused, "paid at a stale price");
    let in_stablecoin = confirmed_payouts(&market, &in_usdc).await;
    assert!(in_stablecoin.len() > usdc_paid, "the stablecoin waited for the token's feed");
    assert!(in_stablecoin.iter().all(|r| r.conversion.is_none()), "{in_stablecoin:?}");
    let running = clusters.get("usd").await.unwrap();
    assert_eq!(running.status.unwrap().phase, Some(ClusterPhase::Running));
    let metrics = scrape(market.metrics_port).await.unwrap();
    let pauses = "gpumarket_settlement_actions_total{action=\"paused_by_price_feed\"}";
    assert!(sample(&metrics, pauses).is_some_and(|n| n >= 3.0), "{metrics}");

    // Fresh again at $2.00 (500 base units per micro-USD): payouts resume at the new rate.
    post(200_000_000, 0).await;
    let resumed = eventually("a payout at $2.00", WAIT, || async {
        let records = confirmed_payouts(&market, &created).await;
        records.into_iter().find(|r| r.conversion.as_ref().unwrap().price == 200_000_000)
    })
    .await;
    assert_eq!(resumed.conversion.unwrap().tokens, resumed.amount * 500);

    // Deleted: paid for what they served, the rest refunded, each in its own mint; the tokens
    // balance on chain.
    for name in ["usd", "usdc", "foreign"] {
        clusters.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["usd", "usdc", "foreign"] {
        eventually("the GpuClusters refunded and gone", Duration::from_secs(90), || async {
            clusters.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    let received = sol.balance_in(&supplier, &token).await.unwrap();
    let spent = buyer_before - sol.balance_in(&buyer.pubkey(), &token).await.unwrap();
    assert!(received > first.amount * 400, "paid more than the first period: {received}");
    assert_eq!(spent, received, "what the buyer spent is what the supplier received");
    let received_usdc = sol.balance_in(&supplier, &usdc).await.unwrap();
    let spent_usdc = buyer_usdc_before - sol.balance_in(&buyer.pubkey(), &usdc).await.unwrap();
    assert!(received_usdc > 0 && spent_usdc == received_usdc, "{spent_usdc} ≠ {received_usdc}");
    let earned = market.json(&["earnings", "--wallet", &supplier.to_string()]).await;
    let tokens = &earned["total"]["paidTokens"];
    assert_eq!(tokens[token.to_string()], received, "{earned}");
    assert_eq!(tokens[usdc.to_string()], received_usdc, "{earned}");
    let usd = earned["total"]["paid"].as_u64().unwrap() - received_usdc;
    assert!((usd * 400..=usd * 500).contains(&received), "paid at $2.50 and $2.00: {earned}");
    for escrow in [escrow, usdc_escrow] {
        assert_eq!(sol.account_balance(&escrow).await.unwrap(), None, "the escrow is closed");
    }
}

#[tokio::test]
async fn a_supplier_bonds_and_unbonds_stake_from_its_offer_wallet_only() {
    let market = Market::start("plugin-stake").await;
    let sol = market.sol;
    let wallet = read_keypair(&sol.suppliers[2]).unwrap();
    let _node = Supplier::start_paid_to(
        market.env,
        &market.client,
        "plugin-stake",
        "plugin-stake",
        1,
        PRICE,
        &wallet,
    )
    .await;
    let offers: Api<GpuOffer> = Api::all(market.client.clone());
    let account: Pubkey = eventually("the stake account opened", WAIT, || async {
        offers.get("plugin-stake").await.ok()?.status?.stake?.account.parse().ok()
    })
    .await;
    // The supplier's wallet has no tokens in this environment: the buyer funds it.
    let buyer = read_keypair(&sol.buyer).unwrap();
    sol.transfer(&buyer, &sol.token_account(&wallet.pubkey()), 500_001, None).await.unwrap();

    let wallet_keypair = sol.suppliers[2].display().to_string();
    let other = sol.buyer.display().to_string();
    let args = ["stake", "plugin-stake", "--amount", "5", "--keypair", &other];
    let refused = market.plugin(&args).await.expect_err("only the offer's wallet bonds");
    let refused = refused.to_string();
    assert!(refused.contains("is not the wallet of GpuOffer plugin-stake"), "{refused}");

    let args = ["stake", "plugin-stake", "--amount", "500000", "--keypair", &wallet_keypair];
    let text = market.plugin(&args).await.unwrap();
    assert!(text.starts_with("sent 0.500000 (stake)"), "{text}");
    eventually("the stake bonded", WAIT, || async {
        (offers.get("plugin-stake").await.ok()?.bonded_stake() == 500_000).then_some(())
    })
    .await;
    let earned = market.json(&["earnings", "--wallet", &wallet.pubkey().to_string()]).await;
    assert_eq!(earned["nodes"], Value::Array(vec![]), "no lease yet: {earned}");

    let text = market.plugin(&["unstake", "plugin-stake", "--keypair", &wallet_keypair]).await;
    assert!(text.unwrap().starts_with("sent 0.000001 (unbond request)"));
    eventually("the unbonding seen", WAIT, || async {
        offers.get("plugin-stake").await.ok()?.unbonding().then_some(())
    })
    .await;
    assert_eq!(
        sol.account_balance(&account).await.unwrap(),
        Some(500_001),
        "bonded until the cooldown"
    );
}

#[tokio::test]
async fn a_quote_leaves_out_a_cheaper_offer_the_market_does_not_verify_as_the_bind_does() {
    let market = Market::start("plugin-verify").await;
    let (sol, clusters) = (market.sol, market.clusters());
    let buyer = read_keypair(&sol.buyer).unwrap();
    let wallet = read_keypair(&sol.suppliers[1]).unwrap();
    let region = "plugin-verify";
    let _verified = Supplier::start_paid_to(
        market.env,
        &market.client,
        "plugin-v",
        region,
        2,
        2 * PRICE,
        &wallet,
    )
    .await;
    // Cheaper, but unsigned where the market requires signatures: never matched.
    add_node(market.env, "plugin-unsigned", region, 2).await;
    let mut spec = signed_offer("plugin-unsigned", region, 2, PRICE, None, &wallet);
    spec.signature = None;
    let _unsigned = Supplier::publish(&market.client, spec).await;
    let offers: Api<GpuOffer> = Api::all(market.client.clone());
    eventually("the unsigned offer refused", WAIT, || async {
        let offer = offers.get("plugin-unsigned").await.ok()?;
        let verified = offer.status?.conditions.into_iter().find(|c| c.type_ == "Verified")?;
        (verified.status == "False").then_some(())
    })
    .await;
    let files = tempfile::tempdir().unwrap();
    let job = manifest(files.path(), "verified", region, 2, 5 * PRICE, &buyer.pubkey());

    let quotes = market.json(&["quote", "-f", &job]).await;
    let quoted = &quotes[0]["matched"];
    assert_eq!(quoted["workers"][0]["node"], "plugin-v", "{quotes}");
    assert_eq!(quoted["pricePerHour"], 4 * PRICE, "{quotes}");

    // At the refused offer's price: only it would serve, and the quote says that is why.
    let cheap = manifest(files.path(), "cheap", region, 2, PRICE, &buyer.pubkey());
    let text = market.plugin(&["quote", "-f", &cheap]).await.unwrap();
    assert!(
        text.contains("would match offer plugin-unsigned if the market verified it; it does not"),
        "{text}"
    );

    // Applied and funded as quoted: the market binds the quoted node at the quoted price.
    let spec = plugin::parse_clusters(&std::fs::read_to_string(&job).unwrap(), &market.ns).unwrap();
    let created = clusters.create(&PostParams::default(), &spec[0]).await.unwrap();
    let keypair = sol.buyer.display().to_string();
    let sent = market.json(&["deposit", "verified", "--keypair", &keypair]).await;
    assert_eq!(sent["sent"], quoted["deposit"], "{sent}");
    let running = eventually("the cluster Running", WAIT, || async {
        let c = clusters.get("verified").await.ok()?;
        (c.status.as_ref()?.phase == Some(ClusterPhase::Running)).then_some(c)
    })
    .await;
    assert_eq!(running.status.as_ref().unwrap().hourly_rate, Some(4 * PRICE));
    let leases = market.leases_of(&created).await;
    assert_eq!(leases.iter().map(|l| l.spec.offer.as_str()).collect::<Vec<_>>(), ["plugin-v"]);
    clusters.delete("verified", &DeleteParams::default()).await.unwrap();
}
