//! When the lease cache can stand in for a read of a cluster's leases from the API.
//!
//! A reconcile that misses a lease the previous one created matches the cluster again and
//! over-provisions it (the surplus is ended unbilled, but GPUs are claimed for nothing). Reading
//! from the API every time is safe but costs O(all leases) in the API server per reconcile: a
//! label selector on a custom resource filters every object. The cache is enough when it shows
//! every lease write that the reconcile must not miss:
//! - every lease the cluster's status names (written after its leases, by any replica);
//! - every lease this replica created for it and the cache has not shown yet;
//! - this replica's last write of a lease of the cluster, at that version or later. One watch
//!   delivers the writes of all leases in order, so the cache then shows every earlier write
//!   too. Resource versions are etcd revisions, integers that only grow; one that is not a
//!   number means the API is read.

use std::collections::HashMap;

use gpumarket_crds::GpuLease;
use kube::ResourceExt;

/// The last lease write a replica made for a cluster: the lease's name and resource version.
pub type LastWrite = (String, u64);

/// Whether `cached` (the cache's leases of one cluster) shows every write that matters (see the
/// module documentation): the leases `named` by the cluster's status, those `created` and not
/// seen yet, and `last_write`.
pub fn cache_is_current(
    cached: &[GpuLease],
    named: &[String],
    created: &[String],
    last_write: Option<&LastWrite>,
) -> bool {
    let versions: HashMap<String, Option<u64>> =
        cached.iter().map(|lease| (lease.name_any(), version(lease))).collect();
    let shown = |name: &String| versions.contains_key(name);
    named.iter().chain(created).all(shown)
        && last_write.is_none_or(|(name, written)| {
            versions.get(name).copied().flatten().is_some_and(|seen| seen >= *written)
        })
}

/// The lease's resource version as a number, if it is one.
pub fn version(lease: &GpuLease) -> Option<u64> {
    lease.resource_version()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_cluster, mk_lease};

    fn at(version: &str, node: &str) -> GpuLease {
        let cluster = mk_cluster("train", 2, 1);
        let mut lease = mk_lease(&cluster, node, &[&format!("{node}-gpu-0")], 1);
        lease.metadata.resource_version = Some(version.into());
        lease
    }

    #[test]
    fn the_cache_stands_in_only_when_it_shows_every_write_that_matters() {
        let (a, b) = (at("10", "a"), at("12", "b"));
        let names = [a.name_any(), b.name_any()];
        let (only_a, only_b) = (&names[..1], &names[1..]);
        let cached = [a.clone(), b];
        assert!(cache_is_current(&cached, &names, &[], None));
        assert!(cache_is_current(&cached, &[], only_b, Some(&(names[0].clone(), 10))));
        assert!(
            cache_is_current(&cached, &[], &[], Some(&(names[0].clone(), 9))),
            "a later version of the lease written"
        );

        let cached = [a];
        assert!(!cache_is_current(&cached, only_b, &[], None), "named by the status");
        assert!(!cache_is_current(&cached, only_a, only_b, None), "just created");
        assert!(!cache_is_current(&cached, &[], &[], Some(&(names[1].clone(), 12))), "not shown");
        assert!(
            !cache_is_current(&cached, &[], &[], Some(&(names[0].clone(), 11))),
            "the cache still shows the version before the write"
        );
        let odd = [at("not-a-number", "a")];
        assert!(!cache_is_current(&odd, &[], &[], Some(&(names[0].clone(), 1))), "not comparable");
    }
}
