//! Per-request cost of JWT validation in the destination agent, with a warm key cache
//! (issue 22, Benchmark).
//!
//! Each request head carries `Authorization: Bearer <token>`; it goes through
//! `causeway_agent::dataplane::http::authz::authenticate`, the function the agent calls for
//! every request on an HTTP port with RequestAuthentications: find the token, peek at it,
//! pick the issuer's rule and the key by `kid` from the agent's `JwksCache`, verify the
//! signature (`jsonwebtoken` with ring), `exp`/`nbf`/`iss`/`aud`, and build the request
//! principal and claims. Tokens are minted by PyJWT (`api/tests/jwt/mint.py`, installed by
//! `scripts/install-deps-jwt.sh`) for ES256, RS256 (2048-bit) and EdDSA; one key set holds
//! the three public keys (inline `jwks`, parsed once and kept: the warm cache; a `jwksUri`
//! set adds one uncontended mutex). Validations are timed one by one (`Instant` before and
//! after); with every key set warm the function never waits, so each is one poll. The
//! floor is the same timing around a no-op future; "no token" is a request head without
//! a token (what every request pays when a RequestAuthentication selects the workload).
//!
//! The "valid" rows verify each time (the agent's cache of verified tokens turned off, as
//! with `[jwt] verified_tokens = 0`); the "cached" rows send the same token again with the
//! cache on (the default), as a keep-alive client does: what a request costs once its token
//! was verified.
//!
//! Usage: `jwt_cost [--iterations N] [--json FILE]` (default 20,000 validations per row).
//! The tokens expire 10 minutes after they are minted: keep a run under that.

use std::future::Future;
use std::process::Command;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_agent::dataplane::http::authz::authenticate;
use causeway_agent::jwks::{JwksCache, JwksOptions};
use causeway_api::policy::JwtRule;
use serde_json::Value;

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "cart";
const ALGORITHMS: [&str; 3] = ["ES256", "RS256", "EdDSA"];

/// Polls `f` once; `None` when it would wait (never, with warm key sets).
fn at_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Times `f` `iterations` times after a warm-up of a tenth of that; `f` says whether its
/// result was the expected one.
fn time(iterations: usize, f: impl Fn() -> bool) -> Result<Stats> {
    for _ in 0..iterations / 10 {
        if !f() {
            bail!("warm-up: unexpected result");
        }
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let ok = std::hint::black_box(f());
        samples.push(t.elapsed().as_nanos() as u64);
        if !ok {
            bail!("unexpected result");
        }
    }
    samples.sort_unstable();
    Ok(Stats {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        mean: samples.iter().sum::<u64>() as f64 / samples.len() as f64,
    })
}

