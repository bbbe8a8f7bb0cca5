//! Durations in config files, written as text ("24h", "90s", "1h 30m"), for
//! `#[serde(with = "causeway_api::duration")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Deserializes a duration from text; the error names the value and the expected form.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like \"24h\", \"5m\" or \"90s\""
        ))
    })
}

/// `Option<Duration>` as text, for
/// `#[serde(default, with = "causeway_api::duration::opt", skip_serializing_if = "Option::is_none")]`.
pub mod opt {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Deserializes a present duration (absent fields take the `default`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }

    /// Serializes as text ("5m").
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(with = "super")]
        d: std::time::Duration,
    }

    #[test]
    fn parses_and_names_bad_values() {
        let t: T = serde_json::from_str(r#"{"d":"1h 30m"}"#).unwrap();
        assert_eq!(t.d.as_secs(), 5400);
        let err = serde_json::from_str::<T>(r#"{"d":"soon"}"#).err().unwrap();
        assert!(err.to_string().contains("soon"), "{err}");
    }
}
