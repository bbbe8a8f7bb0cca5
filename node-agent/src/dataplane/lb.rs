//! Endpoint choice: power of two choices on outstanding connections, same zone first,
//! passive ejection of endpoints whose connects fail (exponential backoff), recovery
//! when the ejection ends or a connect succeeds.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Default)]
struct Stat {
    outstanding: usize,
    failures: u32,
    ejected_until: Option<Instant>,
    /// Consecutive 5xx answers (outlier detection).
    errors_5xx: u32,
    /// Consecutive 502/503/504 answers.
    errors_gateway: u32,
    /// How often outlier detection ejected it.
    ejections: u32,
    /// Ejected by outlier detection until then (a successful connect does not end it).
    outlier_until: Option<Instant>,
}

/// A DestinationRule's `outlierDetection`, as the balancer applies it (Envoy's
/// consecutive-errors detection, evaluated on every answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// Eject after this many 5xx answers in a row (0: off).
    pub consecutive_5xx: u32,
    /// Eject after this many 502/503/504 answers in a row (0: off).
    pub consecutive_gateway: u32,
    /// Ejection time, times the number of ejections so far (at most 300 s, Envoy's cap).
    pub base_ejection: Duration,
    /// No ejection when this share (percent) of the destination's endpoints is ejected.
    pub max_ejection_percent: u32,
}

/// The file in the state dir where the running agent keeps its outlier ejections for
/// `causeway-agent status` (rewritten every second while there are any).
pub const OUTLIERS_FILE: &str = "outliers.json";

/// What [`OUTLIERS_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutlierReport {
    /// Unix milliseconds of the report.
    pub at_unix_ms: u64,
    /// The endpoints ejected then.
    pub ejected: Vec<Ejected>,
}

impl Balancer {
    /// Keeps [`OUTLIERS_FILE`] in `dir` up to date (once a second while there are
    /// ejections, and once when the last one ends) until the task is dropped.
    pub async fn report_outliers(self: Arc<Self>, dir: std::path::PathBuf) {
        let file = dir.join(OUTLIERS_FILE);
        let mut had = false;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let ejected = self.ejected();
            crate::metrics::agent()
                .outlier_ejections_active
                .set(i64::try_from(ejected.len()).unwrap_or(i64::MAX));
            if ejected.is_empty() && !had {
                continue;
            }
            had = !ejected.is_empty();
            let report = OutlierReport {
                at_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
                    .unwrap_or(0),
                ejected,
            };
            let (file, tmp) = (file.clone(), file.with_extension("json.tmp"));
            let _ = tokio::task::spawn_blocking(move || {
                let bytes = serde_json::to_vec(&report).unwrap_or_default();
                std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &file))
            })
            .await;
        }
    }
}

/// An endpoint ejected by outlier detection, for `causeway-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ejected {
    /// `namespace/service/endpoint id`.
    pub endpoint: String,
    /// Milliseconds left.
    pub remaining_ms: u64,
    /// How often it was ejected.
    pub ejections: u32,
}

/// Per-endpoint counters shared by every outbound connection.
#[derive(Debug)]
pub struct Balancer {
    stats: Mutex<HashMap<String, Stat>>,
    eject_base: Duration,
    eject_max: Duration,
}

/// One endpoint to choose from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Stable key (`service/endpoint id`).
    pub key: String,
    /// Its zone.
    pub zone: Option<String>,
    /// Its locality priority (0 best; [`super::locality`]): only the best priority with
    /// an eligible endpoint is chosen from.
    pub priority: u32,
}

/// How [`Balancer::pick_by`] chooses among the eligible endpoints (a DestinationRule's
/// `loadBalancer`).
#[derive(Debug, Clone, Copy)]
pub enum Choice<'a> {
    /// Two random choices, the one with fewer outstanding connections (the default;
    /// `LEAST_REQUEST`).
    LeastRequest,
    /// Uniformly at random (`RANDOM`).
    Random,
    /// In turn, with the destination's own counter (`ROUND_ROBIN`).
    RoundRobin(&'a AtomicUsize),
    /// Rendezvous hashing of this key with each endpoint's (`consistentHash`): the same
    /// key goes to the same endpoint while it is eligible, and only the keys of an
    /// endpoint that leaves move.
    Hash(u64),
}

