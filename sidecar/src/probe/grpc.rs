//! The kubelet's gRPC probe: `grpc.health.v1.Health/Check` over h2c,
//! success when the app answers `SERVING`.

use std::net::SocketAddr;

use bytes::Bytes;
use http::StatusCode;
use http::header::{CONTENT_TYPE, TE, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpStream;

use super::ProbeError;

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub(super) service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    pub(super) status: i32,
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
pub(super) const SERVING: i32 = 1;

/// A gRPC health check over h2c, as the kubelet's gRPC probe: success
/// when the app answers `SERVING`.
pub(super) async fn grpc_health(
    tcp: TcpStream,
    addr: SocketAddr,
    service: &str,
    what: &str,
) -> Result<(), ProbeError> {
    let http = |source| ProbeError::Http {
        target: what.to_owned(),
        source,
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(http)?;
    let message = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0); // not compressed
    body.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        .header(USER_AGENT, "kube-probe/strait")
        .body(Full::new(Bytes::from(body)))
        .map_err(|source| ProbeError::Request {
            target: what.to_owned(),
            source,
        })?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let (head, body) = response.into_parts();
        let body = body.collect().await?;
        Ok::<_, hyper::Error>((head, body))
    };
    tokio::pin!(conn, exchange);
    let (head, body) = tokio::select! {
        biased;
        r = &mut exchange => r,
        c = &mut conn => match c {
            Ok(()) => exchange.await,
            Err(e) => return Err(http(e)),
        },
    }
    .map_err(http)?;
    if head.status != StatusCode::OK {
        return Err(ProbeError::GrpcHttpStatus {
            target: what.to_owned(),
            status: head.status,
        });
    }
    // grpc-status is a trailer, or a header of a trailers-only answer.
    let trailers = body.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers
        .get("grpc-status")
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    if grpc_status != "0" {
        let message = trailers
            .get("grpc-message")
            .or_else(|| head.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return Err(ProbeError::GrpcStatus {
            target: what.to_owned(),
            code: grpc_status.to_owned(),
            message: message.to_owned(),
        });
    }
    let bytes = body.to_bytes();
    let message = match bytes.as_ref() {
        [0, len @ ..] if len.len() >= 4 => {
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            len.get(4..4 + n)
        }
        _ => None,
    }
    .ok_or_else(|| ProbeError::NotOneMessage {
        target: what.to_owned(),
    })?;
    let status = HealthCheckResponse::decode(message)
        .map_err(|source| ProbeError::NotHealthResponse {
            target: what.to_owned(),
            source,
        })?
        .status;
    match status {
        SERVING => Ok(()),
        status => Err(ProbeError::NotServing {
            target: what.to_owned(),
            status,
        }),
    }
}
