//! Network values in config files (`"240.240.0.0/16"`, `"127.0.0.1:15080"`), for
//! `#[serde(deserialize_with = "causeway_api::netvalue::deserialize")]`: an error names
//! the value and the accepted form instead of only "invalid IP address syntax".

use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A network value parsed from text, with the form it accepts.
pub trait NetValue: FromStr {
    /// What a valid value looks like, for error messages.
    const FORM: &'static str;
}

impl NetValue for ipnet::Ipv4Net {
    const FORM: &'static str =
        "an IPv4 network ADDRESS/PREFIX with a prefix length from 0 to 32, e.g. \"240.240.0.0/16\"";
}
impl NetValue for ipnet::IpNet {
    const FORM: &'static str = "a network ADDRESS/PREFIX (prefix length up to 32 for IPv4, 128 for IPv6), e.g. \"10.0.0.0/8\"";
}
impl NetValue for std::net::SocketAddr {
    const FORM: &'static str =
        "an address and port IP:PORT, e.g. \"127.0.0.1:15080\" or \"[::1]:15080\"";
}
impl NetValue for std::net::IpAddr {
    const FORM: &'static str = "an IP address, e.g. \"10.0.0.5\" or \"fd00::5\"";
}

/// Deserializes `T` from text; the error names the value and the accepted form.
pub fn deserialize<'de, D: Deserializer<'de>, T: NetValue>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// Parses `T`, or says what was wrong with `text` and what is accepted.
pub fn parse<T: NetValue>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not valid here: expected {}", T::FORM))
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[serde(deserialize_with = "super::deserialize")]
        range: ipnet::Ipv4Net,
        #[serde(deserialize_with = "super::deserialize")]
        listen: std::net::SocketAddr,
    }

    #[test]
    fn parses_and_names_the_value_and_the_form() {
        let t: T =
            serde_json::from_str(r#"{"range":"10.0.0.0/24","listen":"127.0.0.1:1"}"#).unwrap();
        assert_eq!(t.range.prefix_len(), 24);
        assert_eq!(t.listen.port(), 1);
        let err = serde_json::from_str::<T>(r#"{"range":"10.0.0.0/33","listen":"127.0.0.1:1"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");
        assert!(err.contains("prefix length from 0 to 32"), "{err}");
        let err = serde_json::from_str::<T>(r#"{"range":"10.0.0.0/8","listen":"localhost"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"localhost\"") && err.contains("IP:PORT"),
            "{err}"
        );
    }
}
