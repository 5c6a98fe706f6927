//! The newest signing time of each offer, kept in a ConfigMap of the controller's own namespace
//! (which suppliers cannot write), so that a restarted controller still refuses an older signed
//! spec of an offer, even one deleted and re-created while it was down. One data key per offer
//! (offer names are node names, valid ConfigMap keys), each an RFC 3339 time.
//!
//! So that the ConfigMap stays small whatever the churn of nodes, the times of offers gone for
//! a while are dropped ([`prune`]) and replaced by one floor: an offer with no time of its own
//! must be signed at or after it. Agents sign what they publish when they publish it, so a
//! spec signed before the floor is an old one re-applied.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// Name of the ConfigMap, in the controller's namespace.
pub const CONFIG_MAP: &str = "gpumarket-offer-signing-times";

/// How long after its signing time an offer gone from the market keeps its own time.
pub const RETENTION: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// How often the times of offers gone are pruned.
pub const PRUNE_PERIOD: std::time::Duration = std::time::Duration::from_secs(600);

/// The data key of the floor: not a valid object name, so no offer's.
const FLOOR_KEY: &str = "_floor";

/// What the ConfigMap holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The newest signing time by offer name.
    pub times: HashMap<String, Timestamp>,
    /// The oldest signing time accepted for an offer without a time of its own.
    pub floor: Option<Timestamp>,
}

/// The signing times in a ConfigMap's data. An entry that is not a time (only an administrator
/// can write there) is left out, and logged.
pub fn parse(data: &BTreeMap<String, String>) -> Recorded {
    let mut recorded = Recorded::default();
    for (key, at) in data {
        match at.parse() {
            Ok(at) if key == FLOOR_KEY => recorded.floor = Some(at),
            Ok(at) => {
                recorded.times.insert(key.clone(), at);
            }
            Err(e) => tracing::warn!(%key, %at, error = %e, "{CONFIG_MAP}: not a signing time"),
        }
    }
    recorded
}

/// The recorded signing times, creating the (empty) ConfigMap if there is none yet.
pub async fn load(client: &Client, namespace: &str) -> Result<Recorded, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Some(map) = api.get_opt(CONFIG_MAP).await? {
        return Ok(parse(&map.data.unwrap_or_default()));
    }
    let empty = ConfigMap {
        metadata: ObjectMeta { name: Some(CONFIG_MAP.into()), ..ObjectMeta::default() },
        ..ConfigMap::default()
    };
    match api.create(&PostParams::default(), &empty).await {
        Ok(_) => Ok(Recorded::default()),
        // Another replica created it in between: it is still empty of anything we could miss.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Recorded::default()),
        Err(e) => Err(e),
    }
}

/// Records each `(offer, at)` as that offer's newest signing time (one merge patch of those
/// keys).
pub async fn record(
    client: &Client,
    namespace: &str,
    times: &[(String, Timestamp)],
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data: serde_json::Map<String, serde_json::Value> =
        times.iter().map(|(offer, at)| (offer.clone(), json!(at.to_string()))).collect();
    let patch = json!({ "data": data });
    api.patch(CONFIG_MAP, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

/// The offers whose times are dropped, and the floor that replaces them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    pub offers: Vec<String>,
    pub floor: Timestamp,
}

/// What [`prune`] drops from `recorded`: the times, older than `before`, of the offers that
/// `exists` does not know; and the floor then, the newest of them or the floor before.
pub fn pruned(
    recorded: &Recorded,
    exists: impl Fn(&str) -> bool,
    before: Timestamp,
) -> Option<Pruned> {
    let mut offers: Vec<(&String, Timestamp)> = recorded
        .times
        .iter()
        .filter(|(offer, at)| **at < before && !exists(offer))
        .map(|(offer, at)| (offer, *at))
        .collect();
    let newest = offers.iter().map(|(_, at)| *at).max()?;
    offers.sort();
    Some(Pruned {
        offers: offers.into_iter().map(|(offer, _)| offer.clone()).collect(),
        floor: recorded.floor.map_or(newest, |floor| floor.max(newest)),
    })
}

/// Drops the recorded times that [`pruned`] says (of offers `exists` does not know, older than
/// `before`) in one write conditional on the ConfigMap not having changed since it was read,
/// so that a floor another replica raised meanwhile is never lowered. `None`: nothing to drop,
/// or the ConfigMap changed (the next prune tries again).
pub async fn prune(
    client: &Client,
    namespace: &str,
    exists: impl Fn(&str) -> bool,
    before: Timestamp,
) -> Result<Option<Pruned>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let Some(map) = api.get_opt(CONFIG_MAP).await? else { return Ok(None) };
    let Some(pruned) = pruned(&parse(&map.data.unwrap_or_default()), exists, before) else {
        return Ok(None);
    };
    let mut data: serde_json::Map<String, serde_json::Value> =
        pruned.offers.iter().map(|offer| (offer.clone(), serde_json::Value::Null)).collect();
    data.insert(FLOOR_KEY.into(), json!(pruned.floor.to_string()));
    let patch = json!({
        "metadata": {"resourceVersion": map.metadata.resource_version},
        "data": data,
    });
    match api.patch(CONFIG_MAP, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(Some(pruned)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("time")
    }

    #[test]
    fn recorded_times_read_back_and_garbage_is_left_out() {
        let data = BTreeMap::from([
            ("node-a".to_string(), at(0).to_string()),
            ("node-b".to_string(), "yesterday".to_string()),
            (FLOOR_KEY.to_string(), at(-60).to_string()),
        ]);
        let recorded = parse(&data);
        assert_eq!(recorded.times, HashMap::from([("node-a".to_string(), at(0))]));
        assert_eq!(recorded.floor, Some(at(-60)));
    }

    #[test]
    fn only_old_times_of_offers_gone_are_pruned_and_the_floor_only_rises() {
        let recorded = Recorded {
            times: HashMap::from([
                ("gone-old".to_string(), at(10)),
                ("gone-older".to_string(), at(5)),
                ("gone-recent".to_string(), at(100)),
                ("still-here".to_string(), at(1)),
            ]),
            floor: None,
        };
        let exists = |offer: &str| offer == "still-here";
        let pruned = pruned(&recorded, exists, at(50)).expect("some pruned");
        assert_eq!(pruned.offers, ["gone-old", "gone-older"]);
        assert_eq!(pruned.floor, at(10), "the newest of the times dropped");

        let higher_floor = Recorded { floor: Some(at(20)), ..recorded.clone() };
        assert_eq!(super::pruned(&higher_floor, exists, at(50)).map(|p| p.floor), Some(at(20)));
        assert_eq!(super::pruned(&recorded, exists, at(5)), None, "none older than that");
        assert_eq!(super::pruned(&recorded, |_| true, at(50)), None, "none gone");
    }
}
