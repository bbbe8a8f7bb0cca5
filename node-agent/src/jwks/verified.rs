//! The cache of verified tokens: a token whose signature, issuer, audience and times were
//! checked once is not checked again on each request (an ES256 signature costs ~60 µs, a
//! keep-alive client sends the same token on every request).
//!
//! What it does: maps SHA-256 of (the identity of the workload's `jwtRules`, the exact token)
//! to the token's verified claims, with the token's `exp` and `nbf` and the generation of the
//! agent's key sets at verification. An entry is used only while the clock is before `exp`
//! and not before `nbf` (the clock-skew allowance of a full verification is not granted
//! here: between `exp` and `exp` + skew every request is verified again), and only while the
//! key-set generation is unchanged: a fetched key set that differs from the last one (a
//! rotation, a removed key) bumps it and empties the cache, and a changed
//! RequestAuthentication (issuer, audiences, key source, any rule) changes the rules'
//! identity, so no entry of the old configuration is found. Bounded by entry count (least
//! recently used entries go first), split into shards each behind its own mutex so requests
//! on different threads rarely wait for each other. Tokens larger than
//! [`MAX_CACHED_TOKEN_BYTES`] are verified every time and not cached (memory bound).
//!
//! What it does not: verify anything itself (the caller does, with [`super::JwksCache`],
//! and inserts the result) or cache refusals (an invalid token is checked again on each
//! request, so a key set fetched since can accept it).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use causeway_api::policy::jwt::Authenticated;

/// The default number of entries (`[jwt] verified_tokens`).
pub const DEFAULT_ENTRIES: usize = 10_000;

/// The largest token that is cached, in bytes (larger ones are verified on each request).
pub const MAX_CACHED_TOKEN_BYTES: usize = 4096;

/// Most shards; fewer when the capacity is smaller, so the bound is exact.
const SHARDS: usize = 16;

/// Seconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock, in seconds since the Unix epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// The cache key of `token` under the rules identified by `rules_id`.
pub type Key = [u8; 32];

/// One verified token.
struct Entry {
    auth: Arc<Authenticated>,
    /// `exp`, when the token has one.
    exp: Option<u64>,
    /// `nbf`, when the token has one.
    nbf: Option<u64>,
    /// The key-set generation it was verified under.
    generation: u64,
}

