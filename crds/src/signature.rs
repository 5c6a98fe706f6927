//! Signed offers: the supplier agent signs its GpuOffer's spec with the payout wallet's ed25519
//! key (a Solana keypair), and the controller matches an offer only if the signature verifies
//! against `spec.wallet`. Whoever can edit the object cannot change what it offers (price, GPUs,
//! node, wallet) without the wallet's key, nor copy another offer's signature onto it.
//!
//! The signed message is [`DOMAIN`] followed by the spec as JSON with `signature` left out:
//! serde writes struct fields in declaration order and absent optional fields not at all, so
//! agent and controller produce the same bytes from the same spec. New spec fields must be
//! optional and skipped when absent, or offers signed by older agents stop verifying.

use solana_signature::Signature;
use solana_signer::Signer;

use crate::GpuOfferSpec;

/// Prefix of every signed offer message, so that a signature over an offer can never be taken
/// for a signature over anything else the wallet signs (a transaction, another object).
pub const DOMAIN: &[u8] = b"gpumarket.io/v1alpha1 GpuOffer spec\n";

/// Why an offer's signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the offer is not signed (spec.signature is absent)")]
    Unsigned,
    #[error("spec.signature is not base-58 of a 64-byte ed25519 signature")]
    Malformed,
    #[error("spec.wallet does not decode to a 32-byte public key")]
    BadWallet,
    #[error(
        "spec.signature does not verify against spec.wallet: it was made by another key, for \
         another offer, or the spec changed after it was signed"
    )]
    Mismatch,
    /// `newer` says what it was signed before: the newest spec seen of the offer, or the
    /// oldest signing time accepted for an offer not seen lately.
    #[error("the spec was signed at {signed_at}, before {newer}: an old signed offer re-applied")]
    Replayed { signed_at: String, newer: String },
}

/// The bytes the wallet signs: [`DOMAIN`] then the spec without its signature, as JSON.
pub fn signing_message(spec: &GpuOfferSpec) -> Vec<u8> {
    let unsigned = GpuOfferSpec { signature: None, ..spec.clone() };
    let mut message = DOMAIN.to_vec();
    // A struct of strings, integers and enums always serializes.
    message.extend(serde_json::to_vec(&unsigned).unwrap_or_default());
    message
}

/// `spec`, signed by `wallet` (whose public key must be `spec.wallet` for it to verify).
pub fn sign(spec: &GpuOfferSpec, wallet: &dyn Signer) -> GpuOfferSpec {
    let signature = wallet.sign_message(&signing_message(spec));
    GpuOfferSpec { signature: Some(signature.to_string()), ..spec.clone() }
}

/// `spec`, signed by `wallet` now, as an agent signs what it publishes: its signing time
/// (`spec.signedAt`) is now, in whole seconds as the API server keeps times, so that it
/// supersedes every spec of the offer signed before.
pub fn sign_now(spec: &GpuOfferSpec, wallet: &dyn Signer) -> GpuOfferSpec {
    let now = jiff::Timestamp::now().as_second();
    let signed_at = jiff::Timestamp::from_second(now)
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
    sign(&GpuOfferSpec { signed_at, ..spec.clone() }, wallet)
}

/// Whether a spec signed at `signed_at` replays an earlier one, `newest` being the latest
/// signing time seen for the same offer: signed before it, or not timed at all once a timed
/// spec was seen (an offer signed before signing times existed).
pub fn replayed(signed_at: Option<jiff::Timestamp>, newest: Option<jiff::Timestamp>) -> bool {
    match (signed_at, newest) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(at), Some(newest)) => at < newest,
    }
}

