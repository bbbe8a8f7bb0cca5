//! `JoinToken::decode` on arbitrary text: never panics; whatever decodes re-encodes to a
//! token that decodes to the same value.
#![no_main]

use causeway_api::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(token) = JoinToken::decode(text) {
        let again = token.encode();
        let back = JoinToken::decode(&again).expect("an encoded token decodes");
        assert_eq!(back, token, "encode → decode must round-trip");
        // The canonical text is stable.
        assert_eq!(back.encode(), again);
    }
});
