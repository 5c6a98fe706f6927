//! The plugin's life with the kubelet, as NVIDIA's plugin lives it: remove a stale socket, serve
//! on a unix socket in the device-plugin directory, dial that socket to confirm the server is
//! up, register with the kubelet's `Registration` service on `kubelet.sock`; start over when
//! the kubelet restarts (it re-creates `kubelet.sock` and removes the plugins' sockets).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::api::RegisterRequest;
use crate::api::device_plugin_client::DevicePluginClient;
use crate::api::device_plugin_server::DevicePluginServer;
use crate::api::registration_client::RegistrationClient;
use crate::plugin::{GpuPlugin, options};

/// Version of the device-plugin API this plugin speaks.
pub const API_VERSION: &str = "v1beta1";
/// The kubelet's registration socket, in the device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// How often the directory is looked at for a restarted kubelet.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a replaced server may finish requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("serving on {path}: {source}")]
    Serve { path: PathBuf, source: std::io::Error },
    #[error("the plugin's own socket {path} does not answer: {message}")]
    NotReady { path: PathBuf, message: String },
    #[error("registering {resource} with the kubelet at {path}: {message}")]
    Register { resource: String, path: PathBuf, message: String },
}

/// Where the plugin serves and what it registers as.
#[derive(Clone, Debug)]
pub struct PluginSocket {
    pub dir: PathBuf,
    pub resource_name: String,
}

impl PluginSocket {
    /// Socket file name: one per resource, so two plugins of this binary never collide.
    pub fn endpoint(&self) -> String {
        format!("gpumarket-{}.sock", self.resource_name.replace(['/', '.'], "-"))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(self.endpoint())
    }

    pub fn kubelet_socket(&self) -> PathBuf {
        self.dir.join(KUBELET_SOCKET)
    }
}

/// A gRPC channel over a unix socket.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Identity of a file, to notice it being re-created.
fn file_identity(path: &Path) -> Option<(u64, u64, i64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino(), m.ctime_nsec()))
}

/// Serves `plugin` and keeps it registered until the future is dropped. Failures to register
/// (kubelet not up yet, kubelet restarting) are retried; only a socket that cannot be served
/// at all is an error.
pub async fn serve_and_register(
    plugin: GpuPlugin,
    socket: PluginSocket,
) -> Result<(), RegistrationError> {
    loop {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = start_server(plugin.clone(), &socket, stopped).await?;
        let registered_kubelet = register_when_possible(&socket).await;
        tracing::info!(resource = %socket.resource_name, socket = %socket.path().display(), "registered with the kubelet");
        // Start over when the kubelet re-creates its socket or our socket disappears (a
        // restarting kubelet removes the plugin sockets).
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let kubelet_now = file_identity(&socket.kubelet_socket());
            if kubelet_now.is_some() && kubelet_now != registered_kubelet {
                tracing::info!("kubelet.sock was re-created: registering again");
                break;
            }
            if file_identity(&socket.path()).is_none() {
                tracing::info!("the plugin socket was removed: serving and registering again");
                break;
            }
            if server.0.is_finished() {
                tracing::warn!("the gRPC server stopped: serving and registering again");
                break;
            }
        }
        // Graceful shutdown would wait for every open ListAndWatch stream, which never ends by
        // itself: give requests in flight a moment, then drop the old server (aborting it).
        let _ = stop.send(());
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut server.0).await;
    }
}

/// The running gRPC server; stopped with the agent, whichever way the agent's future ends.
struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn start_server(
    plugin: GpuPlugin,
    socket: &PluginSocket,
    stopped: tokio::sync::oneshot::Receiver<()>,
) -> Result<ServerTask, RegistrationError> {
    let path = socket.path();
    let serve_error = |source| RegistrationError::Serve { path: path.clone(), source };
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale plugin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(serve_error(e)),
    }
    let listener = UnixListener::bind(&path).map_err(serve_error)?;
    let server = ServerTask(tokio::spawn(async move {
        let result = Server::builder()
            .add_service(DevicePluginServer::new(plugin))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "device-plugin gRPC server failed");
        }
    }));
    confirm_ready(&path).await?;
    Ok(server)
}

/// Dials our own socket and asks for the options, as the kubelet will.
async fn confirm_ready(path: &Path) -> Result<(), RegistrationError> {
    let not_ready =
        |message: String| RegistrationError::NotReady { path: path.to_owned(), message };
    let channel = tokio::time::timeout(Duration::from_secs(5), connect(path))
        .await
        .map_err(|_| not_ready("no answer within 5s".into()))?
        .map_err(|e| not_ready(e.to_string()))?;
    DevicePluginClient::new(channel)
        .get_device_plugin_options(crate::api::Empty {})
        .await
        .map_err(|e| not_ready(e.to_string()))?;
    Ok(())
}

/// Registers, retrying until the kubelet accepts; the identity of the kubelet socket that did.
async fn register_when_possible(socket: &PluginSocket) -> Option<(u64, u64, i64)> {
    let mut delay = Duration::from_millis(200);
    loop {
        let identity = file_identity(&socket.kubelet_socket());
        match register(socket).await {
            Ok(()) => return identity,
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "registration failed"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

pub async fn register(socket: &PluginSocket) -> Result<(), RegistrationError> {
    let kubelet = socket.kubelet_socket();
    let failed = |message: String| RegistrationError::Register {
        resource: socket.resource_name.clone(),
        path: kubelet.clone(),
        message,
    };
    let channel = connect(&kubelet).await.map_err(|e| failed(e.to_string()))?;
    RegistrationClient::new(channel)
        .register(RegisterRequest {
            version: API_VERSION.into(),
            endpoint: socket.endpoint(),
            resource_name: socket.resource_name.clone(),
            options: Some(options()),
        })
        .await
        .map_err(|e| failed(e.message().to_owned()))?;
    Ok(())
}