/// Counts a connection as outstanding until dropped.
#[derive(Debug)]
pub struct Outstanding {
    lb: Arc<Balancer>,
    key: String,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut s = self.lb.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = s.get_mut(&self.key) {
            st.outstanding = st.outstanding.saturating_sub(1);
        }
    }
}

/// A random number (seeded per call by the standard library's hasher keys).
pub(crate) fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl Balancer {
    /// A balancer ejecting for `eject_base`, doubling per consecutive failure up to `eject_max`.
    pub fn new(eject_base: Duration, eject_max: Duration) -> Arc<Self> {
        Arc::new(Self {
            stats: Mutex::new(HashMap::new()),
            eject_base,
            eject_max,
        })
    }

    /// Chooses among `cands` (minus `tried`), preferring `zone`; `None` if none is left.
    /// If every remaining endpoint is ejected, all of them are eligible again (failing
    /// open beats refusing every connection).
    pub fn pick(&self, cands: &[Candidate], zone: Option<&str>, tried: &[String]) -> Option<usize> {
        self.pick_with(cands, zone, tried, Instant::now(), random)
    }

    /// [`Balancer::pick`] with another way to choose among the eligible endpoints (the
    /// same health, ejection and zone rules).
    pub fn pick_by(
        &self,
        cands: &[Candidate],
        zone: Option<&str>,
        tried: &[String],
        choice: Choice<'_>,
    ) -> Option<usize> {
        self.pick_choice(cands, zone, tried, Instant::now(), random, choice)
    }

    fn pick_with(
        &self,
        cands: &[Candidate],
        zone: Option<&str>,
        tried: &[String],
        now: Instant,
        rnd: impl FnMut() -> u64,
    ) -> Option<usize> {
        self.pick_choice(cands, zone, tried, now, rnd, Choice::LeastRequest)
    }

    fn pick_choice(
        &self,
        cands: &[Candidate],
        zone: Option<&str>,
        tried: &[String],
        now: Instant,
        mut rnd: impl FnMut() -> u64,
        choice: Choice<'_>,
    ) -> Option<usize> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let left: Vec<usize> = (0..cands.len())
            .filter(|i| !tried.contains(&cands[*i].key))
            .collect();
        let healthy: Vec<usize> = left
            .iter()
            .copied()
            .filter(|i| {
                stats.get(&cands[*i].key).is_none_or(|s| {
                    s.ejected_until.is_none_or(|t| t <= now)
                        && s.outlier_until.is_none_or(|t| t <= now)
                })
            })
            .collect();
        let mut pool = if healthy.is_empty() { left } else { healthy };
        // Locality failover: the best priority level with an eligible endpoint.
        if let Some(best) = pool.iter().map(|i| cands[*i].priority).min() {
            pool.retain(|i| cands[*i].priority == best);
        }
        let local: Vec<usize> = match zone {
            Some(z) => pool
                .iter()
                .copied()
                .filter(|i| cands[*i].zone.as_deref() == Some(z))
                .collect(),
            None => Vec::new(),
        };
        let pool = if local.is_empty() { pool } else { local };
        let n = pool.len();
        match choice {
            _ if n == 0 => return None,
            Choice::Random => return Some(pool[usize::try_from(rnd()).unwrap_or(0) % n]),
            Choice::RoundRobin(next) => {
                return Some(pool[next.fetch_add(1, Ordering::Relaxed) % n]);
            }
            Choice::Hash(key) => {
                return pool.iter().copied().max_by_key(|i| {
                    let mut h = std::hash::DefaultHasher::new();
                    std::hash::Hash::hash(&(key, &cands[*i].key), &mut h);
                    h.finish()
                });
            }
            Choice::LeastRequest => {}
        }
        match n {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let n64 = u64::try_from(n).unwrap_or(u64::MAX);
                let a = usize::try_from(rnd() % n64).unwrap_or(0);
                let mut b = usize::try_from(rnd() % (n64 - 1)).unwrap_or(0);
                if b >= a {
                    b += 1;
                }
                let load = |i: usize| stats.get(&cands[pool[i]].key).map_or(0, |s| s.outstanding);
                Some(if load(b) < load(a) { pool[b] } else { pool[a] })
            }
        }
    }

    /// Marks a connection to `key` as started.
    pub fn start(self: &Arc<Self>, key: &str) -> Outstanding {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.entry(key.to_owned()).or_default().outstanding += 1;
        Outstanding {
            lb: self.clone(),
            key: key.to_owned(),
        }
    }

    /// A connect to `key` failed: eject it for a while.
    pub fn failed(&self, key: &str) {
        self.failed_at(key, Instant::now());
    }

    fn failed_at(&self, key: &str, now: Instant) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let st = s.entry(key.to_owned()).or_default();
        st.failures = st.failures.saturating_add(1);
        // The shared exponential schedule, without jitter: an ejection is a penalty, not a
        // retry that must be spread out (as Envoy's outlier detection).
        let d = causeway_api::backoff::bound(self.eject_base, self.eject_max, st.failures - 1);
        st.ejected_until = Some(now + d);
        tracing::info!(endpoint = key, ejected_for = ?d, "endpoint ejected after a failed connect");
    }

    /// An answer of `key` with `status`, for outlier detection over the endpoints `peers`
    /// (the destination's): enough consecutive errors eject it.
    pub fn observe(&self, key: &str, status: u16, o: &Outlier, peers: &[String]) {
        self.observe_at(key, status, o, peers, Instant::now());
    }

    fn observe_at(&self, key: &str, status: u16, o: &Outlier, peers: &[String], now: Instant) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let ejected = peers
            .iter()
            .filter(|p| {
                s.get(*p)
                    .and_then(|st| st.outlier_until)
                    .is_some_and(|t| t > now)
            })
            .count();
        let st = s.entry(key.to_owned()).or_default();
        if status >= 500 {
            st.errors_5xx += 1;
        } else {
            st.errors_5xx = 0;
        }
        if matches!(status, 502..=504) {
            st.errors_gateway += 1;
        } else {
            st.errors_gateway = 0;
        }
        let tripped = (o.consecutive_5xx > 0 && st.errors_5xx >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && st.errors_gateway >= o.consecutive_gateway);
        if !tripped || st.outlier_until.is_some_and(|t| t > now) {
            return;
        }
        // Envoy's rule: no ejection once the ejected share reaches the maximum.
        let total = peers.len().max(1);
        if ejected * 100 >= total * o.max_ejection_percent as usize {
            return;
        }
        st.errors_5xx = 0;
        st.errors_gateway = 0;
        st.ejections = st.ejections.saturating_add(1);
        crate::metrics::agent().outlier_ejections.inc();
        let d = (o.base_ejection * st.ejections).min(Duration::from_secs(300));
        st.outlier_until = Some(now + d);
        tracing::info!(endpoint = key, ejected_for = ?d, ejections = st.ejections, "endpoint ejected by outlier detection");
    }

    /// The endpoints outlier detection holds ejected now.
    pub fn ejected(&self) -> Vec<Ejected> {
        let now = Instant::now();
        let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Ejected> = s
            .iter()
            .filter_map(|(k, st)| {
                let until = st.outlier_until.filter(|t| *t > now)?;
                Some(Ejected {
                    endpoint: k.clone(),
                    remaining_ms: u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX),
                    ejections: st.ejections,
                })
            })
            .collect();
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        out
    }

    /// A connect to `key` succeeded: it is healthy again.
    pub fn succeeded(&self, key: &str) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = s.get_mut(key) {
            st.failures = 0;
            st.ejected_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(zones: &[Option<&str>]) -> Vec<Candidate> {
        zones
            .iter()
            .enumerate()
            .map(|(i, z)| Candidate {
                key: format!("e{i}"),
                zone: z.map(str::to_owned),
                priority: 0,
            })
            .collect()
    }

    #[tokio::test]
    async fn random_round_robin_and_hash_choices() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let c = cands(&[None, None, None]);
        let next = AtomicUsize::new(0);
        let turns: Vec<_> = (0..6)
            .map(|_| lb.pick_by(&c, None, &[], Choice::RoundRobin(&next)))
            .collect();
        assert_eq!(
            turns,
            [Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]
        );
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[lb.pick_by(&c, None, &[], Choice::Random).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        // The same key, the same endpoint; keys spread; an ejected endpoint's keys move
        // and only those.
        let by_key: Vec<_> = (0..60u64)
            .map(|k| lb.pick_by(&c, None, &[], Choice::Hash(k)).unwrap())
            .collect();
        for (k, i) in by_key.iter().enumerate() {
            let k = u64::try_from(k).unwrap();
            assert_eq!(lb.pick_by(&c, None, &[], Choice::Hash(k)), Some(*i));
        }
        assert!((0..3).all(|e| by_key.contains(&e)), "{by_key:?}");
        lb.failed("e0");
        for (k, i) in by_key.iter().enumerate() {
            let k = u64::try_from(k).unwrap();
            let now = lb.pick_by(&c, None, &[], Choice::Hash(k)).unwrap();
            if *i == 0 {
                assert_ne!(now, 0);
            } else {
                assert_eq!(now, *i);
            }
        }
    }

    #[tokio::test]
    async fn outlier_detection_ejects_after_consecutive_errors_then_returns() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let c = cands(&[None, None, None]);
        let peers: Vec<String> = c.iter().map(|c| c.key.clone()).collect();
        let o = Outlier {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        };
        let t0 = Instant::now();
        let counted = crate::metrics::agent().outlier_ejections.get();
        lb.observe_at("e0", 503, &o, &peers, t0);
        lb.observe_at("e0", 500, &o, &peers, t0);
        lb.observe_at("e0", 200, &o, &peers, t0);
        lb.observe_at("e0", 503, &o, &peers, t0);
        lb.observe_at("e0", 503, &o, &peers, t0);
        assert!(lb.ejected().is_empty(), "a success resets the count");
        lb.observe_at("e0", 503, &o, &peers, t0);
        assert_eq!(lb.ejected().len(), 1);
        assert!(
            crate::metrics::agent().outlier_ejections.get() > counted,
            "the ejection is counted"
        );
        for _ in 0..30 {
            assert_ne!(lb.pick_with(&c, None, &[], t0, random), Some(0));
        }
        // 1 of 3 ejected (33 %) < 50 %: a second may go; then 67 % stops a third.
        for _ in 0..3 {
            lb.observe_at("e1", 500, &o, &peers, t0);
        }
        for _ in 0..3 {
            lb.observe_at("e2", 500, &o, &peers, t0);
        }
        let ejected: Vec<String> = lb.ejected().into_iter().map(|e| e.endpoint).collect();
        assert_eq!(ejected, ["e0", "e1"]);
        // After the ejection time it takes traffic again; a second ejection lasts twice
        // as long.
        let later = t0 + Duration::from_secs(11);
        let picks: Vec<_> = (0..64)
            .map(|_| lb.pick_with(&c, None, &[], later, random))
            .collect();
        assert!(picks.contains(&Some(0)), "{picks:?}");
        for _ in 0..3 {
            lb.observe_at("e0", 500, &o, &peers, later);
        }
        assert_ne!(
            lb.pick_with(
                &c,
                None,
                &["e2".into()],
                later + Duration::from_secs(19),
                random
            ),
            Some(0)
        );
        // A connect success does not end an outlier ejection.
        lb.succeeded("e0");
        assert_ne!(
            lb.pick_with(
                &c,
                None,
                &["e2".into()],
                later + Duration::from_secs(19),
                random
            ),
            Some(0)
        );
    }

    #[tokio::test]
    async fn two_choices_take_the_less_loaded() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let c = cands(&[None, None]);
        let _busy = lb.start("e0");
        let mut seq = [0u64, 0].into_iter();
        // a = 0, b = 1: e1 has fewer outstanding connections.
        assert_eq!(
            lb.pick_with(&c, None, &[], Instant::now(), || seq.next().unwrap()),
            Some(1)
        );
        drop(_busy);
        let mut seq = [0u64, 0].into_iter();
        assert_eq!(
            lb.pick_with(&c, None, &[], Instant::now(), || seq.next().unwrap()),
            Some(0),
            "ties go to the first choice"
        );
    }

    #[tokio::test]
    async fn same_zone_first_and_tried_skipped() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let c = cands(&[Some("a"), Some("b"), Some("b")]);
        for _ in 0..20 {
            assert_eq!(lb.pick(&c, Some("a"), &[]), Some(0));
            assert_ne!(lb.pick(&c, Some("a"), &["e0".into()]), Some(0));
        }
        assert_eq!(
            lb.pick(&c, None, &["e0".into(), "e1".into(), "e2".into()]),
            None
        );
    }

    /// Locality failover: the best priority takes everything while one of its
    /// endpoints is eligible; when they are all ejected (outlier detection) the next
    /// level does; when they return, traffic comes back.
    #[tokio::test]
    async fn the_best_priority_level_with_an_eligible_endpoint_is_chosen() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let mut c = cands(&[None, None, None, None]);
        for (cand, p) in c.iter_mut().zip([0, 0, 1, 2]) {
            cand.priority = p;
        }
        let peers: Vec<String> = c.iter().map(|c| c.key.clone()).collect();
        let o = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 100,
        };
        let t0 = Instant::now();
        let picks = |at: Instant| -> std::collections::BTreeSet<usize> {
            (0..64)
                .map(|_| lb.pick_with(&c, None, &[], at, random).unwrap())
                .collect()
        };
        assert_eq!(picks(t0), [0, 1].into());
        lb.observe_at("e0", 503, &o, &peers, t0);
        assert_eq!(picks(t0), [1].into(), "one of level 0 left");
        lb.observe_at("e1", 503, &o, &peers, t0);
        assert_eq!(picks(t0), [2].into(), "level 0 ejected: level 1");
        lb.observe_at("e2", 503, &o, &peers, t0);
        assert_eq!(picks(t0), [3].into());
        // Everything left is ejected: fail open, to the best level.
        assert!(matches!(
            lb.pick_with(&c, None, &["e3".into()], t0, random),
            Some(0 | 1)
        ));
        // Back after the ejection.
        assert_eq!(picks(t0 + Duration::from_secs(11)), [0, 1].into());
    }

    #[tokio::test]
    async fn ejection_backs_off_and_recovers() {
        let lb = Balancer::new(Duration::from_secs(5), Duration::from_secs(60));
        let c = cands(&[None, None]);
        let t0 = Instant::now();
        lb.failed_at("e0", t0);
        for _ in 0..20 {
            assert_eq!(lb.pick_with(&c, None, &[], t0, random), Some(1));
        }
        // After the ejection it is eligible again.
        let later = t0 + Duration::from_secs(6);
        let picks: Vec<_> = (0..64)
            .map(|_| lb.pick_with(&c, None, &[], later, random))
            .collect();
        assert!(picks.contains(&Some(0)), "{picks:?}");
        // A second failure doubles the ejection; success clears it.
        lb.failed_at("e0", later);
        assert_eq!(
            lb.pick_with(&c, None, &[], later + Duration::from_secs(9), random),
            Some(1)
        );
        lb.succeeded("e0");
        // All ejected: fail open.
        lb.failed_at("e0", t0);
        lb.failed_at("e1", t0);
        assert!(lb.pick_with(&c, None, &[], t0, random).is_some());
    }
}
