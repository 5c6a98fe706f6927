//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback ports, with a
//! kubeconfig for the admin (`system:masters`) identity.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::certs::Pki;
use crate::ports::free_tcp_ports;
use crate::process::{Process, Reaper};
use crate::tools::Tools;

/// The largest object etcd accepts; above the API server's own 3 MiB request limit so that
/// large CRDs (KubeRay's RayCluster is close to 1 MiB, stored with managed fields) fit.
const ETCD_MAX_REQUEST_BYTES: u32 = 4 * 1024 * 1024;
/// The Services' ClusterIPs (the same in every environment).
pub(crate) const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A started control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The API server's URL.
    pub server: String,
    /// The API server's port, on loopback.
    pub port: u16,
    pub pki: Pki,
}

/// Start etcd, the API server, controller-manager and scheduler; returns when the API server
/// is ready and the controller-manager has created the `default` ServiceAccount.
pub async fn start(
    dir: &Path,
    tools: &Tools,
    reaper: &Reaper,
    processes: &mut Vec<Process>,
) -> Result<ControlPlane> {
    let logs = dir.join("logs");
    let pki = Pki::generate(&dir.join("pki"))?;
    let [etcd_client, etcd_peer, apiserver_port] = free_tcp_ports(3)?[..] else {
        bail!("expected three free ports");
    };
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server, &pki.ca_cert, &pki.admin_cert, &pki.admin_key)?;

    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let mut etcd = tools.command("etcd")?;
    etcd.arg("--name=env")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={etcd_url}"))
        .arg(format!("--advertise-client-urls={etcd_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=env={peer_url}"))
        .arg(format!("--max-request-bytes={ETCD_MAX_REQUEST_BYTES}"))
        .arg("--quota-backend-bytes=8589934592")
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    processes.push(Process::spawn(reaper, &logs, "etcd", etcd)?.supervised());

    let path = |p: &PathBuf| p.display().to_string();
    let mut apiserver = tools.command("kube-apiserver")?;
    apiserver
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={apiserver_port}"))
        .arg(format!("--cert-dir={}", dir.join("apiserver").display()))
        .arg(format!("--tls-cert-file={}", path(&pki.serving_cert)))
        .arg(format!("--tls-private-key-file={}", path(&pki.serving_key)))
        .arg(format!("--client-ca-file={}", path(&pki.ca_cert)))
        .arg("--authorization-mode=Node,RBAC")
        .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
        .arg(format!("--service-account-key-file={}", path(&pki.service_account_public_key)))
        .arg(format!("--service-account-signing-key-file={}", path(&pki.service_account_key)))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        // Loopback is not a valid Endpoints address: no `kubernetes` Service endpoints.
        .arg("--endpoint-reconciler-type=none")
        // As the admin (system:masters) towards kubelets: logs, exec.
        .arg(format!("--kubelet-client-certificate={}", path(&pki.admin_cert)))
        .arg(format!("--kubelet-client-key={}", path(&pki.admin_key)))
        // Node names are not in any DNS the API server asks.
        .arg("--kubelet-preferred-address-types=InternalIP,Hostname")
        .arg("--allow-privileged=true")
        .arg("--profiling=false");
    processes.push(Process::spawn(reaper, &logs, "kube-apiserver", apiserver)?.supervised());
    // The controller-manager gives up when the API server is not healthy within its own short
    // wait, which a loaded machine can exceed: it starts once the API server is ready.
    wait_ready(&kubeconfig, processes, false).await?;

    let mut controller_manager = tools.command("kube-controller-manager")?;
    controller_manager
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
        .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
        .arg("--leader-elect=false")
        .arg("--secure-port=0")
        .arg(format!("--root-ca-file={}", path(&pki.ca_cert)))
        .arg(format!("--service-account-private-key-file={}", path(&pki.service_account_key)))
        .arg(format!("--cluster-signing-cert-file={}", path(&pki.ca_cert)))
        .arg(format!("--cluster-signing-key-file={}", path(&pki.ca_key)))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--use-service-account-credentials=false");
    processes.push(
        Process::spawn(reaper, &logs, "kube-controller-manager", controller_manager)?.supervised(),
    );

    let mut scheduler = tools.command("kube-scheduler")?;
    scheduler
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
        .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
        .arg("--leader-elect=false")
        .arg("--secure-port=0");
    processes.push(Process::spawn(reaper, &logs, "kube-scheduler", scheduler)?.supervised());

    wait_ready(&kubeconfig, processes, true).await?;
    Ok(ControlPlane { kubeconfig, server, port: apiserver_port, pki })
}

/// A client for the admin identity of a kubeconfig written by this module.
pub async fn client(kubeconfig: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

impl ControlPlane {
    /// A kubeconfig at `path` for a client of this API server (kubelet, kube-proxy) that
    /// authenticates with `cert` and `key`.
    pub(crate) fn write_client_kubeconfig(
        &self,
        path: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<()> {
        write_kubeconfig(path, &self.server, &self.pki.ca_cert, cert, key)
    }
}

/// A kubeconfig for `server` authenticating with a client certificate.
fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gpumarket", "cluster": {
            "server": server,
            "certificate-authority": ca_cert,
        }}],
        "users": [{"name": "user", "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": "gpumarket", "context": {"cluster": "gpumarket", "user": "user"}}],
        "current-context": "gpumarket",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// `/readyz` answers ok (etcd, RBAC bootstrap roles, every post-start hook) and, with
/// `controllers`, the controller-manager is working: the `default` ServiceAccount exists.
async fn wait_ready(kubeconfig: &Path, processes: &[Process], controllers: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = client(kubeconfig).await?;
    let mut last_error;
    loop {
        for process in processes {
            process.ensure_running()?;
        }
        let readyz = http::Request::get("/readyz").body(Vec::new())?;
        match client.request_text(readyz).await {
            Ok(body) if body.trim() == "ok" && !controllers => return Ok(()),
            Ok(body) if body.trim() == "ok" => {
                let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
                match accounts.get_opt("default").await {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) => last_error = "no default ServiceAccount yet".into(),
                    Err(e) => last_error = e.to_string(),
                }
            }
            Ok(body) => last_error = body,
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("the control plane was not ready within 120 s: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
