//! The tunnel stream header. Its layout, encoding and checks (the wire contract between
//! agents: `"CWT" | version (u8, 1) | port (u16, big-endian) | name length (u8, 1..=255) |
//! name`) live in the wire module, [`causeway_api::wire::tunnel`]; this file reads it from
//! an async stream.

use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::TunnelError;

pub use causeway_api::wire::tunnel::{Header, MAGIC, MAX_HEADER, VERSION};

impl From<causeway_api::wire::tunnel::HeaderError> for TunnelError {
    fn from(e: causeway_api::wire::tunnel::HeaderError) -> Self {
        Self::Header(e.to_string())
    }
}

/// Reads a [`Header`] from a stream.
pub trait ReadHeader {
    /// Reads one header from `r`, never more than [`MAX_HEADER`] bytes.
    fn read(
        r: &mut (impl AsyncRead + Unpin),
    ) -> impl std::future::Future<Output = Result<Header, TunnelError>>;
}

impl ReadHeader for Header {
    async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Header, TunnelError> {
        use causeway_api::wire::tunnel::{PREFIX_LEN, Prefix};
        let mut fixed = [0u8; PREFIX_LEN];
        r.read_exact(&mut fixed)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        let prefix = Prefix::parse(fixed)?;
        let mut name = vec![0u8; prefix.name_len()];
        r.read_exact(&mut name)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        Ok(prefix.finish(&name)?)
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