/// Whether `spec.signature` is `spec.wallet`'s signature of this very spec.
pub fn verify(spec: &GpuOfferSpec) -> Result<(), SignatureError> {
    let encoded = spec.signature.as_deref().ok_or(SignatureError::Unsigned)?;
    let signature: Signature = bs58::decode(encoded)
        .into_vec()
        .ok()
        .and_then(|bytes| Signature::try_from(bytes.as_slice()).ok())
        .ok_or(SignatureError::Malformed)?;
    let wallet = bs58::decode(&spec.wallet)
        .into_vec()
        .ok()
        .filter(|bytes| bytes.len() == 32)
        .ok_or(SignatureError::BadWallet)?;
    if signature.verify(&wallet, &signing_message(spec)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use solana_keypair::Keypair;

    use super::*;
    use crate::common::{HostResources, Interconnect};
    use crate::offer::OfferedGpu;

    fn spec(wallet: &Keypair) -> GpuOfferSpec {
        serde_json::from_value(serde_json::json!({
            "nodeName": "node-a",
            "wallet": wallet.pubkey().to_string(),
            "gpus": [
                {"uuid": "GPU-0", "model": "H100", "memoryMib": 81559},
                {"uuid": "GPU-1", "model": "H100", "memoryMib": 81559},
            ],
            "pricePerGpuHour": 2_200_000,
            "region": "eu-west",
            "zone": "eu-west-1a",
            "signedAt": "2026-12-02T01:00:00Z",
        }))
        .expect("a spec")
    }

    #[test]
    fn a_signed_spec_verifies_and_any_change_breaks_it() {
        let wallet = Keypair::new();
        let signed = sign(&spec(&wallet), &wallet);
        assert_eq!(verify(&signed), Ok(()));
        // What the API server hands back (a JSON round trip) verifies as well.
        let round_trip: GpuOfferSpec =
            serde_json::from_value(serde_json::to_value(&signed).expect("json")).expect("spec");
        assert_eq!(verify(&round_trip), Ok(()));

        type Change = (&'static str, Box<dyn Fn(&mut GpuOfferSpec)>);
        let changes: Vec<Change> = vec![
            ("node", Box::new(|s| s.node_name = "node-b".into())),
            ("price", Box::new(|s| s.price_per_gpu_hour -= 1)),
            ("region", Box::new(|s| s.region = "us-east".into())),
            ("zone", Box::new(|s| s.zone = None)),
            ("uuid", Box::new(|s| s.gpus[1].uuid = "GPU-2".into())),
            ("model", Box::new(|s| s.gpus[0].model = "B200".into())),
            ("memory", Box::new(|s| s.gpus[0].memory_mib *= 2)),
            (
                "one more GPU",
                Box::new(|s| {
                    s.gpus.push(OfferedGpu {
                        uuid: "GPU-9".into(),
                        model: "H100".into(),
                        memory_mib: 81559,
                    })
                }),
            ),
            ("interconnect", Box::new(|s| s.interconnect = Interconnect::NvLink)),
            (
                "allocatable",
                Box::new(|s| {
                    s.allocatable = Some(HostResources { cpu_millicores: 1, memory_bytes: 1 })
                }),
            ),
            ("driver", Box::new(|s| s.driver_version = Some("1".into()))),
            (
                "signing time",
                Box::new(|s| {
                    s.signed_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ))
                }),
            ),
        ];
        for (what, change) in changes {
            let mut changed = signed.clone();
            change(&mut changed);
            assert_eq!(verify(&changed), Err(SignatureError::Mismatch), "{what} changed");
        }
    }

    #[test]
    fn a_spec_signed_before_the_newest_seen_is_a_replay() {
        let at = |s| Some(jiff::Timestamp::from_second(s).expect("time"));
        assert!(!replayed(at(100), None), "the first spec seen");
        assert!(!replayed(None, None), "an untimed spec of an older agent, first seen");
        assert!(!replayed(at(100), at(100)), "the same spec again");
        assert!(!replayed(at(200), at(100)), "signed again later");
        assert!(replayed(at(99), at(100)), "an earlier signed spec");
        assert!(replayed(None, at(100)), "an untimed spec after a timed one");
    }

    #[test]
    fn forged_replayed_and_rewalleted_offers_do_not_verify() {
        let wallet = Keypair::new();
        let signed = sign(&spec(&wallet), &wallet);

        // Signed by a key that is not the wallet's.
        let forged = sign(&spec(&wallet), &Keypair::new());
        assert_eq!(verify(&forged), Err(SignatureError::Mismatch));

        // The signature of another node's offer, same wallet.
        let mut other = spec(&wallet);
        other.node_name = "node-b".into();
        let replayed = GpuOfferSpec { signature: sign(&other, &wallet).signature, ..spec(&wallet) };
        assert_eq!(verify(&replayed), Err(SignatureError::Mismatch));

        // The payout wallet swapped after signing.
        let thief = Keypair::new();
        let swapped = GpuOfferSpec { wallet: thief.pubkey().to_string(), ..signed.clone() };
        assert_eq!(verify(&swapped), Err(SignatureError::Mismatch));

        let unsigned = GpuOfferSpec { signature: None, ..signed.clone() };
        assert_eq!(verify(&unsigned), Err(SignatureError::Unsigned));
        let garbage = GpuOfferSpec { signature: Some("1111".into()), ..signed.clone() };
        assert_eq!(verify(&garbage), Err(SignatureError::Malformed));
        let no_key = GpuOfferSpec { wallet: "z".repeat(44), ..signed };
        assert_eq!(verify(&no_key), Err(SignatureError::BadWallet));
    }

    #[test]
    fn the_message_is_the_domain_and_the_spec_without_its_signature() {
        let wallet = Keypair::new();
        let signed = sign(&spec(&wallet), &wallet);
        let message = signing_message(&signed);
        assert!(message.starts_with(DOMAIN));
        let json: serde_json::Value =
            serde_json::from_slice(&message[DOMAIN.len()..]).expect("json after the domain");
        assert!(json.get("signature").is_none(), "{json}");
        assert_eq!(json["nodeName"], "node-a");
        assert_eq!(message, signing_message(&spec(&wallet)), "the signature is not signed");
    }
}
