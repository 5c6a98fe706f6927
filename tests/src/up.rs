//! `gpumarket-env up` run as a user runs it, for the tests of the environment's own binary:
//! its output in `<scratch>/up.log`, its environment in `<scratch>/env`.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::eventually;

pub struct Up {
    child: Child,
    log: PathBuf,
}

impl Up {
    /// Start `binary` (`env!("CARGO_BIN_EXE_gpumarket-env")`) as `up <args> --dir <scratch>/env`.
    pub fn start(binary: &str, scratch: &Path, args: &[&str]) -> Result<Up> {
        let log = scratch.join("up.log");
        let out = std::fs::File::create(&log).context("creating up.log")?;
        let child = std::process::Command::new(binary)
            .arg("up")
            .args(args)
            .arg("--dir")
            .arg(scratch.join("env"))
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting gpumarket-env up")?;
        Ok(Up { child, log })
    }

    /// What `up` has printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `ready` gives a value; a panic with the output if `up` exits first.
    pub async fn until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn() -> Option<T>,
    ) -> T {
        eventually(what, timeout, || {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                panic!("up exited early ({status}):\n{}", self.output());
            }
            std::future::ready(ready())
        })
        .await
    }

    /// SIGTERM, as Ctrl-C would; an error unless `up` stops cleanly within a minute.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status()?;
        let status = eventually("up to stop", Duration::from_secs(60), || {
            std::future::ready(self.child.try_wait().ok().flatten())
        })
        .await;
        ensure!(status.success(), "up exited with {status}");
        Ok(())
    }
}
