//! The agent-to-agent tunnel header: the first bytes of every stream a client agent
//! opens to a peer agent (a QUIC stream on UDP 15008, or a stream of the TCP + TLS
//! fallback), saying which service and port the stream is for.
//!
//! Not protobuf: a fixed binary layout, unchanged since the first release so that agents
//! of every version interoperate (a new layout would take a new `VERSION`, which older
//! agents refuse by name):
//!
//! | bytes | field                                          |
//! |-------|------------------------------------------------|
//! | 3     | magic `CWT`                                    |
//! | 1     | version, 1                                     |
//! | 2     | destination port, big-endian, not 0            |
//! | 1     | length N of the service name, 1..=255          |
//! | N     | service name `namespace/name`, UTF-8           |
//!
//! Decoding never reads more than [`MAX_HEADER`] bytes; the reader first takes the
//! [`PREFIX_LEN`]-byte prefix ([`Prefix::parse`]), then exactly the name's length.

/// Header magic.
pub const MAGIC: &[u8; 3] = b"CWT";
/// Header version written by this build.
pub const VERSION: u8 = 1;
/// Bytes before the service name.
pub const PREFIX_LEN: usize = 3 + 1 + 2 + 1;
/// Largest header.
pub const MAX_HEADER: usize = PREFIX_LEN + 255;

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Destination service (`namespace/name`).
    pub service: String,
    /// Application port on the peer.
    pub port: u16,
}

/// Why a header could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The service name is empty or longer than 255 bytes (encoding).
    #[error("service name length {0} not in 1..=255")]
    NameLength(usize),
    /// Fewer bytes than the header needs.
    #[error("short header: {have} bytes, needed {need}")]
    Short {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a tunnel header.
    #[error("wrong magic")]
    Magic,
    /// A layout this agent does not speak.
    #[error("header version {0} is not supported (this agent speaks {VERSION})")]
    Version(u8),
    /// Port 0.
    #[error("port 0")]
    PortZero,
    /// A zero name length.
    #[error("empty service name")]
    EmptyName,
    /// The name is not UTF-8.
    #[error("service name is not UTF-8")]
    NotUtf8,
}

impl Header {
    /// Encodes; names longer than 255 bytes are refused.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let name = self.service.as_bytes();
        let len = u8::try_from(name.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or(HeaderError::NameLength(name.len()))?;
        let mut v = Vec::with_capacity(PREFIX_LEN + name.len());
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        v.extend_from_slice(&self.port.to_be_bytes());
        v.push(len);
        v.extend_from_slice(name);
        Ok(v)
    }

    /// Decodes one header from the start of `buf`; returns it and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), HeaderError> {
        let fixed: [u8; PREFIX_LEN] = buf
            .get(..PREFIX_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(HeaderError::Short {
                have: buf.len(),
                need: PREFIX_LEN,
            })?;
        let prefix = Prefix::parse(fixed)?;
        let end = PREFIX_LEN + prefix.name_len();
        let name = buf.get(PREFIX_LEN..end).ok_or(HeaderError::Short {
            have: buf.len(),
            need: end,
        })?;
        Ok((prefix.finish(name)?, end))
    }
}

/// The checked fixed part of a header: what a stream reader needs to know how many
/// name bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    port: u16,
    name_len: u8,
}

impl Prefix {
    /// Checks the first [`PREFIX_LEN`] bytes of a header.
    pub fn parse(fixed: [u8; PREFIX_LEN]) -> Result<Self, HeaderError> {
        if &fixed[..3] != MAGIC {
            return Err(HeaderError::Magic);
        }
        if fixed[3] != VERSION {
            return Err(HeaderError::Version(fixed[3]));
        }
        let port = u16::from_be_bytes([fixed[4], fixed[5]]);
        if port == 0 {
            return Err(HeaderError::PortZero);
        }
        if fixed[6] == 0 {
            return Err(HeaderError::EmptyName);
        }
        Ok(Self {
            port,
            name_len: fixed[6],
        })
    }

    /// How many name bytes follow the prefix.
    pub fn name_len(&self) -> usize {
        usize::from(self.name_len)
    }

    /// The header, given the [`Prefix::name_len`] bytes of the name.
    pub fn finish(self, name: &[u8]) -> Result<Header, HeaderError> {
        if name.len() != self.name_len() {
            return Err(HeaderError::Short {
                have: PREFIX_LEN + name.len(),
                need: PREFIX_LEN + self.name_len(),
            });
        }
        let service = std::str::from_utf8(name)
            .map_err(|_| HeaderError::NotUtf8)?
            .to_owned();
        Ok(Header {
            service,
            port: self.port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes every agent since the first release writes and reads.
    #[test]
    fn the_encoding_is_the_first_releases() {
        let h = Header {
            service: "default/web".into(),
            port: 8080,
        };
        let bytes = h.encode().unwrap();
        assert_eq!(bytes, b"CWT\x01\x1f\x90\x0bdefault/web");
        assert_eq!(Header::decode(&bytes).unwrap(), (h.clone(), bytes.len()));
        // Bytes after the header (the application's) are left alone.
        let mut more = bytes.clone();
        more.extend_from_slice(b"GET /");
        assert_eq!(Header::decode(&more).unwrap(), (h, bytes.len()));
    }

    #[test]
    fn bad_headers_are_refused_by_name() {
        let good = Header {
            service: "default/web".into(),
            port: 8080,
        }
        .encode()
        .unwrap();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            Header::decode(&v).unwrap_err()
        };
        assert_eq!(with(0, b'X'), HeaderError::Magic);
        assert_eq!(with(3, 9), HeaderError::Version(9));
        assert!(with(3, 9).to_string().contains("version 9"));
        assert_eq!(with(6, 0), HeaderError::EmptyName);
        let mut zero = good.clone();
        zero[4] = 0;
        zero[5] = 0;
        assert_eq!(Header::decode(&zero).unwrap_err(), HeaderError::PortZero);
        assert!(matches!(
            Header::decode(&good[..5]),
            Err(HeaderError::Short { have: 5, need: 7 })
        ));
        assert!(matches!(
            Header::decode(&good[..9]),
            Err(HeaderError::Short { have: 9, need: 18 })
        ));
        let mut latin1 = good.clone();
        latin1[8] = 0xff;
        assert_eq!(Header::decode(&latin1).unwrap_err(), HeaderError::NotUtf8);
        for len in [0, 256] {
            let h = Header {
                service: "x".repeat(len),
                port: 1,
            };
            assert_eq!(h.encode().unwrap_err(), HeaderError::NameLength(len));
        }
        let longest = Header {
            service: "x".repeat(255),
            port: 1,
        }
        .encode()
        .unwrap();
        assert_eq!(longest.len(), MAX_HEADER);
    }
}
