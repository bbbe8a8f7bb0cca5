//! The latency rounds of `dns_perf`: p99 measured at one fixed offered rate for every
//! server of a row, in short interleaved rounds, and the row's p99 ratio taken as the
//! median of the per-round ratios.
//!
//! Why: on a shared 2-vCPU machine one latency run's p99 is set by whatever else was
//! scheduled on the server's core during those seconds (a stall of a few milliseconds
//! covers the top 1 % of a run), so two single runs of the same server differ by 2–5×
//! and a verdict on one pair flips between runs. Rounds of agent and baseline taken
//! back to back (the order reversed every round, so a drift in load favours neither)
//! see the same machine; the median of their ratios is what the two servers differ
//! by, and the range shows how far one round can be off.

/// The median and the range (min, max) of `v` ([`causeway_bench::median_range`]; NaN
/// for all three when no value is finite).
pub(crate) fn median_range(v: &[f64]) -> (f64, f64, f64) {
    causeway_bench::median_range(v).unwrap_or((f64::NAN, f64::NAN, f64::NAN))
}

/// The agent's p99 over the other server's, round by round (rounds both have).
pub(crate) fn ratios(agent: &[f64], other: &[f64]) -> Vec<f64> {
    agent.iter().zip(other).map(|(a, b)| a / b).collect()
}

/// The order of the servers in round `r` (indices into the row's servers): as given in
/// even rounds, reversed in odd ones, so that the agent is first and last alternately
/// and a load that rises or falls during a pair of rounds favours neither side.
pub(crate) fn order(r: usize, servers: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..servers).collect();
    if r % 2 == 1 {
        o.reverse();
    }
    o
}

/// The offered rate of a row's latency rounds: `rate`, but at most half the q/s the
/// slowest of the row's servers reached in its throughput run (rounded down to a
/// hundred, at least 100), so every server is measured well below its capacity — a
/// server run at its limit queues, and its p99 then measures the queue.
pub(crate) fn offered_rate(rate: u64, saturated_qps: &[f64]) -> u64 {
    let slowest = saturated_qps
        .iter()
        .copied()
        .filter(|q| q.is_finite() && *q > 0.0)
        .fold(f64::INFINITY, f64::min);
    if !slowest.is_finite() {
        return rate;
    }
    let half = ((slowest / 2.0) as u64 / 100 * 100).max(100);
    rate.min(half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range_of_odd_even_and_empty_lists() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median_range(&[4.0, 1.0, 3.0, 2.0]), (2.5, 1.0, 4.0));
        assert_eq!(median_range(&[0.5]), (0.5, 0.5, 0.5));
        let (m, lo, hi) = median_range(&[]);
        assert!(m.is_nan() && lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn one_stalled_round_does_not_decide_the_median() {
        // Six rounds at parity and one where the agent's run met a 10 ms stall.
        let agent = [0.30, 0.28, 10.0, 0.31, 0.29, 0.30, 0.27];
        let other = [0.32, 0.30, 0.31, 0.33, 0.30, 0.31, 0.29];
        let r = ratios(&agent, &other);
        assert_eq!(r.len(), 7);
        let (m, lo, hi) = median_range(&r);
        assert!(m < 1.0, "median {m}");
        assert!(lo < 1.0 && hi > 30.0, "range {lo}–{hi}");
    }

    #[test]
    fn ratios_pair_rounds_by_index_and_stop_at_the_shorter() {
        assert_eq!(ratios(&[1.0, 4.0, 9.0], &[2.0, 2.0]), vec![0.5, 2.0]);
    }

    #[test]
    fn the_order_alternates_every_round() {
        assert_eq!(order(0, 2), vec![0, 1]);
        assert_eq!(order(1, 2), vec![1, 0]);
        assert_eq!(order(2, 3), vec![0, 1, 2]);
        assert_eq!(order(3, 3), vec![2, 1, 0]);
    }

    #[test]
    fn the_offered_rate_is_capped_at_half_the_slowest_server() {
        // Both well above: the configured rate.
        assert_eq!(offered_rate(10_000, &[150_000.0, 40_000.0]), 10_000);
        // The slower one sustained 12,345 q/s: at most 6,100.
        assert_eq!(offered_rate(10_000, &[50_000.0, 12_345.0]), 6_100);
        // A failed throughput run (NaN, 0) does not set the rate; nothing measured: as given.
        assert_eq!(offered_rate(10_000, &[f64::NAN, 0.0, 30_000.0]), 10_000);
        assert_eq!(offered_rate(10_000, &[]), 10_000);
        // Never below 100 q/s.
        assert_eq!(offered_rate(10_000, &[50.0]), 100);
    }
}
