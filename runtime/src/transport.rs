//! gRPC over strait's own rustls configs: an incoming stream of TLS
//! connections for tonic servers (peer certificates reach handlers through
//! `Request::peer_certs`), and channels for tonic clients (connecting
//! lazily, or at once for a caller choosing among addresses).
//!
//! tonic's built-in TLS takes only CA roots; strait needs SPIFFE
//! verification with a swappable bundle, so the TLS layer is ours and tonic
//! sees plain streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to connect (TCP and the TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS server name clients send; identities are checked by SPIFFE ID,
/// not by this name.
pub const SERVER_NAME: &str = "broker.strait.internal";

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow
/// or garbage client never blocks the others), yielding established streams.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let tls = TlsAcceptor::from(config);
    let mut listener = crate::accept::Acceptor::new(listener, "gRPC");
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                c = listener.accept() => c,
                () = tx.closed() => return,
            };
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connecting gRPC channel to `addr` (`host:port`) over TLS with
/// `config` (which carries the verifier and, for mTLS, the client identity).
pub fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, BadAddress> {
    channel_to(addr, SERVER_NAME, config)
}

/// [`channel`] sending `server_name` as the TLS server name (SNI).
pub fn channel_to(
    addr: &str,
    server_name: &'static str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, BadAddress> {
    Ok(endpoint(addr)?.connect_with_connector_lazy(connector(addr, server_name, config)))
}

/// [`channel`], connected before it returns: the TCP connection and the
/// TLS handshake are done (within [`CONNECT_TIMEOUT`]) or the error says
/// why not. For a caller that picks, among several addresses, the first
/// that answers; afterwards the channel reconnects by itself, as a lazy
/// one does.
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, ConnectError> {
    endpoint(addr)?
        .connect_with_connector(connector(addr, SERVER_NAME, config))
        .await
        .map_err(|source| ConnectError::Failed {
            addr: addr.to_string(),
            source,
        })
}

/// The endpoint of `addr`, with strait's timeouts and keepalive.
fn endpoint(addr: &str) -> Result<Endpoint, BadAddress> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| BadAddress {
            addr: addr.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10)))
}

/// A connector doing TLS with `config` to `addr`, sending `server_name`.
fn connector(
    addr: &str,
    server_name: &'static str,
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let connector = TlsConnector::from(config);
    let target = addr.to_string();
    tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(server_name)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })
}

/// An address a channel cannot be made to.
#[derive(Debug, thiserror::Error)]
#[error("bad address {addr:?}: {source}")]
pub struct BadAddress {
    pub addr: String,
    #[source]
    pub source: tonic::transport::Error,
}

/// A channel that could not be connected ([`connect`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Address(#[from] BadAddress),
    /// Said with the causes (tonic's own text is only "transport error").
    #[error("{addr}: {}", causes(source))]
    Failed {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// An error and its causes on one line, each said once.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

/// The peer address of a request, for logs.
pub fn peer_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.remote_addr()
}
