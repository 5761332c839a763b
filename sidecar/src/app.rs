//! The inbound side's HTTP/1.1 connections to its own app: pooled
//! keep-alive connections to one fixed address.
//!
//! hyper-util's pooled client would do, but it is built for many origins:
//! every request hashes its origin for the pool, goes through a connector
//! service and a checkout future. The app is one address, so an idle list
//! does it, at about a tenth of the sidecar's instructions per request
//! less (callgrind).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::idle::{self, IdleList};

/// What a request body to the app must be.
pub(crate) trait AppBody:
    hyper::body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Unpin
    + 'static
{
}

impl<B> AppBody for B where
    B: hyper::body::Body<
            Data = bytes::Bytes,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        > + Send
        + Unpin
        + 'static
{
}

/// How long an idle connection to the app is kept (below the 60 s or more
/// that servers usually keep an idle keep-alive connection, so the app
/// rarely closes one under a request).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept; more are closed as they come back.
const MAX_IDLE: usize = 64;

/// Why a request could not be sent to the app (each names its address).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// No TCP connection.
    #[error("{addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake failed.
    #[error("{addr}: HTTP/1.1: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// A new connection closed before it could take the request.
    #[error("{addr}: the connection closed")]
    Closed { addr: SocketAddr },
    /// Sending the request or reading the response head failed.
    #[error("{0}")]
    Send(#[source] hyper::Error),
}

/// Pooled HTTP/1.1 connections to the app at one address.
pub(crate) struct AppHttp1<B> {
    addr: SocketAddr,
    idle: Arc<Mutex<IdleList<B, ()>>>,
}

impl<B> Clone for AppHttp1<B> {
    fn clone(&self) -> Self {
        AppHttp1 {
            addr: self.addr,
            idle: self.idle.clone(),
        }
    }
}

impl<B: AppBody> AppHttp1<B> {
    pub(crate) fn new(addr: SocketAddr) -> AppHttp1<B> {
        AppHttp1 {
            addr,
            idle: Arc::new(Mutex::new(IdleList::new(IDLE_TIMEOUT, MAX_IDLE))),
        }
    }

    /// Sends `req` (origin form, with its Host header) over an idle
    /// connection, or a new one. A request an idle connection could not
    /// send (the app had just closed it) goes once more over a new one.
    /// The connection goes back to the pool when its exchange is over; a
    /// protocol switch (101) keeps it for the switched protocol.
    pub(crate) async fn request(&self, req: Request<B>) -> Result<Response<Incoming>, AppError> {
        let mut req = req;
        let mut fresh = false;
        loop {
            let idle = if fresh { None } else { self.take_idle() };
            let mut c = match idle {
                Some(c) => c,
                None => {
                    fresh = true;
                    self.connect().await?
                }
            };
            if c.sender.ready().await.is_err() {
                if fresh {
                    return Err(AppError::Closed { addr: self.addr });
                }
                fresh = true;
                continue;
            }
            match c.sender.try_send_request(req).await {
                Ok(resp) => {
                    let idle = self.idle.clone();
                    idle::when_idle(c, move |c| {
                        if let Ok(mut idle) = idle.lock() {
                            idle.put(c);
                        }
                    });
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        req = unsent;
                        fresh = true;
                    }
                    _ => return Err(AppError::Send(e.into_error())),
                },
            }
        }
    }

    fn take_idle(&self) -> Option<idle::Conn<B, ()>> {
        self.idle.lock().ok()?.take()
    }

    async fn connect(&self) -> Result<idle::Conn<B, ()>, AppError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| AppError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| AppError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "connection to the app ended");
            }
        });
        Ok(idle::Conn::new(sender, ()))
    }

    /// Idle pooled connections.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |i| i.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::net::TcpListener;

    use super::*;

    /// An app that answers each request with the number of its connection,
    /// and closes connection 1 after its first answer.
    async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(n.to_string()),
                            )))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(n != 1)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, conns)
    }

    async fn get(pool: &AppHttp1<Full<Bytes>>, addr: SocketAddr) -> String {
        let req = Request::get("/")
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = pool.request(req).await.unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Waits until `n` connections are idle in `pool`.
    async fn settle(pool: &AppHttp1<Full<Bytes>>, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.idle() != n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} idle connections, not {n}", pool.idle()));
    }

    #[tokio::test]
    async fn reuses_connections_but_not_one_the_app_closes() {
        let (addr, conns) = app().await;
        let pool = AppHttp1::new(addr);
        // Connection 1 answers once and closes: it is not pooled.
        assert_eq!(get(&pool, addr).await, "1");
        assert_eq!(get(&pool, addr).await, "2");
        // Connection 2 stays: the next requests reuse it.
        for _ in 0..5 {
            settle(&pool, 1).await;
            assert_eq!(get(&pool, addr).await, "2");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_app_that_is_down_is_an_error_naming_it() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = AppHttp1::new(addr);
        let req = Request::get("/").body(Full::new(Bytes::new())).unwrap();
        let err = pool.request(req).await.unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}
