//! Settlement on Solana (work in progress).
