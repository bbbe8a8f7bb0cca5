//! Control-protocol messages (protobuf via prost) and their framing.
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

/// A request from an agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientRequest {
    /// What is asked.
    #[prost(oneof = "client_request::Kind", tags = "1, 2, 3")]
    pub kind: Option<client_request::Kind>,
}

/// The kinds of [`ClientRequest`].
pub mod client_request {
    /// What an agent asks.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// First enrollment with a join token (server-authenticated TLS only).
        #[prost(message, tag = "1")]
        Join(super::JoinRequest),
        /// Renewal over mutual TLS with the current certificate.
        #[prost(message, tag = "2")]
        Renew(super::RenewRequest),
        /// Config subscription over mutual TLS; the stream stays open (see `crate::push`).
        #[prost(message, tag = "3")]
        Subscribe(crate::push::Hello),
    }
}

/// Enrollment: the token's id and secret plus a CSR for a key made on the host.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinRequest {
    /// The token's id.
    #[prost(string, tag = "1")]
    pub token_id: String,
    /// The token's secret.
    #[prost(bytes = "vec", tag = "2")]
    pub secret: Vec<u8>,
    /// A PKCS#10 CSR (DER). Every name it asks for is ignored.
    #[prost(bytes = "vec", tag = "3")]
    pub csr_der: Vec<u8>,
    /// The host's name, for operators (informational).
    #[prost(string, tag = "4")]
    pub hostname: String,
}

/// Renewal: a CSR for a fresh key; the caller is identified by its client certificate.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewRequest {
    /// A PKCS#10 CSR (DER).
    #[prost(bytes = "vec", tag = "1")]
    pub csr_der: Vec<u8>,
}

/// The controller's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerResponse {
    /// The outcome.
    #[prost(oneof = "server_response::Kind", tags = "1, 2")]
    pub kind: Option<server_response::Kind>,
}

/// The kinds of [`ServerResponse`].
pub mod server_response {
    /// The outcome of a request.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A certificate was issued.
        #[prost(message, tag = "1")]
        Issued(super::Issued),
        /// The request was refused.
        #[prost(message, tag = "2")]
        Error(super::ErrorReply),
    }
}

/// An issued workload certificate.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Issued {
    /// The agent's id in the controller.
    #[prost(string, tag = "1")]
    pub agent_id: String,
    /// The SPIFFE ID in the certificate.
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    /// The certificate followed by any intermediates (DER each).
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub cert_chain_der: Vec<Vec<u8>>,
    /// The trust bundle: every root agents must trust (DER each).
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub trust_bundle_der: Vec<Vec<u8>>,
    /// Expiry of the certificate, Unix seconds.
    #[prost(int64, tag = "5")]
    pub not_after_unix: i64,
    /// The workload group joined into.
    #[prost(string, tag = "6")]
    pub group: String,
}

/// A refusal with a machine-readable code and a message for people.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorReply {
    /// An [`ErrorCode`].
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    /// What went wrong and what to do.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// Not given or unknown to this version.
    Unspecified = 0,
    /// The request could not be decoded.
    Malformed = 1,
    /// The request is larger than allowed.
    TooLarge = 2,
    /// The token is unknown or its secret is wrong.
    TokenInvalid = 3,
    /// The token has expired.
    TokenExpired = 4,
    /// The token has no uses left.
    TokenSpent = 5,
    /// The caller's address is outside the token's or group's networks.
    SourceNotAllowed = 6,
    /// The CSR could not be parsed, its signature is wrong, or its key type is not supported.
    CsrInvalid = 7,
    /// The renewal came without a client certificate.
    NotAuthenticated = 8,
    /// The agent was removed by an operator.
    AgentRemoved = 9,
    /// The group the token or agent belongs to no longer exists.
    GroupMissing = 10,
    /// The request kind is not supported by this controller.
    Unsupported = 11,
    /// The controller failed; retrying later may help.
    Internal = 12,
}

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
