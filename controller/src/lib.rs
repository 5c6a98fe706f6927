//! gpumarket controller: matches GpuClusters to supplier offers, provisions KubeRay clusters on
//! the matched nodes and settles GPU time on Solana.

pub mod matching;
