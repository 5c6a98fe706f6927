//! What several integration tests share and the library crate cannot hold (it would make the
//! environment's binary link the controller): `mod support;` in the test file.

use std::sync::Arc;

use gpumarket_controller::Config;
use gpumarket_controller::settlement::Settler;
use kube::Client;

/// A controller replica running in the test's runtime (settling through `settler` when given);
/// stopped when dropped. A replica that stops on its own fails the test.
pub struct InProcessController(tokio::task::JoinHandle<()>);

impl InProcessController {
    pub fn start(client: &Client, config: Config, settler: Option<Arc<Settler>>) -> Self {
        let client = client.clone();
        InProcessController(tokio::spawn(async move {
            let stopped = match settler {
                Some(settler) => gpumarket_controller::run_settling(client, config, settler).await,
                None => gpumarket_controller::run(client, config).await,
            };
            if let Err(e) = stopped {
                panic!("controller stopped: {e}");
            }
        }))
    }
}

impl Drop for InProcessController {
    fn drop(&mut self) {
        self.0.abort();
    }
}
