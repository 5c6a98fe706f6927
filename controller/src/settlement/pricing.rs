//! Prices in USD, paid in one of the mints the market accepts: USD stablecoins 1:1, or the
//! market's own token through a Pyth price feed.
//!
//! Without a feed, prices are in base units of the market's mint (a USD stablecoin: 1:1).
//! With one, prices are in micro-USD and every payout in the market's mint is converted at the
//! feed's rate when it is planned, the rate recorded with it. A stale, too uncertain or
//! unverified price pauses payouts in that mint (and its deposits, and running out of funds)
//! until the feed is fresh again: nothing is ever paid at a wrong rate. Stablecoins the market
//! also accepts ([`Mints`]) are paid 1:1, a base unit per micro-USD.
//!
//! The feed is a Pyth `PriceUpdateV2` account, owned by the Pyth Solana Receiver program. It is
//! parsed here by hand: the Pyth SDK crates bring Anchor and an older Solana SDK.

use std::str::FromStr;
use std::time::Duration;

use gpumarket_crds::ConvertedPayout;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use solana_pubkey::Pubkey;

/// The Pyth Solana Receiver program: the only owner a price update account is believed from.
pub const PYTH_RECEIVER: Pubkey =
    Pubkey::from_str_const("rec5EKMGg6MxZYaMdyBfgwp4d5rB9T1VQH5pJv5LtFJ");

/// Anchor's discriminator of `PriceUpdateV2` (sha256("account:PriceUpdateV2")[..8]).
pub const PRICE_UPDATE_V2: [u8; 8] = [34, 241, 35, 99, 157, 126, 244, 205];

/// Decimals of a USD price unit (micro-USD).
pub const USD_DECIMALS: u32 = 6;

/// A market's price feed and how fresh and certain its price must be to pay at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceFeed {
    /// The price update account (base-58 in flags).
    pub account: Pubkey,
    /// The Pyth feed id the account must carry (e.g. the token/USD feed), if pinned.
    pub feed_id: Option<[u8; 32]>,
    /// A price older than this pauses payouts.
    pub max_age: Duration,
    /// A price whose confidence interval is wider than this share of it, per mille, pauses
    /// payouts.
    pub max_confidence_permille: u32,
}

impl PriceFeed {
    pub fn new(account: Pubkey) -> PriceFeed {
        PriceFeed {
            account,
            feed_id: None,
            max_age: Duration::from_secs(60),
            max_confidence_permille: 20,
        }
    }
}

/// Decimals a stablecoin paid 1:1 must have: one base unit per micro-USD (USDC's, USDT's).
pub const STABLECOIN_DECIMALS: u8 = 6;

/// The mints a market accepts: its own (stake is bonded in it; clusters that name no mint pay
/// in it) and USD stablecoins paid 1:1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mints {
    pub market: Pubkey,
    pub stablecoins: Vec<Pubkey>,
}

impl Mints {
    /// The market's mint and the stablecoins it also accepts (the market's own mint is never
    /// one of them).
    pub fn new(market: Pubkey, stablecoins: &[Pubkey]) -> Mints {
        let stablecoins = stablecoins.iter().copied().filter(|s| *s != market).collect();
        Mints { market, stablecoins }
    }

    /// Every accepted mint, the market's first.
    pub fn all(&self) -> impl Iterator<Item = Pubkey> + '_ {
        std::iter::once(self.market).chain(self.stablecoins.iter().copied())
    }

    /// The mint `cluster` pays in (`spec.payment.mint`, else the market's), or what to change.
    pub fn of(&self, cluster: &gpumarket_crds::GpuCluster) -> Result<Pubkey, String> {
        let Some(named) = &cluster.spec.payment.mint else { return Ok(self.market) };
        match Pubkey::from_str(named) {
            Ok(mint) if self.all().any(|m| m == mint) => Ok(mint),
            _ => {
                let accepted: Vec<String> = self.all().map(|m| m.to_string()).collect();
                Err(format!(
                    "spec.payment.mint {named} is not a mint this market accepts: delete the \
                     GpuCluster and apply it with one of {} (or without spec.payment.mint, to pay \
                     in the market's mint {})",
                    accepted.join(", "),
                    self.market
                ))
            }
        }
    }

    /// How price units become `mint`'s tokens, given its decimals and the market feed's
    /// conversion now (`None` without a feed).
    pub fn conversion(&self, mint: &Pubkey, decimals: u8, feed: Option<Conversion>) -> Conversion {
        if self.stablecoins.contains(mint) {
            return stablecoin(mint, decimals);
        }
        feed.unwrap_or(Conversion::OneToOne)
    }
}

