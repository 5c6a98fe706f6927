//! The container images `hack/images/build.sh` builds (OCI archives, cached by content).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::tools::Tools;

/// Runs `hack/images/build.sh <image>` (cached: quick when warm); returns the archive's path.
pub fn build(tools: &Tools, image: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/images/build.sh");
    let mut command = Command::new(&script);
    // Where crane is, not on PATH: a changed PATH makes cargo rebuild release dependencies
    // whose build scripts watch it. For the same reason the variables `cargo test` sets for
    // this process stay out of the script's release build (hack/dev.sh warms it beforehand).
    for (name, _) in std::env::vars_os() {
        let set_by_cargo_test = name.to_str().is_some_and(|n| {
            n == "CARGO"
                || n == "LD_LIBRARY_PATH"
                || n == "OUT_DIR"
                || (n.starts_with("CARGO_") && n != "CARGO_TARGET_DIR" && n != "CARGO_HOME")
        });
        if set_by_cargo_test {
            command.env_remove(name);
        }
    }
    let output = command
        .arg(image)
        .env("GPUMARKET_TOOLS_BIN", &tools.bin)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "hack/images/build.sh {image} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let archive = match lines[..] {
        [line] => line.strip_prefix(&format!("{image}=")),
        _ => None,
    };
    let archive =
        archive.with_context(|| format!("expected one line {image}=<archive>, got {stdout:?}"))?;
    Ok(PathBuf::from(archive))
}
