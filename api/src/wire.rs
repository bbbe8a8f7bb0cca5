//! Control-protocol messages (protobuf via prost, schemas in `api/proto/`), their
//! framing, and the agent-to-agent tunnel header ([`tunnel`]).
//!
//! Each request runs on its own QUIC bidirectional stream: the client writes one frame
//! holding a [`ClientRequest`] and finishes its side; the server answers with one frame
//! holding a [`ServerResponse`]. A frame is a 4-byte big-endian length followed by that
//! many bytes of protobuf. Unknown fields are skipped by the decoder (protobuf's rule), so
//! newer peers can add fields; an unknown request kind decodes to `kind: None` and is
//! answered with [`ErrorCode::Unsupported`].

/// Largest request frame the controller reads for join and renewal.
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;
/// Largest response frame a client reads.
pub const MAX_RESPONSE_FRAME: usize = 1024 * 1024;

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer than four bytes, or fewer bytes than the length prefix promises.
    #[error("truncated frame: {have} bytes, needed {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The length prefix is above the limit for this stream.
    #[error("frame of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Bytes follow the frame.
    #[error("{0} unexpected bytes after the frame")]
    Trailing(usize),
    /// The payload is not a valid protobuf message of the expected type.
    #[error("malformed message: {0}")]
    Decode(String),
}

/// Encodes a message as one length-prefixed frame.
pub fn encode_frame<M: prost::Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode(&mut out).expect("Vec grows as needed");
    out
}

/// Reads the length prefix of a frame, checking it against `limit`.
pub fn frame_len(prefix: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadFrameError {
    /// The frame itself is bad (truncated, over the limit).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error: {0}")]
    Stream(#[from] std::io::Error),
}

/// Reads into `buf` until it is full; returns how many bytes were read before the end of
/// the stream (all of them unless the stream ended first).
async fn fill(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt as _;
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads one length-prefixed frame body from a stream (the controller's control and push
/// streams, the agent's push stream): `None` at a clean end of stream (before the first
/// byte of a frame); a frame longer than `limit` is refused from its prefix, before its
/// body is read.
pub async fn read_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: usize,
) -> Result<Option<Vec<u8>>, ReadFrameError> {
    let mut prefix = [0u8; 4];
    match fill(r, &mut prefix).await? {
        0 => return Ok(None),
        4 => {}
        n => return Err(FrameError::Truncated { have: n, need: 4 }.into()),
    }
    let len = frame_len(prefix, limit)?;
    let mut body = vec![0u8; len];
    let n = fill(r, &mut body).await?;
    if n < len {
        return Err(FrameError::Truncated {
            have: 4 + n,
            need: 4 + len,
        }
        .into());
    }
    Ok(Some(body))
}

/// Decodes a frame's body (the bytes after the length prefix).
pub fn decode_body<M: prost::Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    M::decode(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Decodes exactly one frame from `buf` (the whole content of a stream).
pub fn decode_frame<M: prost::Message + Default>(
    buf: &[u8],
    limit: usize,
) -> Result<M, FrameError> {
    let prefix: [u8; 4] =
        buf.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(FrameError::Truncated {
                have: buf.len(),
                need: 4,
            })?;
    let len = frame_len(prefix, limit)?;
    let body = &buf[4..];
    if body.len() < len {
        return Err(FrameError::Truncated {
            have: buf.len(),
            need: 4 + len,
        });
    }
    if body.len() > len {
        return Err(FrameError::Trailing(body.len() - len));
    }
    M::decode(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// The control and push messages, generated by prost-build from `api/proto/*.proto`
/// (package `causeway.v1`) and committed; `tests/generated.rs` fails when this file is
/// stale. Use them through their modules: [`crate::wire`] (join, renewal, refusals) and
/// [`crate::push`] (the subscription stream).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod proto {
    include!("wire/causeway.v1.rs");
}

pub mod tunnel;

pub use proto::{
    ClientRequest, ErrorCode, ErrorReply, Issued, JoinRequest, RenewRequest, ServerResponse,
    client_request, server_response,
};

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn frame_round_trip() {
        let req = ClientRequest {
            kind: Some(client_request::Kind::Renew(RenewRequest {
                csr_der: vec![1, 2, 3],
            })),
        };
        let frame = encode_frame(&req);
        assert_eq!(decode_frame::<ClientRequest>(&frame, 1024).unwrap(), req);
    }

    #[test]
    fn frame_errors() {
        let frame = encode_frame(&RenewRequest {
            csr_der: vec![0; 100],
        });
        assert!(matches!(
            decode_frame::<RenewRequest>(&frame, 10),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_frame::<RenewRequest>(&frame[..50], 1024),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame::<RenewRequest>(&frame[..2], 1024),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(
            decode_frame::<RenewRequest>(&long, 1024),
            Err(FrameError::Trailing(1))
        );
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_frame::<ClientRequest>(&garbage, 1024),
            Err(FrameError::Decode(_))
        ));
    }

    /// One stream carrying two frames, then: a clean end, a truncated prefix, a truncated
    /// body, an oversized frame (refused from its prefix).
    #[tokio::test]
    async fn frames_are_read_from_a_stream() {
        let a = encode_frame(&RenewRequest { csr_der: vec![1] });
        let b = encode_frame(&RenewRequest {
            csr_der: vec![2; 300],
        });
        let stream = [a.clone(), b.clone()].concat();
        let mut r = stream.as_slice();
        assert_eq!(read_frame(&mut r, 1024).await.unwrap().unwrap(), a[4..]);
        assert_eq!(read_frame(&mut r, 1024).await.unwrap().unwrap(), b[4..]);
        assert!(read_frame(&mut r, 1024).await.unwrap().is_none());
        let err = read_frame(&mut &b[..2], 1024).await.unwrap_err();
        assert!(matches!(
            err,
            ReadFrameError::Frame(FrameError::Truncated { have: 2, need: 4 })
        ));
        let err = read_frame(&mut &b[..10], 1024).await.unwrap_err();
        assert!(matches!(
            err,
            ReadFrameError::Frame(FrameError::Truncated { have: 10, .. })
        ));
        let err = read_frame(&mut b.as_slice(), 100).await.unwrap_err();
        assert!(matches!(
            err,
            ReadFrameError::Frame(FrameError::TooLarge { limit: 100, .. })
        ));
    }

    #[test]
    fn unknown_fields_and_kinds_are_tolerated() {
        // A future request kind (tag 9) with a payload: decodes to no kind, no error.
        let future = [0x4a, 0x02, 0x08, 0x01];
        let mut frame = (future.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&future);
        let req: ClientRequest = decode_frame(&frame, 1024).unwrap();
        assert_eq!(req.kind, None);
        // An unknown field inside a known message is skipped.
        let mut body = RenewRequest { csr_der: vec![5] }.encode_to_vec();
        body.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
        let decoded = RenewRequest::decode(body.as_slice()).unwrap();
        assert_eq!(decoded.csr_der, vec![5]);
    }
}
