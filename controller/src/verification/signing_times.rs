//! The newest signing time of each offer, kept in a ConfigMap of the controller's own namespace
//! (which suppliers cannot write), so that a restarted controller still refuses an older signed
//! spec of an offer, even one deleted and re-created while it was down. One data key per offer
//! (offer names are node names, valid ConfigMap keys), each an RFC 3339 time.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

/// Name of the ConfigMap, in the controller's namespace.
pub const CONFIG_MAP: &str = "gpumarket-offer-signing-times";

/// The signing times in a ConfigMap's data, by offer name. An entry that is not a time (only an
/// administrator can write there) is left out, and logged.
pub fn parse(data: &BTreeMap<String, String>) -> HashMap<String, Timestamp> {
    data.iter()
        .filter_map(|(offer, at)| match at.parse() {
            Ok(at) => Some((offer.clone(), at)),
            Err(e) => {
                tracing::warn!(%offer, %at, error = %e, "{CONFIG_MAP}: not a signing time");
                None
            }
        })
        .collect()
}

/// The recorded signing times, creating the (empty) ConfigMap if there is none yet.
pub async fn load(
    client: &Client,
    namespace: &str,
) -> Result<HashMap<String, Timestamp>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Some(map) = api.get_opt(CONFIG_MAP).await? {
        return Ok(parse(&map.data.unwrap_or_default()));
    }
    let empty = ConfigMap {
        metadata: ObjectMeta { name: Some(CONFIG_MAP.into()), ..ObjectMeta::default() },
        ..ConfigMap::default()
    };
    match api.create(&PostParams::default(), &empty).await {
        Ok(_) => Ok(HashMap::new()),
        // Another replica created it in between: it is still empty of anything we could miss.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(HashMap::new()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_times_read_back_and_garbage_is_left_out() {
        let at = Timestamp::from_second(1_800_000_000).expect("time");
        let data = BTreeMap::from([
            ("node-a".to_string(), at.to_string()),
            ("node-b".to_string(), "yesterday".to_string()),
        ]);
        assert_eq!(parse(&data), HashMap::from([("node-a".to_string(), at)]));
    }
}