/// Verified tokens, bounded and sharded (module docs).
pub struct VerifiedTokens {
    shards: Vec<Mutex<lru::LruCache<Key, Entry>>>,
    capacity: usize,
    generation: AtomicU64,
    clock: Clock,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for VerifiedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl VerifiedTokens {
    /// A cache of at most `capacity` tokens (0: nothing is cached) reading time from `clock`.
    pub fn new(capacity: usize, clock: Clock) -> VerifiedTokens {
        let shards = capacity.min(SHARDS);
        let per_shard = capacity.checked_div(shards).unwrap_or(0);
        VerifiedTokens {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(lru::LruCache::new(
                        NonZeroUsize::new(per_shard).unwrap_or(NonZeroUsize::MIN),
                    ))
                })
                .collect(),
            capacity: shards * per_shard,
            generation: AtomicU64::new(0),
            clock,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The key of `token` under the rules identified by `rules_id`; `None` when the token is
    /// not cached (too large, or the cache holds nothing).
    pub fn key(&self, rules_id: u64, token: &str) -> Option<Key> {
        if self.shards.is_empty() || token.len() > MAX_CACHED_TOKEN_BYTES {
            return None;
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&rules_id.to_le_bytes());
        ctx.update(token.as_bytes());
        let d = ctx.finish();
        let mut key = [0u8; 32];
        key.copy_from_slice(d.as_ref());
        Some(key)
    }

    fn shard(&self, key: &Key) -> &Mutex<lru::LruCache<Key, Entry>> {
        &self.shards[usize::from(key[0]) % self.shards.len()]
    }

    /// The current key-set generation (read before verifying, handed to [`Self::insert`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Seconds since the Unix epoch, by this cache's clock.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The verified claims of `key`, if cached, of the current generation and within its
    /// times; a stale entry is removed.
    pub fn get(&self, key: &Key) -> Option<Arc<Authenticated>> {
        let now = self.now();
        let generation = self.generation();
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let mut stale = false;
        let out = match shard.get(key) {
            Some(e)
                if e.generation == generation
                    && e.exp.is_none_or(|exp| now < exp)
                    && e.nbf.is_none_or(|nbf| now >= nbf) =>
            {
                Some(e.auth.clone())
            }
            Some(_) => {
                stale = true;
                None
            }
            None => None,
        };
        if stale {
            shard.pop(key);
        }
        drop(shard);
        let counter = if out.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        out
    }

    /// Remembers `auth`, verified under key-set `generation`. Not kept when the key sets
    /// changed since (the generation moved on), or when the token is already past its
    /// `exp` by this cache's clock.
    pub fn insert(&self, key: Key, auth: Arc<Authenticated>, generation: u64) {
        let claim = |k: &str| auth.claims.get(k).and_then(|v| v.as_u64());
        let (exp, nbf) = (claim("exp"), claim("nbf"));
        if exp.is_some_and(|exp| self.now() >= exp) {
            return;
        }
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the shard's lock: a bump after this point empties the shard after
        // the entry is in (`invalidate` takes every shard's lock).
        if self.generation() != generation {
            return;
        }
        shard.put(
            key,
            Entry {
                auth,
                exp,
                nbf,
                generation,
            },
        );
    }

    /// The key sets changed: no entry verified before is used again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for s in &self.shards {
            s.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `(hits, misses)` of [`Self::get`] so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn clock_at(t: &Arc<AtomicU64>) -> Clock {
        let t = t.clone();
        Arc::new(move || t.load(Ordering::SeqCst))
    }

    fn auth(claims: serde_json::Value) -> Arc<Authenticated> {
        Arc::new(causeway_api::policy::jwt::from_claims(claims))
    }

    #[test]
    fn an_entry_is_not_used_at_or_past_exp_nor_before_nbf() {
        let t = Arc::new(AtomicU64::new(1_000));
        let c = VerifiedTokens::new(100, clock_at(&t));
        let k = c.key(1, "token").unwrap();
        c.insert(
            k,
            auth(serde_json::json!({"iss": "i", "sub": "s", "exp": 1_010, "nbf": 990})),
            c.generation(),
        );
        assert!(c.get(&k).is_some());
        t.store(1_009, Ordering::SeqCst);
        assert!(c.get(&k).is_some());
        t.store(1_010, Ordering::SeqCst);
        assert!(c.get(&k).is_none(), "used at exp");
        assert_eq!(c.len(), 0, "the stale entry is dropped");
        // Before nbf.
        t.store(980, Ordering::SeqCst);
        c.insert(
            k,
            auth(serde_json::json!({"exp": 1_010, "nbf": 990})),
            c.generation(),
        );
        assert!(c.get(&k).is_none(), "used before nbf");
        // Already expired: not cached at all.
        t.store(2_000, Ordering::SeqCst);
        c.insert(k, auth(serde_json::json!({"exp": 1_010})), c.generation());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn invalidation_drops_entries_and_refuses_late_inserts() {
        let t = Arc::new(AtomicU64::new(1_000));
        let c = VerifiedTokens::new(100, clock_at(&t));
        let k = c.key(1, "token").unwrap();
        let before = c.generation();
        c.insert(k, auth(serde_json::json!({"exp": 5_000})), before);
        assert!(c.get(&k).is_some());
        c.invalidate();
        assert!(c.get(&k).is_none());
        // A verification that started before the change finishes after it: not kept.
        c.insert(k, auth(serde_json::json!({"exp": 5_000})), before);
        assert!(c.get(&k).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn keys_differ_by_token_and_by_rules() {
        let c = VerifiedTokens::new(100, system_clock());
        assert_ne!(c.key(1, "a"), c.key(1, "b"));
        assert_ne!(c.key(1, "a"), c.key(2, "a"));
        assert_eq!(c.key(1, "a"), c.key(1, "a"));
        assert!(c.key(1, &"x".repeat(MAX_CACHED_TOKEN_BYTES + 1)).is_none());
        assert!(VerifiedTokens::new(0, system_clock()).key(1, "a").is_none());
    }

    #[test]
    fn the_capacity_bound_holds() {
        for cap in [1, 7, 16, 100, 1_000] {
            let c = VerifiedTokens::new(cap, system_clock());
            assert!(c.capacity() <= cap && c.capacity() > 0, "{cap}");
            for i in 0..cap * 3 {
                let k = c.key(7, &format!("token-{i}")).unwrap();
                c.insert(k, auth(serde_json::json!({"sub": i})), c.generation());
                assert!(c.len() <= cap, "{} entries with capacity {cap}", c.len());
            }
            assert!(c.len() <= cap);
            // The most recently inserted is there.
            let last = c.key(7, &format!("token-{}", cap * 3 - 1)).unwrap();
            assert!(c.get(&last).is_some());
        }
    }
}
