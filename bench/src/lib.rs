//! Code shared by the benchmark programs: the percentile of the latency tables and the
//! HTTP/1.1 pieces of the data-plane benchmark's HTTP mode (`DATAPLANE_HTTP=1`): a small
//! server app, a keep-alive load generator and the ES256 key and token the
//! RequestAuthentication path needs; the AuthorizationPolicy set of the issue-19 benchmarks;
//! the simulated agents of the push benchmarks (`push_sim`).

pub mod http;
pub mod policy_set;
pub mod push_sim;

/// The `p`-quantile (0–1) of sorted samples, nearest rank; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
