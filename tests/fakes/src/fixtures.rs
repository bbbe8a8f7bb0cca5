//! Locating and reading the recorded fixtures.

use std::path::PathBuf;

/// The fixtures folder: `$CAUSEWAY_FIXTURES` if set, else `<repo>/tests/fixtures` (recorded
/// real registry responses, kept in the repository; see its README for provenance).
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAUSEWAY_FIXTURES") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// One recorded `curl -i` response.
#[derive(Clone, Debug)]
pub struct HttpFixture {
    /// Status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpFixture {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `<fixtures>/<rel>` as a recorded HTTP response. Panics with the path and the
/// fix when it is missing: fakes are test support, and a missing fixture is a broken checkout.
pub fn read_http_fixture(rel: &str) -> HttpFixture {
    let text = read_fixture(rel);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpFixture {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Reads a fixture file as text; panics naming the path and the fix when it is missing.
pub(crate) fn read_fixture(rel: &str) -> String {
    let path = fixtures_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e}; the fixtures live in <repo>/tests/fixtures (restore them with `git checkout -- tests/fixtures`), or set CAUSEWAY_FIXTURES to their folder",
            path.display()
        )
    })
}

/// Reads a fixture file as bytes; panics naming the path and the fix when it is missing.
pub fn read_fixture_bytes(rel: &str) -> Vec<u8> {
    let path = fixtures_dir().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e}; the fixtures live in <repo>/tests/fixtures (restore them with `git checkout -- tests/fixtures`), or set CAUSEWAY_FIXTURES to their folder",
            path.display()
        )
    })
}
