//! The agent's cache of forwarded answers (`causeway_agent::dns::cache`) on arbitrary
//! bytes: the first byte is the query's length, then the query, then the upstream's
//! answer. Parsing the query, storing the answer and serving it never panic; what is
//! served carries the query's ID and fits the size asked for.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use causeway_agent::dns::cache::{Cache, Limits, QueryInfo};
use libfuzzer_sys::fuzz_target;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| {
        Cache::new(Limits {
            max_entries: 1000,
            max_bytes: 1 << 20,
            max_ttl: Duration::from_secs(86_400),
            max_negative_ttl: Duration::from_secs(3600),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (query, resp) = rest.split_at(usize::from(n).min(rest.len()));
    let Some(info) = QueryInfo::parse(query) else {
        return;
    };
    let c = cache();
    let now = Instant::now();
    c.insert(c.generation(), &info, query, resp, now);
    let mut out = Vec::new();
    if c.lookup(&info, query, now, info.udp_limit, &mut out) {
        assert_eq!(out[..2], query[..2], "the query's ID");
        assert!(out.len() <= info.udp_limit);
    }
});
