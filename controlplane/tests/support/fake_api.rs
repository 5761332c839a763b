//! A fake Kubernetes API server on loopback serving recorded API responses
//! from a directory (lists as the API server returns them, watch events as
//! newline-delimited JSON). Shared by the control plane's Kubernetes tests
//! and the workspace's end-to-end test of `strait controlplane --kube`.
//!
//! - `GET <path>` serves `<last path segment>.json`, or a 404 `Status` when
//!   there is none (a CRD that is not installed); `GET .../<plural>/<name>`
//!   serves that item of `<plural>.json`.
//! - A watch (`?watch=true`) from the list's `resourceVersion` serves
//!   `<segment>.watch.jsonl` once the test releases it, then ends; every
//!   other watch stays open without events, so the watcher idles
//!   deterministically.
//! - `PATCH` echoes the body (404 when the kind has no list file),
//!   `DELETE` answers with the object.
//! - `POST .../tokenreviews` answers a `TokenReview` the way the API server
//!   does: authenticated as the user `tokenreviews.json` maps the token to
//!   (`{"<token>": "<username>"}`), else not authenticated.
//!
//! Every request is logged.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;

/// A response body: some chunks, then either the end or nothing ever
/// again (an open watch with no events).
pub struct TestBody {
    chunks: VecDeque<Bytes>,
    hold_open: bool,
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            // Never woken: the client drops the connection when done.
            None if self.hold_open => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

/// One request the fake server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: String,
}

pub struct Fake {
    dir: PathBuf,
    seen: Mutex<Vec<Seen>>,
    release_watch: watch::Sender<bool>,
}

pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn respond(status: StatusCode, chunks: Vec<Bytes>, hold_open: bool) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(TestBody {
            chunks: chunks.into(),
            hold_open,
        })
        .unwrap()
}

fn not_found(path: &str) -> Response<TestBody> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource (get {path})"),
        "reason": "NotFound", "details": {}, "code": 404});
    respond(
        StatusCode::NOT_FOUND,
        vec![Bytes::from(status.to_string())],
        false,
    )
}

impl Fake {
    pub fn start(dir: PathBuf) -> (Arc<Fake>, String) {
        let (release_watch, _) = watch::channel(false);
        let fake = Arc::new(Fake {
            dir,
            seen: Mutex::new(Vec::new()),
            release_watch,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let fake = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (fake, url)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn release_watches(&self) {
        self.release_watch.send_replace(true);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<TestBody> {
        use http_body_util_free::collect;
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = collect(req.into_body()).await;
        self.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type,
            body: body.clone(),
        });
        // `/apis/<g>/<v>/namespaces/<ns>/<plural>/<name>` or `.../<plural>`.
        let segments: Vec<&str> = path.split('/').collect();
        let plural = |at_end: bool| -> String {
            let i = if at_end {
                segments.len() - 1
            } else {
                segments.len() - 2
            };
            segments[i].to_string()
        };
        match method {
            Method::GET => {
                let name = plural(true);
                let Ok(list) = std::fs::read_to_string(self.dir.join(format!("{name}.json")))
                else {
                    return self.get_one(&segments, &path);
                };
                if query_param(&query, "watch") != Some("true") {
                    return respond(StatusCode::OK, vec![Bytes::from(list)], false);
                }
                let listed: Value = serde_json::from_str(&list).unwrap();
                let from = query_param(&query, "resourceVersion");
                let events = std::fs::read_to_string(self.dir.join(format!("{name}.watch.jsonl")));
                match events {
                    Ok(events) if from == listed["metadata"]["resourceVersion"].as_str() => {
                        let mut release = self.release_watch.subscribe();
                        release.wait_for(|r| *r).await.unwrap();
                        let chunks = events
                            .lines()
                            .map(|l| Bytes::from(format!("{l}\n")))
                            .collect();
                        respond(StatusCode::OK, chunks, false)
                    }
                    _ => respond(StatusCode::OK, Vec::new(), true),
                }
            }
            Method::PATCH => {
                if !self.dir.join(format!("{}.json", plural(false))).exists() {
                    return not_found(&path);
                }
                respond(StatusCode::OK, vec![Bytes::from(body)], false)
            }
            Method::POST if path.ends_with("/tokenreviews") => self.token_review(&body),
            Method::DELETE => {
                let obj = json!({"metadata": {"name": plural(true)}});
                respond(StatusCode::OK, vec![Bytes::from(obj.to_string())], false)
            }
            _ => not_found(&path),
        }
    }
}

impl Fake {
    /// `GET .../<plural>/<name>`: the item of `<plural>.json` of that
    /// name (and namespace, when the path names one), else a 404.
    fn get_one(&self, segments: &[&str], path: &str) -> Response<TestBody> {
        let n = segments.len();
        if n < 2 {
            return not_found(path);
        }
        let (plural, name) = (segments[n - 2], segments[n - 1]);
        let namespace = segments
            .iter()
            .position(|s| *s == "namespaces")
            .filter(|i| i + 2 < n)
            .map(|i| segments[i + 1]);
        let Ok(list) = std::fs::read_to_string(self.dir.join(format!("{plural}.json"))) else {
            return not_found(path);
        };
        let list: Value = serde_json::from_str(&list).unwrap();
        let found = list["items"].as_array().into_iter().flatten().find(|item| {
            item["metadata"]["name"] == name
                && namespace.is_none_or(|ns| item["metadata"]["namespace"] == ns)
        });
        match found {
            Some(item) => respond(StatusCode::OK, vec![Bytes::from(item.to_string())], false),
            None => not_found(path),
        }
    }

    fn token_review(&self, body: &str) -> Response<TestBody> {
        let asked: Value = serde_json::from_str(body).unwrap_or_default();
        let token = asked["spec"]["token"].as_str().unwrap_or_default();
        let users: Value = std::fs::read_to_string(self.dir.join("tokenreviews.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let status = match users[token].as_str() {
            Some(user) => json!({
                "authenticated": true,
                "user": {"username": user, "uid": format!("uid-{user}"),
                    "groups": ["system:serviceaccounts", "system:authenticated"]},
                "audiences": asked["spec"]["audiences"],
            }),
            None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        };
        let review = json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": asked["spec"],
            "status": status,
        });
        respond(
            StatusCode::CREATED,
            vec![Bytes::from(review.to_string())],
            false,
        )
    }
}

/// Collects a request body without `http-body-util` (not a dependency).
mod http_body_util_free {
    use std::future::poll_fn;
    use std::pin::Pin;

    use hyper::body::{Body, Incoming};

    pub async fn collect(mut body: Incoming) -> String {
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        String::from_utf8(out).unwrap()
    }
}
