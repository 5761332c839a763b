//! `strait lab echo`: the demo workload. Answers every HTTP request (HTTP/1.1
//! or h2c) with a JSON document naming who answered (cluster, service,
//! version, workload), who asked (`peer_identity`: the `URI` of the
//! `x-forwarded-client-cert` header its sidecar added, `null` without one),
//! and the request's protocol, path and headers. A request that asks to
//! switch to WebSocket (`Upgrade: websocket`) gets 101; then that document
//! comes as one line, and every chunk sent after it comes back as it was
//! (a raw echo, no WebSocket framing: enough to see bytes cross).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};

/// Who this echo is.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Address to answer on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Cluster name reported in answers.
    #[arg(long, default_value = "local")]
    pub cluster: String,
    /// Service name reported in answers.
    #[arg(long, default_value = "echo")]
    pub service: String,
    /// Version reported in answers.
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Workload name reported in answers.
    #[arg(long, default_value = "echo")]
    pub workload: String,
}

/// The `URI=` element of an `x-forwarded-client-cert` value (the first
/// element set, i.e. the nearest hop).
pub fn xfcc_uri(xfcc: &str) -> Option<String> {
    let first = xfcc.split(',').next()?;
    first.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("uri")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// The answer to one request.
pub fn answer(
    who: &EchoArgs,
    version: http::Version,
    method: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Value {
    let mut h = Map::new();
    for (k, v) in headers {
        h.insert(
            k.as_str().to_string(),
            Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    }
    let peer = headers
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(xfcc_uri);
    json!({
        "cluster": who.cluster,
        "service": who.service,
        "version": who.version,
        "workload": who.workload,
        "peer_identity": peer,
        "protocol": format!("{version:?}"),
        "method": method,
        "path": path,
        "headers": h,
    })
}

async fn handle(
    who: Arc<EchoArgs>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let doc = answer(
        &who,
        parts.version,
        parts.method.as_str(),
        &path,
        &parts.headers,
    );
    let websocket = strait_sidecar::upgrade_of(parts.version, &parts.headers)
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if websocket && let Some(on) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        tokio::spawn(async move {
            if let Err(e) = echo_switched(on, format!("{doc}\n")).await {
                tracing::debug!(error = %e, "switched connection ended");
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        return Ok(resp);
    }
    // Drain the request body so that the connection can be reused.
    let _ = body.collect().await;
    let mut resp = Response::new(Full::new(Bytes::from(format!("{doc}\n"))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// After a switch: `first`, then every chunk back as it came, until the
/// client closes.
async fn echo_switched(on: hyper::upgrade::OnUpgrade, first: String) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = TokioIo::new(on.await.map_err(std::io::Error::other)?);
    io.write_all(first.as_bytes()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return io.shutdown().await;
        }
        io.write_all(&buf[..n]).await?;
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    args: EchoArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!(
        "echo {}/{} ({}) of cluster {} listening on {}",
        args.service, args.version, args.workload, args.cluster, args.listen
    );
    let who = Arc::new(args);
    tokio::pin!(shutdown);
    let mut listener = strait_runtime::accept::Acceptor::new(listener, "echo");
    loop {
        let (tcp, _) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let who = who.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(who.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn xfcc_uri_takes_the_nearest_hop() {
        let v = "By=spiffe://td/ns/demo/sa/echo;Hash=ab12;URI=spiffe://td/ns/demo/sa/client";
        assert_eq!(
            xfcc_uri(v).as_deref(),
            Some("spiffe://td/ns/demo/sa/client")
        );
        let two = format!("{v},By=x;URI=spiffe://td/ns/other/sa/far");
        assert_eq!(
            xfcc_uri(&two).as_deref(),
            Some("spiffe://td/ns/demo/sa/client")
        );
        assert_eq!(xfcc_uri("By=x;Hash=y"), None);
        assert_eq!(xfcc_uri(""), None);
        assert_eq!(
            xfcc_uri("uri=\"spiffe://a/b\"").as_deref(),
            Some("spiffe://a/b")
        );
    }

    #[test]
    fn answer_names_the_workload_and_the_peer() {
        let who = EchoArgs {
            listen: "127.0.0.1:1".parse().unwrap(),
            cluster: "east".into(),
            service: "echo".into(),
            version: "v1".into(),
            workload: "echo-v1".into(),
        };
        let mut h = http::HeaderMap::new();
        let doc = answer(&who, http::Version::HTTP_11, "GET", "/x", &h);
        assert_eq!(doc["peer_identity"], Value::Null);
        assert_eq!(doc["cluster"], "east");
        h.insert(
            "x-forwarded-client-cert",
            "By=a;Hash=b;URI=spiffe://cluster.local/ns/demo/sa/client"
                .parse()
                .unwrap(),
        );
        let doc = answer(&who, http::Version::HTTP_2, "GET", "/x?y=1", &h);
        assert_eq!(doc["protocol"], "HTTP/2.0");
        assert_eq!(
            doc["peer_identity"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(doc["path"], "/x?y=1");
    }
}
