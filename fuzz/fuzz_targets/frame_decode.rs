//! `wire::decode_frame` for both directions on arbitrary bytes, with the controller's
//! request limit: never panics; a decoded `ClientRequest` re-encodes to a frame that
//! decodes to the same request.
#![no_main]

use causeway_api::wire::{
    ClientRequest, MAX_REQUEST_FRAME, ServerResponse, decode_frame, encode_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_frame::<ClientRequest>(data, MAX_REQUEST_FRAME) {
        let frame = encode_frame(&req);
        let again = decode_frame::<ClientRequest>(&frame, MAX_REQUEST_FRAME)
            .expect("a re-encoded request decodes again");
        assert_eq!(again, req, "encode → decode must round-trip");
    }
    let _ = decode_frame::<ServerResponse>(data, MAX_REQUEST_FRAME);
});
