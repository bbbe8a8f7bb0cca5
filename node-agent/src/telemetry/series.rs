//! A capped set of metric series ([`SeriesMap`]): the cardinality guard of the Istio
//! metrics. Each distinct label set gets its own value until the cap; past it, new label
//! sets share one overflow series and are counted, so a client that makes up label values
//! (response codes, services) cannot grow the agent's memory without bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Series by label set, at most `max` of them plus one overflow series.
#[derive(Debug)]
pub struct SeriesMap<K, V> {
    series: RwLock<HashMap<K, Arc<V>>>,
    max: usize,
    /// Label sets folded into the overflow series (each time one was seen).
    overflowed: AtomicU64,
}

impl<K: Hash + Eq + Clone, V: Default> SeriesMap<K, V> {
    /// A map of at most `max` series (plus the overflow series).
    pub fn new(max: usize) -> Self {
        Self {
            series: RwLock::default(),
            max,
            overflowed: AtomicU64::new(0),
        }
    }

    /// The value of `key`'s series; when the cap is reached and `key` has none, the value
    /// of `overflow()`'s series (made once), and the overflow count grows by one.
    pub fn get(&self, key: K, overflow: impl FnOnce() -> K) -> Arc<V> {
        self.get_flagged(key, overflow).0
    }

    /// [`Self::get`], and whether the value is the overflow series' (`key` was folded).
    pub fn get_flagged(&self, key: K, overflow: impl FnOnce() -> K) -> (Arc<V>, bool) {
        if let Some(v) = self.read().get(&key) {
            return (v.clone(), false);
        }
        let mut map = self.series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get(&key) {
            return (v.clone(), false);
        }
        if map.len() >= self.max {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return (map.entry(overflow()).or_default().clone(), true);
        }
        (map.entry(key).or_default().clone(), false)
    }

    /// How many times a new label set was folded into the overflow series.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// How many series there are (the overflow series included).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there is no series yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every series, for one scrape.
    pub fn snapshot(&self) -> Vec<(K, Arc<V>)> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<K, Arc<V>>> {
        self.series.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 distinct label values (a client making up one per request) leave at most
    /// the cap plus one series; every one past the cap is counted, and the series already
    /// there keep counting as before.
    #[test]
    fn the_cap_holds_under_100k_distinct_label_sets() {
        let map: SeriesMap<Vec<String>, AtomicU64> = SeriesMap::new(1000);
        let overflow = || vec!["overflow".to_owned()];
        for i in 0..100_000u32 {
            map.get(vec![format!("/path/{i}")], overflow)
                .fetch_add(1, Ordering::Relaxed);
        }
        assert_eq!(map.len(), 1001);
        assert_eq!(map.overflowed(), 99_000);
        let folded = map.get(overflow(), overflow);
        assert_eq!(folded.load(Ordering::Relaxed), 99_000);
        // A label set from before the cap still has its own series.
        let old = map.get(vec!["/path/7".to_owned()], overflow);
        old.fetch_add(1, Ordering::Relaxed);
        assert_eq!(old.load(Ordering::Relaxed), 2);
        assert_eq!((map.len(), map.overflowed()), (1001, 99_000));
    }
}
