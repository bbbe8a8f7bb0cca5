//! The tunnel stream header (its byte encoding is the wire contract between agents):
//! `"CWT" | version (u8, 1) | port (u16, big-endian) | name length (u8, 1..=255) | name`.

use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::TunnelError;

/// Header magic.
pub const MAGIC: &[u8; 3] = b"CWT";

/// Header version written by this build.
pub const VERSION: u8 = 1;

/// Largest header.
pub const MAX_HEADER: usize = 3 + 1 + 2 + 1 + 255;

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Destination service (`namespace/name`).
    pub service: String,
    /// Application port on the peer.
    pub port: u16,
}

impl Header {
    /// Encodes; names longer than 255 bytes are refused.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        let name = self.service.as_bytes();
        let len = u8::try_from(name.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| {
                TunnelError::Header(format!("service name length {} not in 1..=255", name.len()))
            })?;
        let mut v = Vec::with_capacity(7 + name.len());
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        v.extend_from_slice(&self.port.to_be_bytes());
        v.push(len);
        v.extend_from_slice(name);
        Ok(v)
    }

    /// Reads one header from `r`, never more than [`MAX_HEADER`] bytes.
    pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Self, TunnelError> {
        let mut fixed = [0u8; 7];
        r.read_exact(&mut fixed)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        if &fixed[..3] != MAGIC {
            return Err(TunnelError::Header("wrong magic".into()));
        }
        if fixed[3] != VERSION {
            return Err(TunnelError::Header(format!(
                "header version {} is not supported (this agent speaks {VERSION})",
                fixed[3]
            )));
        }
        let port = u16::from_be_bytes([fixed[4], fixed[5]]);
        if port == 0 {
            return Err(TunnelError::Header("port 0".into()));
        }
        let len = usize::from(fixed[6]);
        if len == 0 {
            return Err(TunnelError::Header("empty service name".into()));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        let service = String::from_utf8(name)
            .map_err(|_| TunnelError::Header("service name is not UTF-8".into()))?;
        Ok(Self { service, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_round_trip_and_limits() {
        let h = Header {
            service: "default/web".into(),
            port: 8080,
        };
        let bytes = h.encode().unwrap();
        assert_eq!(&bytes[..4], b"CWT\x01");
        assert_eq!(Header::read(&mut &bytes[..]).await.unwrap(), h);
        assert!(
            Header {
                service: "x".repeat(256),
                port: 1
            }
            .encode()
            .is_err()
        );
        let mut bad = bytes.clone();
        bad[3] = 9;
        let err = Header::read(&mut &bad[..]).await.unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(Header::read(&mut &bytes[..5]).await.is_err());
        let mut zero = bytes.clone();
        zero[4] = 0;
        zero[5] = 0;
        assert!(Header::read(&mut &zero[..]).await.is_err());
    }
}
