//! Code shared by the benchmark programs: the percentile of the latency tables, the
//! median and range of per-round figures, and the
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

/// The median and the range (min, max) of the finite values of `v`, which need not be
/// sorted; None when there are none (a round whose figure could not be measured is
/// NaN and is left out).
pub fn median_range(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((med, v[0], v[n - 1]))
}
