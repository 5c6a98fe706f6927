//! Verified supply: which offers the market believes. An offer is matched only if its
//! signature by `spec.wallet` verifies (or it is unsigned and the market accepts that), a
//! fleet's offer (labelled with its GpuFleet) names that GpuFleet's wallet, and none of its GPUs
//! is claimed by another such offer: a GPU uuid in two offers quarantines all of them until one
//! lets go of it. The verdict is the offer's `Verified` condition. Pure, but for the cache of
//! signature checks and the record of signing times ([`signing_times`]).

pub mod signing_times;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use gpumarket_crds::signature::{SignatureError, replayed, verify};
use gpumarket_crds::{GpuOffer, GpuTier};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;

use crate::runtime::context::{Settings, lock};

/// The offer's condition that says whether the market believes it, and why not.
pub const VERIFIED: &str = "Verified";
/// Reason of a `Verified=False` condition of an offer that shares a GPU with another.
pub const DUPLICATE_GPU: &str = "DuplicateGpu";
/// Reason of a `Verified=False` condition of a fleet's offer paid to another wallet than its
/// GpuFleet's, or of an offer labelled with a GpuFleet that does not exist.
pub const NOT_THE_FLEETS_WALLET: &str = "NotTheFleetsWallet";

/// Reason of a `Verified=False` condition of an offer listing a GPU model the market's policy
/// does not accept.
pub const MODEL_NOT_ACCEPTED: &str = "ModelNotAccepted";

