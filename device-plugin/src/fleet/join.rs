//! What the hub admin applies on the hub to let fleet `<name>` join: its GpuFleet, a
//! ServiceAccount `<name>` in [`FLEET_NAMESPACE`] whose token is the join credential, and RBAC
//! that reaches only the fleet's own GpuFleet by name. RBAC cannot name "the fleet's offers",
//! so it grants creating and patching GpuOffers (never reading them); the chart's
//! fleet-isolation admission policy narrows every write to offers named `<name>.<node>` and
//! labelled with the fleet, and keeps the fleet off the fields the controller owns.

use gpumarket_crds::common::{GROUP, is_valid_wallet};
use gpumarket_crds::{FLEET_LABEL, FLEET_NAMESPACE};
use serde_json::{Value, json};

/// The hub objects of fleet `name` paid to `wallet`, in the order to apply them.
pub fn join_objects(name: &str, wallet: &str) -> Result<Vec<Value>, String> {
    let valid_name = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid_name {
        return Err(format!(
            "fleet name {name:?}: lower-case letters, digits and '-', starting with a letter, at most 40 characters"
        ));
    }
    if !is_valid_wallet(wallet) {
        return Err(format!("wallet {wallet:?} is not a base-58 Solana public key"));
    }
    let role = format!("gpumarket-fleet-{name}");
    let labels = json!({"app.kubernetes.io/part-of": "gpumarket", FLEET_LABEL: name});
    Ok(vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": FLEET_NAMESPACE},
        }),
        json!({
            "apiVersion": format!("{GROUP}/v1alpha1"), "kind": "GpuFleet",
            "metadata": {"name": name},
            "spec": {"wallet": wallet},
        }),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": FLEET_NAMESPACE, "labels": labels},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role, "labels": labels},
            "rules": [
                // Its own GpuFleet only: read the work placed on it, report heartbeat and workloads.
                {"apiGroups": [GROUP], "resources": ["gpufleets"], "resourceNames": [name],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": [GROUP], "resources": ["gpufleets/status"], "resourceNames": [name],
                 "verbs": ["patch"]},
                // Its offers (narrowed by admission policy); no read of anyone's offers.
                {"apiGroups": [GROUP], "resources": ["gpuoffers"], "verbs": ["create", "patch"]},
                {"apiGroups": [GROUP], "resources": ["gpuoffers/status"], "verbs": ["patch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": FLEET_NAMESPACE}],
        }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_reaches_only_its_own_fleet_by_name_and_reads_no_offers() {
        let objects =
            join_objects("fleet-a", "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV").expect("valid");
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["Namespace", "GpuFleet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
        );
        let rules = objects[3]["rules"].as_array().expect("rules");
        for rule in rules {
            let resource = rule["resources"][0].as_str().expect("resource");
            let verbs: Vec<&str> =
                rule["verbs"].as_array().expect("verbs").iter().filter_map(Value::as_str).collect();
            if resource.starts_with("gpufleets") {
                assert_eq!(rule["resourceNames"], json!(["fleet-a"]));
            } else {
                assert!(!verbs.iter().any(|v| ["get", "list", "watch", "delete"].contains(v)));
            }
        }
        assert_eq!(objects[4]["subjects"][0]["namespace"], FLEET_NAMESPACE);
    }

    #[test]
    fn bad_names_and_wallets_are_refused() {
        let wallet = "7EcDhSYGxXyscszYEp35KHN8vvw3svAuLKTzXwCFLtV";
        for bad in ["Fleet", "fleet.a", "-a", "a-", "", &"a".repeat(41)] {
            assert!(join_objects(bad, wallet).is_err(), "{bad:?}");
        }
        let refused = join_objects("fleet-a", "not-a-wallet").expect_err("a bad wallet");
        assert!(refused.contains("base-58"), "{refused}");
    }
}
