//! HTTP/1.1 pieces of the data-plane benchmark's HTTP mode: the server app, the keep-alive
//! load generator, a one-request probe, and the ES256 key set and token of the
//! RequestAuthentication path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The server app's answer to every request.
const BODY: &[u8] = b"{\"ok\":true,\"from\":\"causeway bench app\"}\n";
/// Requests each connection sends before it measures (pooled tunnel connections, caches).
const WARMUP: usize = 50;

/// The server app: answers every request on every one of `ports` with 200 and a small
/// JSON body, HTTP/1.1 with keep-alive. Runs until killed.
pub async fn serve(ports: &[u16]) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for &port in ports {
        let l = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("bind 0.0.0.0:{port}"))?;
        set.spawn(accept_loop(l));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

async fn accept_loop(l: tokio::net::TcpListener) -> anyhow::Result<()> {
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                hyper::Response::builder()
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(BODY)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// What one load run sends: the path, the Host header and the bearer token if any.
#[derive(Clone, Debug)]
pub struct Target {
    /// Where to connect (the service VIP, the server, or a local proxy).
    pub addr: SocketAddr,
    /// Host header (the mesh service's name, which VirtualService routing matches).
    pub host: String,
    /// Request path.
    pub path: String,
    /// `Authorization: Bearer` token.
    pub token: Option<String>,
}

impl Target {
    fn request(&self) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
        let mut b = hyper::Request::get(self.path.as_str())
            .header(hyper::header::HOST, self.host.as_str())
            .header(hyper::header::USER_AGENT, "causeway-bench");
        if let Some(t) = &self.token {
            b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        Ok(b.body(Empty::new())?)
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(t: &Target) -> anyhow::Result<Sender> {
    let s = tokio::net::TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// One request; its status and time in µs.
async fn one(send: &mut Sender, t: &Target) -> anyhow::Result<(u16, f64)> {
    send.ready().await?;
    let t0 = Instant::now();
    let resp = send.send_request(t.request()?).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok((status, t0.elapsed().as_secs_f64() * 1e6))
}

/// One connection's share of a load run.
#[derive(Default)]
struct Tally {
    samples: Vec<f64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    connects: u64,
}

/// Keep-alive load: `conns` connections, each sending its next request as soon as the
/// answer to the last one is read, for `secs` after a warm-up; a connection that fails is
/// counted and opened again. Returns requests/s, the count per status, and the latency of
/// every request (p50 … p99.9) as JSON.
pub async fn load(t: &Target, secs: u64, conns: usize) -> anyhow::Result<Value> {
    // Warm-up, not counted: every connection, before the clock starts.
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = connect(t).await?;
        for _ in 0..WARMUP {
            one(&mut s, t).await?;
        }
        senders.push(s);
    }
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for s in senders {
        let t = t.clone();
        set.spawn(async move {
            let mut tally = Tally::default();
            let mut send = Some(s);
            while Instant::now() < stop {
                if send.is_none() {
                    tally.connects += 1;
                    match connect(&t).await {
                        Ok(s) => send = Some(s),
                        Err(_) => {
                            tally.errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let Some(s) = send.as_mut() else { continue };
                match one(s, &t).await {
                    Ok((status, us)) => {
                        *tally.statuses.entry(status).or_default() += 1;
                        tally.samples.push(us);
                    }
                    Err(_) => {
                        tally.errors += 1;
                        send = None;
                    }
                }
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(r) = set.join_next().await {
        let t = r?;
        all.samples.extend(t.samples);
        for (k, v) in t.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
        all.errors += t.errors;
        all.connects += t.connects;
    }
    let wall = start.elapsed().as_secs_f64();
    let mut s = all.samples;
    s.sort_by(f64::total_cmp);
    let ok = all.statuses.get(&200).copied().unwrap_or(0);
    let p = |q: f64| crate::percentile(&s, q);
    Ok(json!({
        "requests": s.len(),
        "ok_200": ok,
        "statuses": all.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "errors": all.errors,
        "reconnects": all.connects,
        "connections": conns,
        "wall_s": wall,
        "req_s": s.len() as f64 / wall,
        "ok_req_s": ok as f64 / wall,
        "p50_us": p(0.50),
        "p90_us": p(0.90),
        "p99_us": p(0.99),
        "p999_us": p(0.999),
        "max_us": s.last().copied().unwrap_or(f64::NAN),
    }))
}

/// One request on a new connection: its status.
pub async fn probe(t: &Target) -> anyhow::Result<u16> {
    let mut s = connect(t).await?;
    Ok(tokio::time::timeout(Duration::from_secs(5), one(&mut s, t))
        .await
        .context("no answer within 5 s")??
        .0)
}

/// An inline JSON Web Key Set with one P-256 key and a token signed by it.
pub struct Es256 {
    /// The key set, as the JSON string a RequestAuthentication's inline `jwks` takes.
    pub jwks: String,
    /// A token (ES256, key id `bench`) of `issuer` for `audience`, with a `team` claim of
    /// `bench`, valid for a day.
    pub token: String,
}

/// A fresh P-256 key (ring) and an ES256 token of `issuer` signed with it (jsonwebtoken).
pub fn es256(issuer: &str, audience: &str, subject: &str) -> anyhow::Result<Es256> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("generating a P-256 key failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("reading the generated P-256 key failed"))?;
    // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
    let point = pair.public_key().as_ref();
    anyhow::ensure!(point.len() == 65, "unexpected P-256 public key length");
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "bench",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]});
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = json!({
        "iss": issuer, "aud": audience, "sub": subject,
        "iat": now, "nbf": now, "exp": now + 86_400,
        "team": "bench",
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("bench".to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )?;
    Ok(Es256 {
        jwks: jwks.to_string(),
        token,
    })
}
