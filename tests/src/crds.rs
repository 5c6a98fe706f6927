//! Install the gpumarket CRDs (from the Rust types) and the KubeRay CRDs (from the tools
//! cache), with server-side apply: the RayCluster CRD is close to 1 MiB, too large for the
//! last-applied annotation of a client-side apply.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

const FIELD_MANAGER: &str = "gpumarket-env";

pub async fn install(client: &kube::Client, kuberay_crds: &Path) -> Result<()> {
    let mut crds = gpumarket_crds::crds();
    crds.extend(read_manifests(kuberay_crds)?);
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let (api, apply) = (&api, &apply);
    let applies = crds.iter().map(|crd| async move {
        let name = crd.metadata.name.as_deref().context("a CRD without a name")?;
        api.patch(name, apply, &Patch::Apply(crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        wait_established(api, name, Duration::from_secs(180)).await
    });
    futures::future::try_join_all(applies).await?;
    Ok(())
}

/// The CRDs in the `*.yaml` files of `dir`, in file name order.
fn read_manifests(dir: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("reading KubeRay CRDs from {}: run hack/tools/build.sh", dir.display())
    })?;
    let mut files: Vec<_> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no KubeRay CRDs in {}: run hack/tools/build.sh", dir.display());
    }
    files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file)?;
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", file.display()))
        })
        .collect()
}

async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let crd = api.get(name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CRD {name} not Established within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