/// How price units become a stablecoin's tokens: 1:1, if it has a base unit per micro-USD.
pub fn stablecoin(mint: &Pubkey, decimals: u8) -> Conversion {
    if decimals == STABLECOIN_DECIMALS {
        return Conversion::OneToOne;
    }
    Conversion::Paused(format!(
        "stablecoin {mint} has {decimals} decimals; one paid 1:1 needs {STABLECOIN_DECIMALS} \
         (a base unit per micro-USD): take it out of --stablecoin"
    ))
}

/// The pricing flags, the same for the controller and `kubectl gpumarket` (whose quotes and
/// deposits convert as the controller does).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PricingArgs {
    /// Also accept payment in this USD stablecoin (base-58 mint of 6 decimals), 1:1: a base unit
    /// per micro-USD. Repeatable. Prices are then in micro-USD (the market's mint, without a
    /// price feed, must be a 6-decimal USD stablecoin too).
    #[arg(long, global = true, env = "GPUMARKET_STABLECOINS", value_delimiter = ',')]
    pub stablecoin: Vec<String>,
    /// Price in USD and pay in the market's mint at this Pyth price update account's rate
    /// (base-58; the mint's USD feed). Without it, prices are base units of the mint.
    #[arg(long, global = true, env = "GPUMARKET_PRICE_FEED")]
    pub price_feed: Option<String>,
    /// The Pyth feed id (64 hex digits) the price feed account must carry.
    #[arg(long, global = true, env = "GPUMARKET_PRICE_FEED_ID")]
    pub price_feed_id: Option<String>,
    /// A price older than this pauses payouts and deposits.
    #[arg(long, global = true, env = "GPUMARKET_PRICE_MAX_AGE", default_value = "60s")]
    pub price_max_age: String,
    /// A price whose confidence interval is wider than this, per mille of it, pauses payouts.
    #[arg(
        long,
        global = true,
        env = "GPUMARKET_PRICE_MAX_CONFIDENCE_PERMILLE",
        default_value_t = 20
    )]
    pub price_max_confidence_permille: u32,
}

impl PricingArgs {
    /// The stablecoins these flags name.
    pub fn stablecoins(&self) -> Result<Vec<Pubkey>, String> {
        let key = |text: &String| {
            Pubkey::from_str(text)
                .map_err(|_| format!("--stablecoin {text:?} is not a base-58 public key"))
        };
        self.stablecoin.iter().map(key).collect()
    }

    /// The feed these flags name, if any.
    pub fn feed(&self) -> Result<Option<PriceFeed>, String> {
        let Some(account) = &self.price_feed else { return Ok(None) };
        let account = account
            .parse()
            .map_err(|_| format!("--price-feed {account:?} is not a base-58 public key"))?;
        let feed_id = self.price_feed_id.as_deref().map(parse_feed_id).transpose()?;
        let max_age = gpumarket_crds::common::parse_duration(&self.price_max_age)
            .map_err(|e| format!("--price-max-age: {e}"))?;
        Ok(Some(PriceFeed {
            account,
            feed_id,
            max_age,
            max_confidence_permille: self.price_max_confidence_permille,
        }))
    }
}

/// Parse a feed id given as 64 hex digits (with or without `0x`).
pub fn parse_feed_id(hex: &str) -> Result<[u8; 32], String> {
    let digits = hex.strip_prefix("0x").unwrap_or(hex);
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{hex:?} is not a feed id of 64 hex digits"));
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(id)
}

/// What a price update account says (the fields settlement uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceUpdate {
    /// Whether Wormhole guardians' signatures were fully verified (not `Partial`).
    pub fully_verified: bool,
    pub feed_id: [u8; 32],
    pub price: i64,
    pub conf: u64,
    pub exponent: i32,
    pub publish_time: i64,
}

