//! Join tokens: what `causewayctl token create` prints and `causeway-agent join` takes.
//!
//! Text form: `cwt1.` followed by unpadded base64url of a protobuf `TokenBody`
//! (controller address, SHA-256 fingerprint of the CA to pin, token id, secret).
//! The controller stores only a SHA-256 hash of the secret.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;

/// The prefix of every join token, versioned.
pub const TOKEN_PREFIX: &str = "cwt1.";
/// Longest token text accepted (far above a real token, well below anything harmful).
pub const MAX_TOKEN_LEN: usize = 2048;
/// Length of a token secret in bytes.
pub const SECRET_LEN: usize = 32;

/// Why a join token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The text does not start with the `cwt1.` prefix.
    #[error(
        "not a Causeway join token: it must start with \"{TOKEN_PREFIX}\" (copy the whole output of `causewayctl token create`)"
    )]
    Prefix,
    /// The text is longer than any token this version creates.
    #[error(
        "join token is {0} characters long, more than the {MAX_TOKEN_LEN} allowed: it was probably pasted twice or corrupted"
    )]
    TooLong(usize),
    /// The body is not valid base64url.
    #[error("join token is corrupted (not base64url after the prefix): copy it again")]
    Base64,
    /// The body does not decode.
    #[error("join token is corrupted (its body does not decode): copy it again")]
    Body,
    /// A field is missing or has the wrong length.
    #[error("join token is incomplete: {0}; create a new one with `causewayctl token create`")]
    Field(&'static str),
}

/// The wire form of a token's body.
#[derive(Clone, PartialEq, prost::Message)]
struct TokenBody {
    #[prost(string, tag = "1")]
    controller: String,
    #[prost(bytes = "vec", tag = "2")]
    ca_fingerprint: Vec<u8>,
    #[prost(string, tag = "3")]
    id: String,
    #[prost(bytes = "vec", tag = "4")]
    secret: Vec<u8>,
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Where the agent reaches the controller's control endpoint (`host:port`).
    pub controller: String,
    /// SHA-256 of the DER of the CA certificate the agent must find in the controller's chain.
    pub ca_fingerprint: [u8; 32],
    /// The token's id (public; the key under which the controller keeps it).
    pub id: String,
    /// The secret; only its hash is stored by the controller.
    pub secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("controller", &self.controller)
            .field("ca_fingerprint", &crate::hex(&self.ca_fingerprint))
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// The token as text.
    pub fn encode(&self) -> String {
        let body = TokenBody {
            controller: self.controller.clone(),
            ca_fingerprint: self.ca_fingerprint.to_vec(),
            id: self.id.clone(),
            secret: self.secret.to_vec(),
        };
        format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(body.encode_to_vec())
        )
    }

    /// Reads a token from text (surrounding white space is ignored).
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong(text.len()));
        }
        let b64 = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let raw = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| TokenError::Base64)?;
        let body = TokenBody::decode(raw.as_slice()).map_err(|_| TokenError::Body)?;
        if body.controller.is_empty() {
            return Err(TokenError::Field("no controller address"));
        }
        let ca_fingerprint = body
            .ca_fingerprint
            .try_into()
            .map_err(|_| TokenError::Field("CA fingerprint is not 32 bytes"))?;
        if body.id.is_empty() || body.id.len() > 64 {
            return Err(TokenError::Field("token id is empty or too long"));
        }
        let secret = body
            .secret
            .try_into()
            .map_err(|_| TokenError::Field("secret is not 32 bytes"))?;
        Ok(Self {
            controller: body.controller,
            ca_fingerprint,
            id: body.id,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            controller: "10.0.0.1:15012".into(),
            ca_fingerprint: [7; 32],
            id: "0123456789abcdef".into(),
            secret: [9; 32],
        }
    }

    #[test]
    fn round_trip() {
        let t = token();
        let text = t.encode();
        assert!(text.starts_with("cwt1."));
        assert_eq!(JoinToken::decode(&text).unwrap(), t);
        assert_eq!(JoinToken::decode(&format!("  {text}\n")).unwrap(), t);
    }

    #[test]
    fn debug_hides_secret() {
        let dbg = format!("{:?}", token());
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains("9, 9"));
    }

    #[test]
    fn refuses_bad_tokens() {
        assert_eq!(JoinToken::decode("abc"), Err(TokenError::Prefix));
        assert_eq!(JoinToken::decode("cwt1.!!!"), Err(TokenError::Base64));
        assert_eq!(JoinToken::decode("cwt1.AAAA_w"), Err(TokenError::Body));
        let long = format!("cwt1.{}", "A".repeat(5000));
        assert!(matches!(
            JoinToken::decode(&long),
            Err(TokenError::TooLong(_))
        ));
        // Truncated: valid base64 of a partial body.
        let text = token().encode();
        let truncated = &text[..text.len() - 20];
        assert!(JoinToken::decode(truncated).is_err());
        // Wrong fingerprint length.
        let body = TokenBody {
            controller: "x:1".into(),
            ca_fingerprint: vec![1; 31],
            id: "a".into(),
            secret: vec![0; 32],
        };
        let text = format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(body.encode_to_vec())
        );
        assert!(matches!(
            JoinToken::decode(&text),
            Err(TokenError::Field(_))
        ));
    }
}
