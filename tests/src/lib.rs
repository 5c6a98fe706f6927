//! gpumarket's local environment, shared by the integration tests (one per test binary, see
//! [`Env::shared`]) and by `gpumarket-env up`: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler and KWOK on loopback ports, the gpumarket and KubeRay CRDs, fake GPU nodes,
//! (on demand) a Solana test validator with the settlement mint and funded wallets, and (on
//! request) a real node running pods (see [`real_node`]).
//!
//! No process outlives the process that started the environment, however it ends (see
//! [`process`]); its directory (certificates, etcd data, ledger, logs) goes with it unless
//! `GPUMARKET_KEEP_ENV=1`. Its own processes are restarted when they exit on their own, as a
//! kubelet restarts containers ([`process::Supervisor`], [`Env::exits`]).

pub mod certs;
pub mod chaos;
pub mod chart;
pub mod control_plane;
pub mod crds;
pub mod demo;
pub mod dns;
pub mod images;
pub mod kwok;
pub mod metrics;
pub mod node_mix;
pub mod ports;
pub mod process;
pub mod ray;
pub mod real_node;
pub mod relay;
pub mod solana;
pub mod supplier;
pub mod tools;
pub mod up;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

pub use kwok::GpuNode;
pub use real_node::RealNode;
pub use solana::Solana;

use process::{Exit, Process, Reaper, Supervisor};
use tools::Tools;

/// Where an environment lives and whether its directory survives it.
#[derive(Clone, Debug, Default)]
pub struct EnvOptions {
    /// The environment's directory; a fresh temporary one when `None`.
    pub dir: Option<PathBuf>,
    /// Keep the directory (logs, etcd data, ledger) after the environment stops.
    pub keep_dir: bool,
    /// Start the Solana validator with the control plane (otherwise on first use).
    pub solana: bool,
    /// Start a real node (containerd, kubelet, CNI bridge, CoreDNS) beside the KWOK ones;
    /// needs root.
    pub real_node: bool,
    /// The addresses KWOK gives its pods, e.g. `127.42.0.0/16`: on loopback a test can listen
    /// where a KWOK pod "is" (a fleet's Ray head behind the hub's tunnel); [`kwok::POD_CIDR`]
    /// when `None`.
    pub kwok_pod_cidr: Option<String>,
}

const SOLANA_READY: &str = "validator, mint and wallets ready";

/// A running environment. See the crate documentation.
pub struct Env {
    dir: PathBuf,
    kubeconfig: PathBuf,
    tools: Tools,
    /// Every process of the environment, the supervised ones restarted when they exit.
    processes: std::sync::Arc<Supervisor>,
    solana: tokio::sync::OnceCell<Solana>,
    real_node: Option<RealNode>,
    namespaces: AtomicUsize,
    timings: Mutex<Vec<(String, Duration)>>,
}

/// Where to find a running environment: what `gpumarket-env up` writes to its env file.
#[derive(Clone, Debug)]
pub struct Coordinates {
    pub kubeconfig: PathBuf,
    /// kubectl, helm, ... of the environment's Kubernetes version.
    pub tools_bin: PathBuf,
    /// gpumarket's own binaries (`kubectl-gpumarket` among them): beside the running one.
    pub gpumarket_bin: Option<PathBuf>,
    pub solana: Solana,
}

impl Coordinates {
    /// Shell `export` lines for the environment.
    pub fn env_file(&self) -> String {
        let suppliers: Vec<String> =
            self.solana.suppliers.iter().map(|p| p.display().to_string()).collect();
        format!(
            "export PATH={}{}:$PATH\nexport KUBECONFIG={}\nexport SOLANA_RPC_URL={}\nexport GPUMARKET_MINT={}\n\
             export GPUMARKET_MINT_AUTHORITY={}\nexport GPUMARKET_BUYER_KEYPAIR={}\n\
             export GPUMARKET_SUPPLIER_KEYPAIRS={}\nexport GPUMARKET_FAUCET_KEYPAIR={}\n",
            self.gpumarket_bin.as_ref().map_or(String::new(), |b| format!("{}:", b.display())),
            self.tools_bin.display(),
            self.kubeconfig.display(),
            self.solana.rpc_url,
            self.solana.mint,
            self.solana.mint_authority.display(),
            self.solana.buyer.display(),
            suppliers.join(","),
            self.solana.faucet.display(),
        )
    }
}

