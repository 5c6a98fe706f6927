//! Writes the CRD YAML generated from the Rust types into `crds/` and, when the chart exists,
//! into `charts/gpumarket/crds/`. Run from anywhere in the workspace.

use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    let mut targets: Vec<PathBuf> = vec![root.join("crds")];
    let chart = root.join("charts/gpumarket");
    if chart.is_dir() {
        targets.push(chart.join("crds"));
    }
    for (name, yaml) in gpumarket_crds::crd_files()? {
        for dir in &targets {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(&name);
            std::fs::write(&path, &yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
