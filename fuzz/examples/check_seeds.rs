//! Checks that the committed seeds are what they claim: the valid token decodes, the
//! P-256 CSRs are accepted and the P-384 one refused, the request frames decode.
//! Run from `fuzz/`: `cargo run --example check_seeds` (stable, no sanitizer).

use causeway_api::JoinToken;
use causeway_api::wire::{
    ClientRequest, MAX_REQUEST_FRAME, ServerResponse, client_request, decode_frame, server_response,
};
use causeway_controller::csr::parse_csr;

fn read(path: &str) -> Vec<u8> {
    let full = format!("{}/seeds/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

fn main() {
    for name in ["valid.txt", "ipv6.txt"] {
        let text = String::from_utf8(read(&format!("token_decode/{name}"))).unwrap();
        let token = JoinToken::decode(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("token_decode/{name}: ok, {token:?}");
    }
    let bad = String::from_utf8(read("token_decode/not-a-token.txt")).unwrap();
    println!(
        "token_decode/not-a-token.txt: refused: {}",
        JoinToken::decode(&bad).unwrap_err()
    );

    for name in ["p256-with-san.der", "p256-bare.der"] {
        let key = parse_csr(&read(&format!("csr_intake/{name}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        println!(
            "csr_intake/{name}: accepted, asked for {:?}",
            key.requested_names
        );
    }
    let refused = parse_csr(&read("csr_intake/p384.der")).unwrap_err();
    println!("csr_intake/p384.der: refused: {refused}");

    let join: ClientRequest =
        decode_frame(&read("frame_decode/join.bin"), MAX_REQUEST_FRAME).unwrap();
    let Some(client_request::Kind::Join(j)) = &join.kind else {
        panic!("join.bin is not a join: {join:?}")
    };
    parse_csr(&j.csr_der).expect("the CSR inside join.bin is accepted");
    println!(
        "frame_decode/join.bin: join for token {} from {}",
        j.token_id, j.hostname
    );
    let renew: ClientRequest =
        decode_frame(&read("frame_decode/renew.bin"), MAX_REQUEST_FRAME).unwrap();
    assert!(
        matches!(renew.kind, Some(client_request::Kind::Renew(_))),
        "{renew:?}"
    );
    println!("frame_decode/renew.bin: renew");
    let unknown: ClientRequest =
        decode_frame(&read("frame_decode/unknown-kind.bin"), MAX_REQUEST_FRAME).unwrap();
    assert_eq!(unknown.kind, None);
    println!("frame_decode/unknown-kind.bin: no kind (future request)");
    let reply: ServerResponse =
        decode_frame(&read("frame_decode/error-reply.bin"), MAX_REQUEST_FRAME).unwrap();
    let Some(server_response::Kind::Error(e)) = &reply.kind else {
        panic!("error-reply.bin is not an error: {reply:?}")
    };
    println!(
        "frame_decode/error-reply.bin: error {} {:?}",
        e.code, e.message
    );
    println!("all seeds are as described");
}