/// Decode a `PriceUpdateV2` account's data: discriminator, write authority, verification level
/// (`Partial { num_signatures }` = 0 and a byte, `Full` = 1), then the price message.
pub fn parse_price_update(data: &[u8]) -> Result<PriceUpdate, String> {
    if data.get(..8) != Some(&PRICE_UPDATE_V2[..]) {
        return Err("not a Pyth PriceUpdateV2 account".into());
    }
    let (fully_verified, message) = match data.get(40) {
        Some(0) => (false, 42),
        Some(1) => (true, 41),
        _ => return Err("unknown verification level".into()),
    };
    let field = |at: usize, len: usize| {
        data.get(message + at..message + at + len).ok_or("price update account too short")
    };
    let i64_at = |at| field(at, 8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()));
    Ok(PriceUpdate {
        fully_verified,
        feed_id: field(0, 32)?.try_into().map_err(|_| "feed id")?,
        price: i64_at(32)?,
        conf: field(40, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))?,
        exponent: field(48, 4).map(|b| i32::from_le_bytes(b.try_into().unwrap_or_default()))?,
        publish_time: i64_at(52)?,
    })
}

/// How amounts in price units become base units of a mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// No feed: price units are base units.
    OneToOne,
    /// At a fresh feed price of one token, for a mint of `decimals`.
    At { rate: Rate, decimals: u8 },
    /// The feed cannot be paid at now: why.
    Paused(String),
}

/// A token's USD price as the feed gave it: `price` × 10^`exponent` USD per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub price: i64,
    pub exponent: i32,
    pub publish_time: i64,
}

impl Conversion {
    /// The rate `update` gives at `now`, or why it must not be used.
    pub fn from_update(update: &PriceUpdate, feed: &PriceFeed, decimals: u8, now: i64) -> Self {
        let paused =
            |why: String| Conversion::Paused(format!("price feed {}: {why}", feed.account));
        if !update.fully_verified {
            return paused("the update is only partially verified".into());
        }
        if feed.feed_id.is_some_and(|id| id != update.feed_id) {
            return paused("the account carries another feed id".into());
        }
        if update.price <= 0 {
            return paused(format!("price {} is not positive", update.price));
        }
        let age = now.saturating_sub(update.publish_time);
        let max_age = i64::try_from(feed.max_age.as_secs()).unwrap_or(i64::MAX);
        if age > max_age || age < -max_age {
            return paused(format!("published {age} s ago, more than {max_age} s"));
        }
        let conf = u128::from(update.conf) * 1000;
        if conf > update.price.unsigned_abs() as u128 * u128::from(feed.max_confidence_permille) {
            return paused(format!(
                "confidence ±{} of price {} is wider than {} per mille",
                update.conf, update.price, feed.max_confidence_permille
            ));
        }
        let rate = Rate {
            price: update.price,
            exponent: update.exponent,
            publish_time: update.publish_time,
        };
        Conversion::At { rate, decimals }
    }

    /// Base units of the mint for `amount` price units, rounded down; `None` while paused.
    pub fn tokens(&self, amount: u64) -> Option<u64> {
        match self {
            Conversion::OneToOne => Some(amount),
            // tokens = usd_micro × 10^decimals / (price × 10^exponent × 10^6)
            Conversion::At { rate, decimals } => scale(
                u128::from(amount),
                i64::from(*decimals) - i64::from(rate.exponent) - i64::from(USD_DECIMALS),
                rate.price.unsigned_abs() as u128,
            ),
            Conversion::Paused(_) => None,
        }
    }

    /// Price units `tokens` base units of the mint are worth, rounded down; `None` while paused.
    pub fn price_units(&self, tokens: u64) -> Option<u64> {
        match self {
            Conversion::OneToOne => Some(tokens),
            // usd_micro = tokens × price × 10^exponent × 10^6 / 10^decimals
            Conversion::At { rate, decimals } => scale(
                u128::from(tokens) * rate.price.unsigned_abs() as u128,
                i64::from(rate.exponent) + i64::from(USD_DECIMALS) - i64::from(*decimals),
                1,
            ),
            Conversion::Paused(_) => None,
        }
    }