/// The wallet of GpuFleet `name` on the hub, if there is such a GpuFleet.
pub type FleetWallet<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What verification says of one offer: whether it may be matched (the `Verified` condition's
/// status), and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The verdict on an offer's signature alone, `require_signed` being the market's policy.
pub fn signature_verdict(check: &Result<(), SignatureError>, require_signed: bool) -> Verdict {
    let refused = |reason, message: String| Verdict { admitted: false, reason, message };
    match check {
        Ok(()) => Verdict {
            admitted: true,
            reason: "Signed",
            message: "signed by spec.wallet's key".into(),
        },
        Err(SignatureError::Unsigned) if !require_signed => Verdict {
            admitted: true,
            reason: "Unsigned",
            message: "the offer is not signed; matched because the market does not require \
                      signed offers"
                .into(),
        },
        Err(SignatureError::Unsigned) => refused(
            "Unsigned",
            "the offer is not signed and the market requires signed offers: give the agent the \
             payout wallet's keypair (--wallet-keypair, chart value agent.walletKeypairSecret)"
                .into(),
        ),
        Err(e @ SignatureError::Malformed) => refused("MalformedSignature", e.to_string()),
        Err(e @ SignatureError::Replayed { .. }) => refused(
            "ReplayedSignature",
            format!("{e}; not matched until the wallet's own agent signs the offer again"),
        ),
        Err(e @ (SignatureError::BadWallet | SignatureError::Mismatch)) => refused(
            "BadSignature",
            format!("{e}; not matched until the wallet's own agent publishes the offer again"),
        ),
    }
}

/// The refusal of a fleet's offer (labelled with its GpuFleet) that names another wallet than
/// the GpuFleet's: a fleet is paid, staked and rated as its GpuFleet, whatever key it signs
/// with. `None` for an offer of no fleet, or of the fleet's wallet.
pub fn fleet_wallet_verdict(offer: &GpuOffer, fleet_wallet: FleetWallet<'_>) -> Option<Verdict> {
    let fleet = crate::fleet::offer_fleet(offer)?;
    let refused =
        |message| Some(Verdict { admitted: false, reason: NOT_THE_FLEETS_WALLET, message });
    match fleet_wallet(fleet) {
        None => refused(format!(
            "the offer is labelled {}={fleet} but the hub has no GpuFleet {fleet}",
            gpumarket_crds::FLEET_LABEL
        )),
        Some(wallet) if wallet != offer.spec.wallet => refused(format!(
            "spec.wallet {} is not the wallet of GpuFleet {fleet} ({wallet}): a fleet's offers \
             are paid to its GpuFleet's wallet and signed with its keypair",
            offer.spec.wallet
        )),
        Some(_) => None,
    }
}

/// The refusal of an offer listing a GPU model that is not among `accepted` (the market's
/// accepted models; every model when `None`).
pub fn model_verdict(
    offer: &GpuOffer,
    accepted: Option<&BTreeMap<String, GpuTier>>,
) -> Option<Verdict> {
    let accepted = accepted?;
    let refused: BTreeSet<&str> = offer
        .spec
        .gpus
        .iter()
        .map(|g| g.model.as_str())
        .filter(|m| !accepted.contains_key(*m))
        .collect();
    (!refused.is_empty()).then(|| Verdict {
        admitted: false,
        reason: MODEL_NOT_ACCEPTED,
        message: format!(
            "the market does not accept GPU model {} (MarketPolicy spec.acceptedModels lists {}): \
             not matched until the policy accepts it",
            refused.into_iter().collect::<Vec<_>>().join(", "),
            accepted.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// The verdict on the offer alone: its fleet's wallet, its models, then its signature, by the
/// market's rules in force (`settings`).
fn own_verdict(
    offer: &GpuOffer,
    checks: &SignatureChecks,
    settings: &Settings,
    fleet_wallet: FleetWallet<'_>,
) -> Verdict {
    fleet_wallet_verdict(offer, fleet_wallet)
        .or_else(|| model_verdict(offer, settings.accepted_models.as_ref()))
        .unwrap_or_else(|| signature_verdict(&checks.check(offer), settings.require_signed_offers))
}

/// GPU uuids listed by more than one of `offers`, each with the names of the offers listing it.
pub fn shared_gpus<'a>(
    offers: impl IntoIterator<Item = &'a GpuOffer>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut claims: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for offer in offers {
        for gpu in &offer.spec.gpus {
            claims.entry(gpu.uuid.clone()).or_default().insert(offer.name_any());
        }
    }
    claims.retain(|_, offers| offers.len() > 1);
    claims
}

/// The quarantine of `offer` if it lists a GPU that `shared` (from [`shared_gpus`]) says
/// another offer lists too.
pub fn quarantine(
    offer: &GpuOffer,
    shared: &BTreeMap<String, BTreeSet<String>>,
) -> Option<Verdict> {
    let name = offer.name_any();
    let clashes: Vec<String> = offer
        .spec
        .gpus
        .iter()
        .filter_map(|g| {
            let others: Vec<&str> =
                shared.get(&g.uuid)?.iter().map(String::as_str).filter(|o| *o != name).collect();
            (!others.is_empty()).then(|| format!("{} (also in {})", g.uuid, others.join(", ")))
        })
        .collect();
    (!clashes.is_empty()).then(|| Verdict {
        admitted: false,
        reason: DUPLICATE_GPU,
        message: format!(
            "GPUs offered by more than one node: {}; every offer listing them is quarantined \
             (not matched) until only one does",
            clashes.join("; ")
        ),
    })
}

/// Whether the controller quarantined `offer` for a shared GPU (its `Verified` condition).
pub fn quarantined(offer: &GpuOffer) -> bool {
    condition(offer).is_some_and(|c| c.status == "False" && c.reason == DUPLICATE_GPU)
}

/// Whether the controller last found the offer matchable (its `Verified` condition is `True`):
/// what wakes clusters waiting for supply. Matching itself verifies, never trusting a status.
pub fn admitted(offer: &GpuOffer) -> bool {
    condition(offer).is_some_and(|c| c.status == "True")
}

/// The offer's `Verified` condition, if the controller has written one.
pub fn condition(offer: &GpuOffer) -> Option<&Condition> {
    offer.status.as_ref()?.conditions.iter().find(|c| c.type_ == VERIFIED)
}

/// Signature checks by offer, kept while the offer's uid and generation stay the same (the
/// signature is part of the spec, so any change to what was signed bumps the generation):
/// each offer's signature is verified once per change, not on every match. A spec signed
/// before the newest one seen for the same offer name (even of a deleted and re-created
/// offer) is refused as replayed. The newest times outlive the controller: they start from
/// those recorded ([`SignatureChecks::from_recorded`]), and each new one is to be recorded
/// ([`SignatureChecks::unrecorded`]). Those of offers gone for a while are replaced by a floor
/// ([`SignatureChecks::forget`], `signing_times::prune`).
#[derive(Default)]
pub struct SignatureChecks {
    checked: Mutex<HashMap<String, SignatureCheck>>,
    newest: Mutex<SigningTimes>,
}

/// The newest signing time of a verified spec, by offer name, kept while the offer is around
/// (and a while after, so that a deleted offer re-created with an older spec is still a
/// replay); and the oldest signing time accepted for an offer without one of its own.
#[derive(Default)]
struct SigningTimes {
    by_offer: HashMap<String, SigningTime>,
    floor: Option<Timestamp>,
}

/// The newest signing time of an offer's verified spec, and whether it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SigningTime {
    at: Timestamp,
    recorded: bool,
}

/// One offer's signature check: the offer's uid and generation, and the result.
type SignatureCheck = (String, Option<i64>, Result<(), SignatureError>);

impl SignatureChecks {
    /// Checks that start from the signing times recorded before (see [`signing_times`]).
    pub fn from_recorded(recorded: signing_times::Recorded) -> Self {
        let by_offer =
            recorded.times.into_iter().map(|(name, at)| (name, SigningTime { at, recorded: true }));
        let newest = SigningTimes { by_offer: by_offer.collect(), floor: recorded.floor };
        SignatureChecks { newest: Mutex::new(newest), ..SignatureChecks::default() }
    }

    /// Offer `name`'s newest signing time, if it is not recorded yet.
    pub fn unrecorded(&self, name: &str) -> Option<Timestamp> {
        lock(&self.newest).by_offer.get(name).filter(|t| !t.recorded).map(|t| t.at)
    }

    /// Every offer's newest signing time not recorded yet, by offer name.
    pub fn all_unrecorded(&self) -> Vec<(String, Timestamp)> {
        let newest = lock(&self.newest);
        newest
            .by_offer
            .iter()
            .filter(|(_, t)| !t.recorded)
            .map(|(name, t)| (name.clone(), t.at))
            .collect()
    }

    /// Notes that `at` is recorded as offer `name`'s newest signing time (unless a newer one
    /// came in between, which is still to be recorded).
    pub fn mark_recorded(&self, name: &str, at: Timestamp) {
        if let Some(newest) = lock(&self.newest).by_offer.get_mut(name)
            && newest.at == at
        {
            newest.recorded = true;
        }
    }

    pub fn check(&self, offer: &GpuOffer) -> Result<(), SignatureError> {
        let name = offer.name_any();
        let (uid, generation) = (offer.uid().unwrap_or_default(), offer.metadata.generation);
        let mut checked = lock(&self.checked);
        if let Some((u, g, result)) = checked.get(&name)
            && *u == uid
            && *g == generation
        {
            return result.clone();
        }
        let result = verify(&offer.spec).and_then(|()| self.not_replayed(&name, offer));
        checked.insert(name, (uid, generation, result.clone()));
        result
    }

    /// Refuses `offer`'s verified spec if it was signed before the newest seen for its name,
    /// else notes its signing time as the newest.
    fn not_replayed(&self, name: &str, offer: &GpuOffer) -> Result<(), SignatureError> {
        let signed_at = offer.spec.signed_at.as_ref().map(|t| t.0);
        let mut newest = lock(&self.newest);
        let seen = newest.by_offer.get(name).map(|t| t.at);
        let newer = match (seen, newest.floor) {
            (Some(at), _) => Some((at, format!("the one seen for this offer, signed at {at}"))),
            (None, Some(floor)) => Some((
                floor,
                format!("{floor}, the oldest signing time accepted for an offer not seen lately"),
            )),
            (None, None) => None,
        };
        if let Some((_, newer)) = newer.as_ref().filter(|(at, _)| replayed(signed_at, Some(*at))) {
            let signed_at = signed_at.map_or_else(|| "no time".into(), |t| t.to_string());
            return Err(SignatureError::Replayed { signed_at, newer: newer.clone() });
        }
        if let Some(at) = signed_at
            && seen != Some(at)
        {
            newest.by_offer.insert(name.to_owned(), SigningTime { at, recorded: false });
        }
        Ok(())
    }

    /// Forgets the signing times of `pruned.offers` (dropped from the record as gone for a
    /// while) for the record's floor, unless an offer came back signed after it meanwhile.
    pub fn forget(&self, pruned: &signing_times::Pruned) {
        let mut newest = lock(&self.newest);
        for offer in &pruned.offers {
            if newest.by_offer.get(offer).is_some_and(|t| t.at <= pruned.floor) {
                newest.by_offer.remove(offer);
            }
        }
        newest.floor = newest.floor.max(Some(pruned.floor));
    }

    /// Forget the checks of offers that are gone (not their signing times).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        lock(&self.checked).retain(|name, _| keep(name));
    }
}

/// The verdict on `offer` among `offers` (which may include it): [`verdicts`] for one offer,
/// checking only the offers that list one of its GPUs.
pub fn verdict(
    offer: &GpuOffer,
    offers: &[&GpuOffer],
    checks: &SignatureChecks,
    settings: &Settings,
    fleet_wallet: FleetWallet<'_>,
) -> Verdict {
    let own = own_verdict(offer, checks, settings, fleet_wallet);
    if !own.admitted {
        return own;
    }
    let name = offer.name_any();
    let uuids: BTreeSet<&str> = offer.spec.gpus.iter().map(|g| g.uuid.as_str()).collect();
    let rivals = offers.iter().copied().filter(|o| {
        o.metadata.name.as_deref() != Some(name.as_str())
            && o.spec.gpus.iter().any(|g| uuids.contains(g.uuid.as_str()))
            && own_verdict(o, checks, settings, fleet_wallet).admitted
    });
    let shared = shared_gpus(std::iter::once(offer).chain(rivals));
    quarantine(offer, &shared).unwrap_or(own)
}

/// The verdict on each of `offers` (fleet wallet, models and signature, then shared GPUs among the
/// offers admitted so far: a forged offer cannot quarantine an honest one), by offer name.
pub fn verdicts(
    offers: &[&GpuOffer],
    checks: &SignatureChecks,
    settings: &Settings,
    fleet_wallet: FleetWallet<'_>,
) -> HashMap<String, Verdict> {
    let mut verdicts: HashMap<String, Verdict> = offers
        .iter()
        .map(|o| (o.name_any(), own_verdict(o, checks, settings, fleet_wallet)))
        .collect();
    let admitted = offers.iter().copied().filter(|o| verdicts[&o.name_any()].admitted);
    let shared = shared_gpus(admitted);
    if !shared.is_empty() {
        for offer in offers {
            if let Some(quarantine) = quarantine(offer, &shared) {
                verdicts.insert(offer.name_any(), quarantine);
            }
        }
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use gpumarket_crds::signature::sign;
    use solana_keypair::Keypair;
    use solana_signer::Signer;

    use super::*;
    use crate::testing::{mk_offer, now};
    use gpumarket_crds::FLEET_LABEL;

    fn signed(node: &str, gpus: usize, wallet: &Keypair) -> GpuOffer {
        let mut offer = mk_offer(node, "H100", gpus, now());
        offer.spec.wallet = wallet.pubkey().to_string();
        offer.spec = sign(&offer.spec, wallet);
        offer
    }

    #[test]
    fn only_offers_signed_by_their_wallet_are_admitted() {
        let wallet = Keypair::new();
        let good = signed("a", 2, &wallet);
        let mut forged = signed("b", 2, &Keypair::new());
        forged.spec.wallet = wallet.pubkey().to_string();
        let mut replayed = signed("c", 2, &wallet);
        replayed.spec.signature = good.spec.signature.clone();
        let mut swapped = signed("d", 2, &wallet);
        swapped.spec.wallet = Keypair::new().pubkey().to_string();
        let unsigned = mk_offer("e", "H100", 2, now());

        let checks = SignatureChecks::default();
        let offers = [&good, &forged, &replayed, &swapped, &unsigned];
        let required = verdicts(&offers, &checks, &signed_only(), &no_fleets);
        let reasons: Vec<(&str, bool, &str)> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| (*n, required[*n].admitted, required[*n].reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("a", true, "Signed"),
                ("b", false, "BadSignature"),
                ("c", false, "BadSignature"),
                ("d", false, "BadSignature"),
                ("e", false, "Unsigned"),
            ]
        );
        assert!(required["e"].message.contains("--wallet-keypair"), "{}", required["e"].message);
        let lenient = verdicts(&offers, &checks, &lenient(), &no_fleets);
        assert!(lenient["e"].admitted);
        assert_eq!(lenient["e"].reason, "Unsigned");
        assert!(!lenient["b"].admitted, "a bad signature is refused whatever the policy");
    }

    fn no_fleets(_: &str) -> Option<String> {
        None
    }

    fn signed_only() -> Settings {
        Settings { require_signed_offers: true, ..Settings::default() }
    }

    fn lenient() -> Settings {
        Settings { require_signed_offers: false, ..Settings::default() }
    }

    #[test]
    fn offers_of_models_the_market_does_not_accept_are_refused() {
        let wallet = Keypair::new();
        let (h100, a100) = (signed("a", 1, &wallet), {
            let mut offer = mk_offer("b", "A100", 1, now());
            offer.spec.wallet = wallet.pubkey().to_string();
            GpuOffer { spec: sign(&offer.spec, &wallet), ..offer }
        });
        let checks = SignatureChecks::default();
        let offers = [&h100, &a100];
        let all = verdicts(&offers, &checks, &signed_only(), &no_fleets);
        assert!(all["a"].admitted && all["b"].admitted, "every model, without a list");
        let only_h100 = Settings {
            accepted_models: Some(BTreeMap::from([("H100".to_string(), GpuTier::H100)])),
            ..signed_only()
        };
        let all = verdicts(&offers, &checks, &only_h100, &no_fleets);
        assert_eq!((all["a"].reason, all["b"].reason), ("Signed", MODEL_NOT_ACCEPTED));
        assert!(!all["b"].admitted);
        assert!(
            all["b"].message.contains("model A100 (MarketPolicy spec.acceptedModels lists H100)"),
            "{}",
            all["b"].message
        );
        assert_eq!(verdict(&a100, &offers, &checks, &only_h100, &no_fleets), all["b"]);
    }

    #[test]
    fn a_fleets_offer_is_admitted_only_with_its_gpufleets_wallet() {
        let (fleet_key, other_key) = (Keypair::new(), Keypair::new());
        let fleet_wallet = fleet_key.pubkey().to_string();
        let fleets = |name: &str| (name == "fleet-a").then(|| fleet_wallet.clone());
        let in_fleet = |node: &str, fleet: &str, key: &Keypair| {
            let mut offer = signed(node, 1, key);
            offer.metadata.labels.get_or_insert_default().insert(FLEET_LABEL.into(), fleet.into());
            offer
        };
        let honest = in_fleet("fleet-a.n1", "fleet-a", &fleet_key);
        // Signed, but by (and paid to) another wallet than the GpuFleet's.
        let other_wallet = in_fleet("fleet-a.n2", "fleet-a", &other_key);
        let no_such_fleet = in_fleet("fleet-z.n1", "fleet-z", &fleet_key);
        // The right wallet, a forged signature: still refused for the signature.
        let mut forged = in_fleet("fleet-a.n3", "fleet-a", &other_key);
        forged.spec.wallet = fleet_wallet.clone();
        let hub_node = signed("hub-node", 1, &other_key);

        let checks = SignatureChecks::default();
        let offers = [&honest, &other_wallet, &no_such_fleet, &forged, &hub_node];
        let all = verdicts(&offers, &checks, &signed_only(), &fleets);
        let reasons: Vec<(&str, bool)> = offers
            .iter()
            .map(|o| (all[&o.name_any()].reason, all[&o.name_any()].admitted))
            .collect();
        assert_eq!(
            reasons,
            [
                ("Signed", true),
                (NOT_THE_FLEETS_WALLET, false),
                (NOT_THE_FLEETS_WALLET, false),
                ("BadSignature", false),
                ("Signed", true),
            ]
        );
        let message = &all["fleet-a.n2"].message;
        assert!(
            message.contains(&format!("not the wallet of GpuFleet fleet-a ({fleet_wallet})")),
            "{message}"
        );
        assert!(
            all["fleet-z.n1"].message.contains("no GpuFleet fleet-z"),
            "{}",
            all["fleet-z.n1"].message
        );
        // Whatever the market's policy on unsigned offers.
        assert!(!verdicts(&offers, &checks, &lenient(), &fleets)["fleet-a.n2"].admitted);
        for offer in offers {
            assert_eq!(
                verdict(offer, &offers, &checks, &signed_only(), &fleets),
                all[&offer.name_any()]
            );
        }
    }

    #[test]
    fn a_gpu_in_two_offers_quarantines_both_but_not_when_one_is_forged() {
        let (alice, bob) = (Keypair::new(), Keypair::new());
        let a = signed("a", 2, &alice);
        let mut b = mk_offer("b", "H100", 1, now());
        b.spec.gpus[0].uuid = "a-gpu-1".into();
        b.spec.wallet = bob.pubkey().to_string();
        let b = GpuOffer { spec: sign(&b.spec, &bob), ..b };
        let c = signed("c", 2, &alice);
        let checks = SignatureChecks::default();
        let all = verdicts(&[&a, &b, &c], &checks, &signed_only(), &no_fleets);
        for offer in [&a, &b, &c] {
            assert_eq!(
                verdict(offer, &[&a, &b, &c], &checks, &signed_only(), &no_fleets),
                all[&offer.name_any()]
            );
        }
        assert_eq!((all["a"].reason, all["b"].reason), (DUPLICATE_GPU, DUPLICATE_GPU));
        assert!(!all["a"].admitted && !all["b"].admitted && all["c"].admitted);
        assert!(all["a"].message.contains("a-gpu-1 (also in b)"), "{}", all["a"].message);

        // Someone without bob's key claims alice's GPU: alice is not quarantined by a forgery.
        let mut forged = b.clone();
        forged.spec.price_per_gpu_hour += 1;
        forged.metadata.generation = Some(2); // as the API server counts a spec change
        let all = verdicts(&[&a, &forged], &checks, &signed_only(), &no_fleets);
        assert_eq!((all["a"].reason, all["b"].reason), ("Signed", "BadSignature"));
    }

    #[test]
    fn an_older_signed_spec_of_the_same_offer_is_refused_as_replayed() {
        let wallet = Keypair::new();
        let at = |s| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(1_800_000_000_i64 + s).expect("time"),
            ))
        };
        let signed_at = |s, price, generation, uid: &str| {
            let mut offer = mk_offer("a", "H100", 1, now());
            offer.spec.wallet = wallet.pubkey().to_string();
            offer.spec.signed_at = at(s);
            offer.spec.price_per_gpu_hour = price;
            offer.spec = sign(&offer.spec, &wallet);
            offer.metadata.generation = Some(generation);
            offer.metadata.uid = Some(uid.into());
            offer
        };
        let checks = SignatureChecks::default();
        let (old, current) = (signed_at(0, 3_000_000, 1, "u1"), signed_at(60, 1_000_000, 2, "u1"));
        assert_eq!(checks.check(&old), Ok(()));
        assert_eq!(checks.check(&current), Ok(()), "the agent signed a new price");
        // The old, still validly signed spec re-applied (a new generation), or the offer
        // deleted and re-created with it (a new uid): both replays.
        let mut replay = old.clone();
        replay.metadata.generation = Some(3);
        let recreated = signed_at(0, 3_000_000, 1, "u2");
        for offer in [&replay, &recreated] {
            let verdict = signature_verdict(&checks.check(offer), true);
            assert_eq!((verdict.admitted, verdict.reason), (false, "ReplayedSignature"));
            assert!(verdict.message.contains("re-applied"), "{}", verdict.message);
        }
        let mut untimed = signed_at(0, 3_000_000, 4, "u1");
        untimed.spec.signed_at = None;
        untimed.spec = sign(&untimed.spec, &wallet);
        assert!(matches!(checks.check(&untimed), Err(SignatureError::Replayed { .. })));
        assert_eq!(checks.check(&signed_at(120, 2_000_000, 5, "u1")), Ok(()), "signed again");
    }

    #[test]
    fn signing_times_recorded_before_a_restart_still_refuse_a_replay() {
        let wallet = Keypair::new();
        let at = |s| Timestamp::from_second(1_800_000_000_i64 + s).expect("time");
        let signed_at = |name, s, generation| {
            let mut offer = mk_offer(name, "H100", 1, now());
            offer.spec.wallet = wallet.pubkey().to_string();
            offer.spec.signed_at =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(s)));
            offer.spec = sign(&offer.spec, &wallet);
            offer.metadata.generation = Some(generation);
            offer
        };
        let before = SignatureChecks::default();
        assert_eq!(before.check(&signed_at("a", 60, 1)), Ok(()));
        assert_eq!(before.unrecorded("a"), Some(at(60)), "a new signing time, to be recorded");
        assert_eq!(before.all_unrecorded(), vec![("a".to_string(), at(60))]);
        before.mark_recorded("a", at(60));
        assert_eq!(before.unrecorded("a"), None);
        assert_eq!(before.check(&signed_at("a", 60, 1)), Ok(()));
        assert_eq!(before.unrecorded("a"), None, "the same time is not recorded again");

        let recorded =
            signing_times::Recorded { times: HashMap::from([("a".into(), at(60))]), floor: None };
        let restarted = SignatureChecks::from_recorded(recorded);
        let replay = restarted.check(&signed_at("a", 0, 1));
        assert!(matches!(replay, Err(SignatureError::Replayed { .. })));
        assert_eq!(restarted.unrecorded("a"), None);
        assert_eq!(restarted.check(&signed_at("a", 120, 2)), Ok(()));
        // A newer time seen while an older one was being recorded stays to be recorded.
        restarted.mark_recorded("a", at(60));
        assert_eq!(restarted.unrecorded("a"), Some(at(120)));
    }

    #[test]
    fn times_of_offers_gone_for_a_while_give_way_to_a_floor_that_still_refuses_replays() {
        let wallet = Keypair::new();
        let at = |s| Timestamp::from_second(1_800_000_000_i64 + s).expect("time");
        let signed_at = |name, s, uid: &str| {
            let mut offer = mk_offer(name, "H100", 1, now());
            offer.metadata.uid = Some(uid.into());
            offer.spec.wallet = wallet.pubkey().to_string();
            offer.spec.signed_at =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(s)));
            offer.spec = sign(&offer.spec, &wallet);
            offer
        };
        let checks = SignatureChecks::default();
        assert_eq!(checks.check(&signed_at("gone", 60, "u1")), Ok(()));
        assert_eq!(checks.check(&signed_at("back", 30, "u2")), Ok(()));
        // "back" is re-published (signed again) between the prune and its being forgotten.
        assert_eq!(checks.check(&signed_at("back", 90, "u3")), Ok(()));
        checks.forget(&signing_times::Pruned {
            offers: vec!["gone".into(), "back".into()],
            floor: at(60),
        });
        assert_eq!(checks.unrecorded("back"), Some(at(90)), "signed after the floor: kept");
        assert_eq!(checks.unrecorded("gone"), None, "forgotten");

        // Offers without a time of their own: refused when signed before the floor.
        let replayed = checks.check(&signed_at("gone", 30, "u4"));
        let Err(e @ SignatureError::Replayed { .. }) = replayed else { panic!("{replayed:?}") };
        assert!(e.to_string().contains("not seen lately"), "{e}");
        assert!(checks.check(&signed_at("new", 59, "u5")).is_err(), "signed before the floor");
        assert_eq!(checks.check(&signed_at("gone", 60, "u6")), Ok(()), "its newest spec again");
        assert_eq!(checks.check(&signed_at("new", 61, "u7")), Ok(()), "signed after the floor");

        // The floor only rises.
        checks.forget(&signing_times::Pruned { offers: vec![], floor: at(10) });
        assert!(checks.check(&signed_at("other", 30, "u8")).is_err());
    }

    #[test]
    fn signature_checks_are_cached_per_generation() {
        let wallet = Keypair::new();
        let mut offer = signed("a", 1, &wallet);
        offer.metadata.generation = Some(1);
        let checks = SignatureChecks::default();
        assert_eq!(checks.check(&offer), Ok(()));
        // A changed spec comes with a new generation, and is checked again.
        offer.spec.price_per_gpu_hour += 1;
        offer.metadata.generation = Some(2);
        assert_eq!(checks.check(&offer), Err(SignatureError::Mismatch));
        checks.retain(|_| false);
        assert!(checks.checked.lock().expect("lock").is_empty());
    }

    /// A figure, not a check: how many offers a controller verifies per second (each once per
    /// change of the offer; the cache answers the rest).
    #[test]
    #[ignore = "prints a figure: cargo test -p gpumarket-controller --lib verification_rate -- --ignored --nocapture"]
    fn verification_rate() {
        let wallet = Keypair::new();
        let offers: Vec<GpuOffer> =
            (0..2000).map(|i| signed(&format!("n{i}"), 8, &wallet)).collect();
        let started = std::time::Instant::now();
        assert!(offers.iter().all(|o| verify(&o.spec).is_ok()));
        let elapsed = started.elapsed();
        let checks = SignatureChecks::default();
        let listed: Vec<&GpuOffer> = offers.iter().collect();
        verdicts(&listed, &checks, &signed_only(), &no_fleets);
        let cached = std::time::Instant::now();
        verdicts(&listed, &checks, &signed_only(), &no_fleets);
        println!(
            "verified {} offers of 8 GPUs in {elapsed:?}: {:.0} offers/s; every verdict again \
             from the cache in {:?}",
            offers.len(),
            offers.len() as f64 / elapsed.as_secs_f64(),
            cached.elapsed()
        );
    }
}
