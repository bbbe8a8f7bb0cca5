//! The client-side protocol sniffer (`causeway_api::protocol::sniff`) on arbitrary first
//! bytes: never panics, and its answer is stable as more bytes arrive — once it says
//! HTTP/1, HTTP/2 or opaque, a longer buffer with the same start says the same.
#![no_main]

use causeway_api::protocol::{Sniffed, sniff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = sniff(data);
    for cut in 0..data.len() {
        let early = sniff(&data[..cut]);
        if early != Sniffed::NeedMore {
            assert_eq!(early, whole, "prefix of {cut} bytes decided {early:?}, whole {whole:?}");
        }
    }
});
