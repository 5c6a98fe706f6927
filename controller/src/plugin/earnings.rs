//! `earnings`: a supplier's earnings ([`crate::settlement::earnings`]) as text.

use std::fmt::Write as _;

use gpumarket_crds::Amount;

use crate::settlement::earnings::{Earnings, Totals};

pub fn render(e: &Earnings) -> String {
    let mut s = String::new();
    let who = e.wallet.as_deref().unwrap_or("every wallet");
    let _ = writeln!(s, "Earnings of {who}:");
    let line = |s: &mut String, name: &str, t: &Totals, extra: &str| {
        let _ = writeln!(
            s,
            "  {name:<24} {:>6} leases {:>10.2} GPU-h  paid {:>14}  pending {:>14}{extra}",
            t.leases,
            t.served_gpu_seconds as f64 / 3600.0,
            Amount::new(t.paid).to_string(),
            Amount::new(t.pending).to_string(),
        );
    };
    // Paid in a token converted at a feed's rate, or in several mints: what reached the wallet
    // in base units of each mint too.
    let tokens: Vec<String> =
        e.total.paid_tokens.iter().map(|(mint, n)| format!("{n} base units of {mint}")).collect();
    let tokens = match e.total.paid_tokens.values().collect::<Vec<_>>()[..] {
        [] => String::new(),
        [only] if *only == e.total.paid => String::new(),
        _ => format!("  ({})", tokens.join(", ")),
    };
    line(&mut s, "total", &e.total, &tokens);
    let _ = writeln!(s, " by GPU model:");
    for (model, t) in &e.by_model {
        line(&mut s, model, t, "");
    }
    let _ = writeln!(s, " by node:");
    for n in &e.nodes {
        let reputation =
            n.reputation.map_or("reputation -".to_owned(), |r| format!("reputation {r}"));
        let uptime =
            n.uptime_permille.map_or(String::new(), |u| format!(", uptime {}.{}%", u / 10, u % 10));
        let extra = format!(
            "  {reputation}{uptime}, stake {}, slashed {}",
            Amount::new(n.stake_bonded),
            Amount::new(n.totals.slashed)
        );
        line(&mut s, &n.node, &n.totals, &extra);
    }
    let _ = writeln!(s, " by day (UTC):");
    for (day, d) in &e.by_day {
        let _ = writeln!(
            s,
            "  {day:<24} {:>10.2} GPU-h  paid {:>14}",
            d.served_gpu_seconds as f64 / 3600.0,
            Amount::new(d.paid).to_string()
        );
    }
    s
}
