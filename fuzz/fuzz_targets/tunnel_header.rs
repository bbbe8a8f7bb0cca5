//! The agent-to-agent tunnel header (`wire::tunnel::Header::decode`, and the prefix-then-
//! name path a stream reader takes) on arbitrary bytes: never panics, never takes more
//! than `MAX_HEADER` bytes, both paths agree, and a decoded header re-encodes to exactly
//! the bytes it was read from.
#![no_main]

use causeway_api::wire::tunnel::{Header, MAX_HEADER, PREFIX_LEN, Prefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = Header::decode(data);
    // The stream reader's path: the fixed prefix, then exactly the name's length.
    let streamed = data
        .get(..PREFIX_LEN)
        .and_then(|p| <[u8; PREFIX_LEN]>::try_from(p).ok())
        .map(Prefix::parse)
        .and_then(Result::ok)
        .and_then(|prefix| {
            data.get(PREFIX_LEN..PREFIX_LEN + prefix.name_len())
                .map(|name| prefix.finish(name))
        });
    if let Ok((header, used)) = &whole {
        assert!(*used <= MAX_HEADER && *used <= data.len());
        assert_eq!(streamed, Some(Ok(header.clone())), "both paths agree");
        let bytes = header.encode().expect("a decoded header encodes");
        assert_eq!(bytes, data[..*used], "decode → encode gives the same bytes");
    } else if let Some(Ok(h)) = streamed {
        panic!("the stream path accepted {h:?} where decode refused: {whole:?}");
    }
});
