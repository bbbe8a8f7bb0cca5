//! The destination agent's side: a stream arriving from the tunnel is served with the same
//! [`Proxy`] as on the client side, forwarding to the local application over TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::client::{Io, Proxy, Upstream, UpstreamConn, UpstreamError};
use super::record::{BoxError, Observer};
use super::{HttpSettings, Side};

/// The local application as an [`Upstream`]: a TCP connection to `addr` per pooled
/// connection. A refused or timed-out connect is [`UpstreamError::Connect`] (503 `UF`).
#[derive(Clone, Debug)]
pub struct LocalApp {
    /// The application's address (usually loopback and the service port).
    pub addr: SocketAddr,
    /// The connect timeout.
    pub connect_timeout: Duration,
}

impl Upstream for LocalApp {
    async fn connect(&self, _endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        let fail = |source| UpstreamError::Connect {
            peer: self.addr.to_string(),
            source,
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
            .map_err(fail)?;
        let _ = stream.set_nodelay(true);
        Ok(UpstreamConn {
            io: Box::new(stream),
            peer: self.addr.to_string(),
            identity: None,
        })
    }
}

/// The inbound proxy for a local application: `settings.side` is set to
/// [`Side::Destination`]. Keep one per application port so connections to the app are
/// pooled across tunnel streams.
pub fn inbound_proxy(
    app: LocalApp,
    mut settings: HttpSettings,
    observer: Arc<dyn Observer>,
) -> Proxy<LocalApp> {
    settings.side = Side::Destination;
    Proxy::new(app, settings, observer)
}

/// Serves one stream from the tunnel with `proxy` (from [`inbound_proxy`]) until it closes.
pub async fn serve_inbound<IO: Io>(proxy: &Proxy<LocalApp>, stream: IO) -> Result<(), BoxError> {
    proxy.serve(stream).await
}