fn mint() -> Result<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/tests/jwt/mint.py");
    let out = Command::new("/usr/bin/python3")
        .args([script, ISSUER, AUDIENCE])
        .output()
        .context("run /usr/bin/python3 (scripts/install-deps-jwt.sh installs it with PyJWT)")?;
    if !out.status.success() {
        bail!(
            "mint.py failed (PyJWT and cryptography come from scripts/install-deps-jwt.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("mint.py prints JSON")
}

fn head(token: Option<&str>) -> Result<http::request::Parts> {
    let mut b = http::Request::builder()
        .method("GET")
        .uri("/api/orders?id=7")
        .header("host", "web.default")
        .header("user-agent", "bench")
        .header("accept", "*/*");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    Ok(b.body(())?.into_parts().0)
}

fn main() -> Result<()> {
    let mut iterations = 20_000usize;
    let mut json_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .context("--iterations needs a number")?
                    .parse()
                    .context("--iterations needs a number")?;
            }
            "--json" => json_out = Some(args.next().context("--json needs a file")?),
            other => {
                bail!("unknown argument {other:?}; usage: jwt_cost [--iterations N] [--json FILE]")
            }
        }
    }
    if iterations < 100 {
        bail!("--iterations must be at least 100 (p99 of fewer samples is meaningless)");
    }
    let minted = mint()?;
    let mut keys: Vec<Value> = Vec::new();
    for alg in ALGORITHMS {
        let set: Value = serde_json::from_str(
            minted[alg]["jwks"]
                .as_str()
                .context("mint.py output without jwks")?,
        )?;
        keys.extend(set["keys"].as_array().cloned().unwrap_or_default());
    }
    let rules = [JwtRule {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        jwks: Some(serde_json::json!({ "keys": keys }).to_string()),
        ..JwtRule::default()
    }];
    let options = JwksOptions {
        refresh_interval: Duration::from_secs(3600),
        unknown_kid_interval: Duration::from_secs(30),
        fetch_timeout: Duration::from_secs(5),
        attempts: 1,
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(1),
    };
    let rules_id = causeway_agent::jwks::rules_id(&rules);
    // Verifies every time: the cost of a verification.
    let cache = JwksCache::new(None, options.clone())?
        .with_verified_tokens(0, causeway_agent::jwks::verified::system_clock());
    // The agent's default: a token seen before is taken from the cache.
    let cached = JwksCache::new(None, options)?;

    let started = Instant::now();
    let floor = time(iterations, || at_once(async { true }) == Some(true))?;
    let empty = head(None)?;
    let no_token = time(iterations, || {
        matches!(
            at_once(authenticate(&rules, rules_id, &cache, &empty)),
            Some(Ok(None))
        )
    })?;
    let mut rows = Vec::new();
    for alg in ALGORITHMS {
        let token = minted[alg]["valid"].as_str().context("no valid token")?;
        let principal = minted[alg]["principal"].as_str().context("no principal")?;
        let h = head(Some(token))?;
        // Once outside the timing, with the reason if it fails.
        match at_once(authenticate(&rules, rules_id, &cache, &h)) {
            Some(Ok(Some((a, _)))) if a.request_principal == principal => {}
            other => bail!("{alg}: the valid token was not accepted: {other:?}"),
        }
        let s = time(iterations, || {
            matches!(
                at_once(authenticate(&rules, rules_id, &cache, &h)),
                Some(Ok(Some(_)))
            )
        })?;
        rows.push((alg, s));
    }
    let mut cached_rows = Vec::new();
    for alg in ALGORITHMS {
        let token = minted[alg]["valid"].as_str().context("no valid token")?;
        let h = head(Some(token))?;
        let s = time(iterations, || {
            matches!(
                at_once(authenticate(&rules, rules_id, &cached, &h)),
                Some(Ok(Some(_)))
            )
        })?;
        cached_rows.push((alg, s));
    }
    let (hits, misses) = cached.verified().stats();
    if misses != ALGORITHMS.len() as u64 {
        bail!("the cached rows verified {misses} times (expected once per algorithm, {hits} hits)");
    }
    let elapsed = started.elapsed();

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "jwt_cost: {iterations} validations per row, warm key cache (3 keys), load average {}",
        load.join(" ")
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10}",
        "request", "p50 ns", "p99 ns", "mean ns"
    );
    let line = |name: &str, s: &Stats| {
        println!(
            "{:<20} {:>10.0} {:>10.0} {:>10.1}",
            name, s.p50, s.p99, s.mean
        );
    };
    line("floor (no-op)", &floor);
    line("no token", &no_token);
    for (alg, s) in &rows {
        line(&format!("valid {alg}"), s);
    }
    for (alg, s) in &cached_rows {
        line(&format!("cached {alg}"), s);
    }
    println!("ran in {:.1} s", elapsed.as_secs_f64());
    if let Some(path) = json_out {
        let mut j = serde_json::json!({
            "iterations": iterations,
            "load_average": load,
            "floor": {"p50_ns": floor.p50, "p99_ns": floor.p99, "mean_ns": floor.mean},
            "no_token": {"p50_ns": no_token.p50, "p99_ns": no_token.p99, "mean_ns": no_token.mean},
        });
        for (alg, s) in &rows {
            j[*alg] = serde_json::json!({"p50_ns": s.p50, "p99_ns": s.p99, "mean_ns": s.mean});
        }
        for (alg, s) in &cached_rows {
            j[format!("{alg}_cached")] =
                serde_json::json!({"p50_ns": s.p50, "p99_ns": s.p99, "mean_ns": s.mean});
        }
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