static SHARED: tokio::sync::OnceCell<Result<Env, String>> = tokio::sync::OnceCell::const_new();
static SHARED_LOGS: OnceLock<PathBuf> = OnceLock::new();

impl Env {
    /// The environment of this test binary, started by the first test that asks for it.
    /// Panics (failing the test) when it cannot start; every later caller gets the same error.
    pub async fn shared() -> &'static Env {
        let env = SHARED
            .get_or_init(|| async {
                let keep_dir = std::env::var_os("GPUMARKET_KEEP_ENV").is_some_and(|v| v == "1");
                let env = Env::start(EnvOptions { dir: None, keep_dir, ..EnvOptions::default() })
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                install_log_printer(env.dir.join("logs"));
                Ok(env)
            })
            .await;
        match env {
            Ok(env) => env,
            Err(e) => panic!("the test environment did not start: {e}"),
        }
    }

    /// Start the control plane and KWOK and install the CRDs; with `options.solana`, start the
    /// validator at the same time; with `options.real_node`, then the real node.
    pub async fn start(options: EnvOptions) -> Result<Env> {
        let tools = Tools::locate();
        let dir = match options.dir {
            Some(dir) => prepare_dir(&dir)?,
            None => tempfile::Builder::new().prefix("gpumarket-env-").tempdir()?.keep(),
        };
        std::fs::create_dir_all(dir.join("logs"))?;
        let reaper = Reaper::start((!options.keep_dir).then_some(dir.as_path()))?;
        let started = Instant::now();
        let mut processes = Vec::new();
        let mut validator = Vec::new();
        let (kubeconfig, solana) = tokio::join!(
            async {
                let kubeconfig = control_plane::start(&dir, &tools, &reaper, &mut processes).await;
                (kubeconfig, started.elapsed())
            },
            async {
                if !options.solana {
                    return None;
                }
                let solana = solana::start(&dir, &tools, &reaper, &mut validator).await;
                Some((solana, started.elapsed()))
            },
        );
        processes.append(&mut validator);
        let mut timings = vec![("control plane ready".to_string(), kubeconfig.1)];
        let control_plane = match kubeconfig.0 {
            Ok(control_plane) => control_plane,
            Err(e) => return Err(abandon(e, &dir, &reaper)),
        };
        let solana = match solana {
            None => None,
            Some((Ok(solana), elapsed)) => {
                timings.push((SOLANA_READY.to_string(), elapsed));
                Some(solana)
            }
            Some((Err(e), _)) => return Err(abandon(e, &dir, &reaper)),
        };
        // Its reaper dropped with it on failure, the processes go too.
        let processes = Supervisor::start(reaper, processes)?;
        let mut env = Env {
            dir,
            kubeconfig: control_plane.kubeconfig.clone(),
            tools,
            processes,
            solana: tokio::sync::OnceCell::new_with(solana),
            real_node: None,
            namespaces: AtomicUsize::new(0),
            timings: Mutex::new(timings),
        };
        if let Err(e) = env.start_kwok_and_crds(options.kwok_pod_cidr.as_deref()).await {
            return Err(abandon(e, &env.dir, env.reaper()));
        }
        env.record("KWOK started and CRDs established", started.elapsed());
        if options.real_node {
            let mut processes = Vec::new();
            let node = real_node::start(
                &env.dir,
                &env.tools,
                &control_plane,
                env.reaper(),
                &mut processes,
            )
            .await;
            env.lock_processes()?.append(&mut processes);
            match node {
                Ok(node) => env.real_node = Some(node),
                Err(e) => return Err(abandon(e, &env.dir, env.reaper())),
            }
            env.record("real node Ready", started.elapsed());
        }
        Ok(env)
    }

    async fn start_kwok_and_crds(&self, pod_cidr: Option<&str>) -> Result<()> {
        let pod_cidr = pod_cidr.unwrap_or(kwok::POD_CIDR);
        let kwok = kwok::start(&self.dir, &self.tools, &self.kubeconfig, self.reaper(), pod_cidr)?;
        self.lock_processes()?.push(kwok);
        crds::install(&self.client().await?, &self.tools.kuberay_crds).await
    }

    /// A new client for the admin identity (`system:masters`).
    pub async fn client(&self) -> Result<kube::Client> {
        control_plane::client(&self.kubeconfig).await
    }

    /// The admin kubeconfig, for child processes (controller, agents, kubectl, helm).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The environment's directory (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The real node, if the environment was started with one.
    pub fn real_node(&self) -> Option<&RealNode> {
        self.real_node.as_ref()
    }

    /// The prebuilt tools this environment runs (kubectl, helm, kuberay-operator, ...).
    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// A fresh namespace `<prefix>-<n>` (prefix made a valid name), with its `default` ServiceAccount (which pods need).
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let prefix: String = prefix
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(50)
            .collect();
        let name = format!("{}-{n}", prefix.trim_start_matches('-'));
        let client = self.client().await?;
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
        let deadline = Instant::now() + Duration::from_secs(60);
        while accounts.get_opt("default").await?.is_none() {
            if Instant::now() > deadline {
                bail!(
                    "no default ServiceAccount in {name} after 60 s: is kube-controller-manager running?"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(name)
    }

    /// Run `command` as part of the environment: output in `logs/<name>.log` (use a unique
    /// name), stopped with the environment and never outliving it. Returns its process id.
    /// Not restarted: a test that kills it restarts it itself.
    pub fn spawn(&self, name: &str, command: std::process::Command) -> Result<u32> {
        self.add(Process::spawn(self.reaper(), &self.dir.join("logs"), name, command)?)
    }

    /// [`Env::spawn`], restarted whenever it exits on its own, as a Deployment's or
    /// DaemonSet's pod is (see [`Env::exits`]). Returns the first process id.
    pub fn spawn_supervised(&self, name: &str, command: std::process::Command) -> Result<u32> {
        self.add(Process::spawn(self.reaper(), &self.dir.join("logs"), name, command)?.supervised())
    }

    fn add(&self, process: Process) -> Result<u32> {
        let pid = process.id()?;
        self.lock_processes()?.push(process);
        Ok(pid)
    }

    /// The current process id of the environment's process `name`.
    pub fn pid(&self, name: &str) -> Result<u32> {
        self.lock_processes()?
            .iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("the environment runs no process {name}"))?
            .id()
    }

    /// Every exit of a supervised process so far (each restarted, or due to be), oldest first.
    pub fn exits(&self) -> Vec<Exit> {
        self.processes.exits()
    }

    fn reaper(&self) -> &Reaper {
        self.processes.reaper()
    }

    /// KubeRay's operator for namespace `ns`: it makes the head and worker pods of RayClusters
    /// there (which KWOK runs and makes Ready) and reports them ready. Returns its process id.
    pub fn start_kuberay(&self, ns: &str) -> Result<u32> {
        let mut operator = self.tools.command("kuberay-operator")?;
        operator
            .arg(format!("-kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("-watch-namespace={ns}"))
            .args([
                "-enable-leader-election=false",
                "-metrics-addr=0",
                "-health-probe-bind-address=0",
            ]);
        self.spawn(&format!("kuberay-operator-{ns}"), operator)
    }

    /// Create KWOK GPU nodes and wait until each is Ready with its GPUs allocatable.
    pub async fn add_gpu_nodes(&self, nodes: &[GpuNode]) -> Result<()> {
        kwok::add_gpu_nodes(&self.client().await?, nodes).await
    }

    /// The Solana validator, mint and wallets, started on first use.
    pub async fn solana(&self) -> Result<&Solana> {
        self.solana
            .get_or_try_init(|| async {
                let started = Instant::now();
                let mut processes = Vec::new();
                let solana =
                    solana::start(&self.dir, &self.tools, self.reaper(), &mut processes).await;
                self.lock_processes()?.append(&mut processes);
                let solana = solana?;
                self.record(SOLANA_READY, started.elapsed());
                Ok(solana)
            })
            .await
    }

    /// Everything needed to use the environment from outside, starting Solana if needed.
    pub async fn coordinates(&self) -> Result<Coordinates> {
        Ok(Coordinates {
            kubeconfig: self.kubeconfig.clone(),
            tools_bin: self.tools.bin.clone(),
            gpumarket_bin: std::env::current_exe()?.parent().map(Path::to_path_buf),
            solana: self.solana().await?.clone(),
        })
    }

    /// Stop every process (newest first: KWOK and the validator before the control plane, etcd
    /// last) and remove the directory unless it is kept.
    pub fn shutdown(&self) -> Result<()> {
        let mut processes = self.lock_processes()?;
        while let Some(process) = processes.pop() {
            process.stop(Duration::from_secs(5))?;
        }
        self.reaper().finish()
    }

    /// Stop the environment's process `name` and start it again as it was started (a
    /// kubelet restarted under running pods, say); its log goes on after
    /// [`process::RESTARTED`].
    pub fn restart(&self, name: &str) -> Result<()> {
        let processes = self.lock_processes()?;
        let process = processes
            .iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("the environment runs no process {name}"))?;
        process.restart(self.reaper(), Duration::from_secs(10))
    }

    /// Fail if a process of the environment that is not restarted has died, or one could not
    /// be restarted.
    pub fn ensure_running(&self) -> Result<()> {
        self.processes.ensure_running()
    }

    fn lock_processes(&self) -> Result<std::sync::MutexGuard<'_, Vec<Process>>> {
        self.processes.lock()
    }

    /// How long after the start each step was done.
    pub fn timings(&self) -> Vec<(String, Duration)> {
        self.timings.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn record(&self, step: &str, elapsed: Duration) {
        if let Ok(mut timings) = self.timings.lock() {
            timings.push((step.to_string(), elapsed));
        }
    }
}

/// A start failed: print where the logs are and let the reaper clean up at exit.
fn abandon(error: anyhow::Error, dir: &Path, reaper: &Reaper) -> anyhow::Error {
    let tails = log_tails(&dir.join("logs"), 20);
    let _ = reaper.finish();
    error.context(format!("environment in {} failed to start; logs:\n{tails}", dir.display()))
}

/// A directory for `up`: created, or emptied if it holds an earlier environment; refused if it
/// holds anything else (it is removed when the environment stops).
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    const MARKER: &str = ".gpumarket-env";
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            bail!(
                "{} exists and is not a gpumarket environment: choose another --dir",
                dir.display()
            );
        }
        let owner = std::fs::read_to_string(dir.join(MARKER)).unwrap_or_default();
        if !owner.trim().is_empty() && Path::new("/proc").join(owner.trim()).exists() {
            bail!(
                "an environment is already running in {} (pid {}): stop it or choose another --dir",
                dir.display(),
                owner.trim()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), std::process::id().to_string())?;
    Ok(dir.canonicalize()?)
}

/// The last `lines` lines of every log in `logs`, each under its name.
pub fn log_tails(logs: &Path, lines: usize) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|file| {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            format!("==== {name} (last {lines} lines) ====\n{}\n", process::log_tail(file, lines))
        })
        .collect()
}

/// When a test panics, print the end of the shared environment's logs (captured with the
/// test's output, so shown only for failing tests).
fn install_log_printer(logs: PathBuf) {
    if SHARED_LOGS.set(logs).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(logs) = SHARED_LOGS.get() {
            eprintln!("\nenvironment logs ({}):\n{}", logs.display(), log_tails(logs, 15));
        }
    }));
}

/// Send what gpumarket code running inside this test logs (`RUST_LOG`, else its info) to the
/// test's output, which the harness shows when the test fails.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("gpumarket_controller=info,gpumarket_device_plugin=info")
    });
    // Already set by an earlier test of this binary: that one serves.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Poll `check` every 200 ms until it returns `Some`, panicking with `what` after `timeout`:
/// how tests wait for controllers and KWOK to converge.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