    /// What a payout of `amount` price units records of its conversion (none without a feed).
    pub fn record(&self, amount: u64) -> Option<ConvertedPayout> {
        let Conversion::At { rate, .. } = self else { return None };
        Some(ConvertedPayout {
            tokens: self.tokens(amount)?,
            price: rate.price,
            exponent: rate.exponent,
            publish_time: Time(Timestamp::from_second(rate.publish_time).ok()?),
        })
    }

    pub fn paused(&self) -> Option<&str> {
        match self {
            Conversion::Paused(why) => Some(why),
            _ => None,
        }
    }
}

/// value × 10^power / divisor, rounded down, saturating at u64::MAX.
fn scale(value: u128, power: i64, divisor: u128) -> Option<u64> {
    let ten = |p: i64| 10u128.checked_pow(u32::try_from(p).ok()?);
    let scaled = if power >= 0 {
        value.checked_mul(ten(power)?).map_or(u128::MAX, |v| v / divisor)
    } else {
        value / ten(-power)?.checked_mul(divisor)?
    };
    Some(u64::try_from(scaled).unwrap_or(u64::MAX))
}

/// The bytes of a `PriceUpdateV2` account holding `update` (what the Pyth receiver writes; the
/// local environment posts these to its validator).
pub fn price_update_account(update: &PriceUpdate, write_authority: &Pubkey) -> Vec<u8> {
    let mut data = Vec::with_capacity(134);
    data.extend_from_slice(&PRICE_UPDATE_V2);
    data.extend_from_slice(write_authority.as_ref());
    data.extend_from_slice(if update.fully_verified { &[1] } else { &[0, 5] });
    data.extend_from_slice(&update.feed_id);
    data.extend_from_slice(&update.price.to_le_bytes());
    data.extend_from_slice(&update.conf.to_le_bytes());
    data.extend_from_slice(&update.exponent.to_le_bytes());
    data.extend_from_slice(&update.publish_time.to_le_bytes());
    data.extend_from_slice(&update.publish_time.to_le_bytes()); // prev_publish_time
    data.extend_from_slice(&update.price.to_le_bytes()); // ema_price
    data.extend_from_slice(&update.conf.to_le_bytes()); // ema_conf
    data.extend_from_slice(&0u64.to_le_bytes()); // posted_slot
    data.resize(134, 0); // allocated for the larger `Partial` variant
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    /// $2.50 per token, ±0.5 %, published 10 s ago.
    fn update() -> PriceUpdate {
        PriceUpdate {
            fully_verified: true,
            feed_id: [7; 32],
            price: 250_000_000,
            conf: 1_250_000,
            exponent: -8,
            publish_time: NOW - 10,
        }
    }

    fn feed() -> PriceFeed {
        PriceFeed { feed_id: Some([7; 32]), ..PriceFeed::new(Pubkey::new_unique()) }
    }

    #[test]
    fn an_account_round_trips_in_both_verification_levels() {
        let authority = Pubkey::new_unique();
        let full = price_update_account(&update(), &authority);
        assert_eq!(full.len(), 134);
        assert_eq!(parse_price_update(&full), Ok(update()));
        let partial = PriceUpdate { fully_verified: false, ..update() };
        assert_eq!(parse_price_update(&price_update_account(&partial, &authority)), Ok(partial));
        assert!(parse_price_update(&full[..60]).is_err());
        let mut other = full.clone();
        other[0] ^= 1;
        assert!(parse_price_update(&other).expect_err("refused").contains("not a Pyth"));
    }

    #[test]
    fn usd_converts_at_the_rate_rounding_down_both_ways() {
        let at = Conversion::from_update(&update(), &feed(), 9, NOW);
        // $1 at $2.50 per token of 9 decimals: 0.4 tokens.
        assert_eq!(at.tokens(1_000_000), Some(400_000_000));
        assert_eq!(at.price_units(400_000_000), Some(1_000_000));
        // 1 micro-USD is 400 base units; 399 base units are worth less than one.
        assert_eq!(at.tokens(1), Some(400));
        assert_eq!(at.price_units(399), Some(0));
        let six = Conversion::from_update(&update(), &feed(), 6, NOW);
        assert_eq!(six.tokens(7), Some(2), "2.8 base units, rounded down");
        assert_eq!(Conversion::OneToOne.tokens(7), Some(7));
        let recorded = at.record(1_000_000).expect("given");
        assert_eq!(
            (recorded.tokens, recorded.price, recorded.exponent),
            (400_000_000, 250_000_000, -8)
        );
        assert_eq!(recorded.publish_time.0.as_second(), NOW - 10);
        assert_eq!(Conversion::OneToOne.record(5), None);
    }

    #[test]
    fn no_amount_overflows_into_a_wrong_payment() {
        let cheap = PriceUpdate { price: 1, exponent: -18, conf: 0, ..update() };
        let at = Conversion::from_update(&cheap, &feed(), 18, NOW);
        assert_eq!(at.tokens(u64::MAX), Some(u64::MAX), "saturates, never wraps");
        let dear = PriceUpdate { price: i64::MAX, exponent: 10, conf: 0, ..update() };
        let at = Conversion::from_update(&dear, &feed(), 0, NOW);
        assert_eq!(at.tokens(1_000_000), Some(0));
    }

    #[test]
    fn stale_uncertain_unverified_or_foreign_prices_pause() {
        let paused = |u: PriceUpdate| {
            Conversion::from_update(&u, &feed(), 6, NOW).paused().map(str::to_owned)
        };
        assert_eq!(paused(update()), None);
        assert!(
            paused(PriceUpdate { publish_time: NOW - 61, ..update() })
                .expect("given")
                .contains("61 s ago")
        );
        assert!(
            paused(PriceUpdate { conf: 5_000_001, ..update() })
                .expect("given")
                .contains("confidence")
        );
        assert!(
            paused(PriceUpdate { fully_verified: false, ..update() })
                .expect("given")
                .contains("partially")
        );
        assert!(
            paused(PriceUpdate { feed_id: [8; 32], ..update() })
                .expect("given")
                .contains("feed id")
        );
        assert!(
            paused(PriceUpdate { price: 0, ..update() }).expect("given").contains("not positive")
        );
        let paused = Conversion::Paused("stale".into());
        assert_eq!((paused.tokens(5), paused.price_units(5), paused.record(5)), (None, None, None));
    }

    #[test]
    fn feed_ids_are_64_hex_digits() {
        let hex = "ef0d8b6fda2ceba41da15d4095d1da392a0d2f8ed0c6c7bc0f4cfac8c280b56d";
        assert_eq!(parse_feed_id(hex).expect("given")[0], 0xef);
        assert_eq!(parse_feed_id(&format!("0x{hex}")), parse_feed_id(hex));
        assert!(parse_feed_id("ef0d").is_err());
    }

    #[test]
    fn a_cluster_pays_in_an_accepted_mint_stablecoins_one_to_one() {
        let (market, usdc, other) =
            (Pubkey::new_unique(), Pubkey::new_unique(), Pubkey::new_unique());
        let mints = Mints::new(market, &[usdc, market]);
        assert_eq!(
            mints.all().collect::<Vec<_>>(),
            [market, usdc],
            "the market's is no stablecoin"
        );
        let mut cluster = crate::testing::mk_cluster("c", 1, 1);
        assert_eq!(mints.of(&cluster), Ok(market), "no mint named: the market's");
        cluster.spec.payment.mint = Some(usdc.to_string());
        assert_eq!(mints.of(&cluster), Ok(usdc));
        for refused in [other.to_string(), "not-a-key".into()] {
            cluster.spec.payment.mint = Some(refused.clone());
            let why = mints.of(&cluster).expect_err("not accepted");
            assert!(why.contains(&refused) && why.contains(&usdc.to_string()), "{why}");
        }

        let at = Conversion::from_update(&update(), &feed(), 9, NOW);
        assert_eq!(mints.conversion(&usdc, 6, Some(at.clone())), Conversion::OneToOne);
        assert_eq!(mints.conversion(&market, 9, Some(at.clone())), at, "the feed is the market's");
        assert_eq!(mints.conversion(&market, 6, None), Conversion::OneToOne);
        let why = mints.conversion(&usdc, 9, None);
        assert!(why.paused().is_some_and(|w| w.contains("9 decimals")), "{why:?}");
    }
}
