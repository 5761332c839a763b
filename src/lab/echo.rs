//! `strait lab echo`: the demo workload. Answers every HTTP request (HTTP/1.1
//! or h2c) with a JSON document naming who answered (cluster, service,
//! version, workload), who asked (`peer_identity`: the `URI` of the
//! `x-forwarded-client-cert` header its sidecar added, `null` without one),
//! and the request's path and headers.

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
pub fn answer(who: &EchoArgs, method: &str, path: &str, headers: &http::HeaderMap) -> Value {
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
        "method": method,
        "path": path,
        "headers": h,
    })
}

async fn handle(
    who: Arc<EchoArgs>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    // Drain the request body so that the connection can be reused.
    let _ = body.collect().await;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let doc = answer(&who, parts.method.as_str(), &path, &parts.headers);
    let mut resp = Response::new(Full::new(Bytes::from(format!("{doc}\n"))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
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
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let who = who.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(who.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
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
        let doc = answer(&who, "GET", "/x", &h);
        assert_eq!(doc["peer_identity"], Value::Null);
        assert_eq!(doc["cluster"], "east");
        h.insert(
            "x-forwarded-client-cert",
            "By=a;Hash=b;URI=spiffe://cluster.local/ns/demo/sa/client"
                .parse()
                .unwrap(),
        );
        let doc = answer(&who, "GET", "/x?y=1", &h);
        assert_eq!(
            doc["peer_identity"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(doc["path"], "/x?y=1");
    }
}
