//! Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`) with Istio's labels,
//! `strait_sidecar_upstream_failures_total` (requests the sidecar
//! answered itself because no upstream could, by reason), and the JSON
//! access log (one object a line on stdout).

use std::io::Write;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Istio's standard labels, named as Istio names them (`unknown` where a
/// value is not known, as Istio reports it). TCP series use the same set
/// with `request_protocol="tcp"`.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    pub connection_security_policy: String,
}

/// `istio_requests_total`'s labels: the standard ones and, on this
/// family only (as in Istio), `grpc_response_status` (the gRPC status
/// code of a gRPC response, from its trailers or a trailers-only head;
/// empty otherwise).
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestCountLabels {
    #[prometheus(flatten)]
    pub labels: RequestLabels,
    pub grpc_response_status: String,
}

/// `strait_sidecar_upstream_failures_total`'s labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamFailureLabels {
    pub destination_service: String,
    /// A short code: `no_endpoints`, `no_healthy_endpoints`,
    /// `all_ejected`, `subset_not_exported`, `gateway_refused`,
    /// `connect_failure`, `reset`, `timeout`, `overflow`.
    pub reason: &'static str,
}

/// How many distinct (service, reason) causes are warned about once each;
/// past that, causes are only counted.
const MAX_WARNED: usize = 1024;

/// Whether a request is gRPC (`content-type: application/grpc[+proto…]`),
/// which makes its `request_protocol` `grpc`, as Istio reports it.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// The `request_protocol` of an HTTP request with these headers.
pub fn http_protocol(headers: &http::HeaderMap) -> &'static str {
    if is_grpc(headers) { "grpc" } else { "http" }
}

fn ms_buckets() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    ])
}

fn byte_buckets() -> Histogram {
    Histogram::new([1.0, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0, 1_000_000.0])
}

/// Which side of the sidecar a connection is on.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `inbound` (a peer called this workload) or `outbound` (a pooled
    /// upstream connection).
    pub direction: &'static str,
}

/// The sidecar's metric families.
#[derive(Clone)]
pub struct Metrics {
    /// `istio_requests_total`.
    pub requests: Family<RequestCountLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `istio_request_bytes`.
    pub request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `istio_response_bytes`.
    pub response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<RequestLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<RequestLabels, Counter>,
    /// `strait_sidecar_untrusted_closed_connections_total{direction}`:
    /// live connections closed because their peer no longer verifies under
    /// changed trust (see [`crate::live`]).
    pub untrusted_closed: Family<DirectionLabel, Counter>,
    /// `strait_sidecar_upstream_failures_total`.
    pub upstream_failures: Family<UpstreamFailureLabels, Counter>,
    /// The causes of upstream failures already logged.
    warned: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<UpstreamFailureLabels>>>,
    /// The four request series of each label set seen, looked up once per
    /// request instead of once per family (each lookup hashes and compares
    /// thirteen label strings; foldhash rather than SipHash for that). The
    /// handles share their values with the families' series, so the
    /// exposition is unchanged.
    series: std::sync::Arc<std::sync::Mutex<foldhash::HashMap<RequestCountLabels, RequestSeries>>>,
}

/// One label set's request series (clones of the families' own).
#[derive(Clone)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Metrics {
    /// The families, registered in `registry` under Istio's names.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(ms_buckets),
            request_bytes: Family::new_with_constructor(byte_buckets),
            response_bytes: Family::new_with_constructor(byte_buckets),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            untrusted_closed: Family::default(),
            upstream_failures: Family::default(),
            warned: Default::default(),
            series: Default::default(),
        };
        registry.sub_registry_with_prefix("strait_sidecar").register(
            "untrusted_closed_connections",
            "Live connections closed because a trust change made their peer's chain fail verification, by direction",
            m.untrusted_closed.clone(),
        );
        registry.sub_registry_with_prefix("strait_sidecar").register(
            "upstream_failures",
            "Requests the sidecar answered itself because no upstream could, by destination service and reason",
            m.upstream_failures.clone(),
        );
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "requests",
            "Requests, by Istio's labels",
            m.requests.clone(),
        );
        istio.register(
            "request_duration_milliseconds",
            "Request duration in milliseconds",
            m.duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        m
    }

    /// Records a request whose response ended (with `grpc_status`, if
    /// gRPC) and gives its labels back for the access log.
    pub fn request_ended(
        &self,
        labels: RequestLabels,
        grpc_status: Option<&str>,
        millis: f64,
        req_bytes: u64,
        resp_bytes: u64,
    ) -> RequestLabels {
        let l = RequestCountLabels {
            labels,
            grpc_response_status: grpc_status.unwrap_or_default().to_string(),
        };
        self.request(&l, millis, req_bytes, resp_bytes);
        l.labels
    }

    /// Counts a request that no upstream of `service` could answer, for
    /// the reason `code` (`why` says it in full); the first time a cause
    /// is seen it is logged as a warning, later ones are only counted.
    pub fn upstream_failure(&self, service: &str, code: &'static str, why: &str) {
        let labels = UpstreamFailureLabels {
            destination_service: service.to_string(),
            reason: code,
        };
        self.upstream_failures.get_or_create(&labels).inc();
        let first = self
            .warned
            .lock()
            .is_ok_and(|mut w| w.len() < MAX_WARNED && w.insert(labels));
        if first {
            tracing::warn!(
                service,
                reason = code,
                error = why,
                "no upstream could answer (logged once per service and reason; strait_sidecar_upstream_failures_total counts them)"
            );
        }
    }

    /// Records one finished request.
    pub fn request(&self, l: &RequestCountLabels, millis: f64, req_bytes: u64, resp_bytes: u64) {
        let cached = self.series.lock().ok().and_then(|m| m.get(l).cloned());
        let s = match cached {
            Some(s) => s,
            None => {
                let s = RequestSeries {
                    requests: self.requests.get_or_create(l).clone(),
                    duration: self.duration.get_or_create(&l.labels).clone(),
                    request_bytes: self.request_bytes.get_or_create(&l.labels).clone(),
                    response_bytes: self.response_bytes.get_or_create(&l.labels).clone(),
                };
                if let Ok(mut m) = self.series.lock() {
                    m.insert(l.clone(), s.clone());
                }
                s
            }
        };
        s.requests.inc();
        s.duration.observe(millis);
        s.request_bytes.observe(req_bytes as f64);
        s.response_bytes.observe(resp_bytes as f64);
    }
}

/// One access log line: start time (RFC 3339), who reported it (`source`
/// or `destination`), the request, its answer and duration, where it
/// went, who the peer proved to be, both clusters, the request id, and
/// why the sidecar answered itself (if it did).
#[derive(Debug, Serialize)]
pub struct AccessLog<'a> {
    pub start_time: String,
    pub reporter: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub response_code: u16,
    pub duration_ms: f64,
    pub upstream_host: &'a str,
    pub peer_identity: Option<&'a str>,
    pub source_cluster: &'a str,
    pub destination_cluster: &'a str,
    pub request_id: &'a str,
    /// A gRPC response's status code.
    pub grpc_status: Option<&'a str>,
    pub reason: Option<&'a str>,
}

impl AccessLog<'_> {
    /// Appends the line's JSON, exactly what `serde_json` writes for it:
    /// strings that need no escaping (nearly all) are copied as they are
    /// rather than scanned and written byte by byte, which was most of the
    /// line's cost on every request.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            // No early exit: the whole scan compiles to vector compares,
            // several times cheaper than a byte loop on these short strings.
            let plain = s
                .bytes()
                .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
            if plain {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            } else {
                let _ = serde_json::to_writer(&mut *out, s);
            }
        }
        fn field(out: &mut Vec<u8>, name: &str, first: bool) {
            if !first {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        }
        fn opt(out: &mut Vec<u8>, s: Option<&str>) {
            match s {
                Some(s) => string(out, s),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'{');
        field(out, "start_time", true);
        string(out, &self.start_time);
        field(out, "reporter", false);
        string(out, self.reporter);
        field(out, "method", false);
        string(out, self.method);
        field(out, "path", false);
        string(out, self.path);
        field(out, "authority", false);
        string(out, self.authority);
        field(out, "response_code", false);
        let _ = serde_json::to_writer(&mut *out, &self.response_code);
        field(out, "duration_ms", false);
        let _ = serde_json::to_writer(&mut *out, &self.duration_ms);
        field(out, "upstream_host", false);
        string(out, self.upstream_host);
        field(out, "peer_identity", false);
        opt(out, self.peer_identity);
        field(out, "source_cluster", false);
        string(out, self.source_cluster);
        field(out, "destination_cluster", false);
        string(out, self.destination_cluster);
        field(out, "request_id", false);
        string(out, self.request_id);
        field(out, "grpc_status", false);
        opt(out, self.grpc_status);
        field(out, "reason", false);
        opt(out, self.reason);
        out.push(b'}');
    }
}

/// How long the writer lets lines gather before writing them out: one
/// wake-up and one write per batch instead of per request (Envoy's file
/// access log flushes every second; this is shorter).
const LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes waiting for the writer; beyond this, lines are dropped (counted)
/// rather than slowing requests down or growing without bound.
const LOG_BUFFER_LIMIT: usize = 4 << 20;

/// What a batch buffer keeps of its capacity after a burst.
const LOG_BUFFER_KEEP: usize = 64 << 10;

/// The access log writer: one thread that owns stdout and writes the lines
/// gathered in a buffer, so a slow terminal or pipe never blocks a proxy
/// thread, and a request only appends to memory. The thread is woken when
/// the buffer stops being empty, then waits [`LOG_FLUSH_INTERVAL`] for more
/// lines before writing them all.
struct LogWriter {
    lines: std::sync::Mutex<Vec<u8>>,
    wake: std::sync::Condvar,
    dropped: std::sync::atomic::AtomicU64,
}

impl LogWriter {
    /// Writes out what is buffered. Taking the batch with stdout locked
    /// keeps batches in order between the writer thread and [`flush_log`].
    fn write_batch(&self, spare: &mut Vec<u8>) -> std::io::Result<()> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match self.lines.lock() {
            Ok(mut lines) => std::mem::swap(&mut *lines, spare),
            Err(_) => return Ok(()),
        }
        let written = out.write_all(spare).and_then(|()| out.flush());
        spare.clear();
        spare.shrink_to(LOG_BUFFER_KEEP);
        written
    }
}

fn writer() -> Option<&'static LogWriter> {
    static WRITER: std::sync::OnceLock<Option<LogWriter>> = std::sync::OnceLock::new();
    static STARTED: std::sync::Once = std::sync::Once::new();
    let w = WRITER
        .get_or_init(|| {
            Some(LogWriter {
                lines: std::sync::Mutex::new(Vec::new()),
                wake: std::sync::Condvar::new(),
                dropped: std::sync::atomic::AtomicU64::new(0),
            })
        })
        .as_ref()?;
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    {
                        let Ok(mut lines) = w.lines.lock() else {
                            return;
                        };
                        while lines.is_empty() {
                            lines = match w.wake.wait(lines) {
                                Ok(l) => l,
                                Err(_) => return,
                            };
                        }
                    }
                    std::thread::sleep(LOG_FLUSH_INTERVAL);
                    if w.write_batch(&mut spare).is_err() {
                        // stdout is gone; nothing else to tell. Lines
                        // pile up to the limit, then are dropped (counted).
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no access log writer thread");
        }
    });
    Some(w)
}

/// The JSON line of an entry (newline-terminated).
pub fn encode(entry: &AccessLog<'_>) -> Option<Vec<u8>> {
    let mut line = serde_json::to_vec(entry).ok()?;
    line.push(b'\n');
    Some(line)
}

/// Whether [`log`] writes (`--access-log`): on unless turned off.
static ACCESS_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lines [`log`] took (buffered for stdout).
static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Turns this process's access log on or off (`--access-log off`, as
/// Istio's default empty `accessLogFile`): off, [`log`] does nothing, no
/// writer thread starts, and requests are still counted in the metrics.
pub fn set_access_log(on: bool) {
    ACCESS_LOG.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Access log lines taken so far (written or about to be).
pub fn logged_lines() -> u64 {
    LOGGED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Buffers one JSON line for stdout. Logging never fails or slows a
/// request: when the writer falls behind, lines are dropped and counted
/// (see [`dropped_log_lines`]). Lines reach stdout within about
/// [`LOG_FLUSH_INTERVAL`], or at [`flush_log`].
pub fn log(entry: &AccessLog<'_>) {
    if !ACCESS_LOG.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let Some(w) = writer() else {
        return;
    };
    let Ok(mut lines) = w.lines.lock() else {
        return;
    };
    let was_empty = lines.is_empty();
    let before = lines.len();
    if before >= LOG_BUFFER_LIMIT {
        w.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    entry.write_json(&mut lines);
    lines.push(b'\n');
    drop(lines);
    LOGGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if was_empty {
        w.wake.notify_one();
    }
}

/// Writes out the buffered access log lines now (on shutdown, so none is
/// lost with the process).
pub fn flush_log() {
    if let Some(w) = writer() {
        let _ = w.write_batch(&mut Vec::new());
    }
}

/// Access log lines dropped because the writer fell behind.
pub fn dropped_log_lines() -> u64 {
    writer().map_or(0, |w| w.dropped.load(std::sync::atomic::Ordering::Relaxed))
}

/// Now, RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn access_log_lines_are_what_serde_json_writes() {
        let tricky = "quote \" backslash \\ tab \t nul \u{0} del \u{7f} é ✓ \u{1F600}";
        let base = AccessLog {
            start_time: "2026-12-06T05:00:00.123456789Z".into(),
            reporter: "source",
            method: "GET",
            path: "/a?b=c&d=%22",
            authority: "echo.demo:8080",
            response_code: 200,
            duration_ms: 0.123456789,
            upstream_host: "127.0.0.1:15006",
            peer_identity: Some("spiffe://cluster.local/ns/demo/sa/echo"),
            source_cluster: "east",
            destination_cluster: "west",
            request_id: "0123456789abcdef",
            grpc_status: None,
            reason: None,
        };
        let cases = [
            AccessLog {
                start_time: base.start_time.clone(),
                ..base
            },
            AccessLog {
                path: tricky,
                authority: "",
                response_code: 503,
                duration_ms: f64::NAN,
                peer_identity: None,
                grpc_status: Some("14"),
                reason: Some(tricky),
                start_time: tricky.into(),
                ..base
            },
            AccessLog {
                start_time: base.start_time.clone(),
                method: "\n",
                duration_ms: 1e300,
                request_id: "\u{1f}",
                ..base
            },
        ];
        for entry in cases {
            let mut ours = Vec::new();
            entry.write_json(&mut ours);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&entry).unwrap()
            );
        }
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        let h = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            h
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=y",
        ] {
            assert_eq!(http_protocol(&h(ct)), "grpc", "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "text/plain",
            "application/grpcx",
        ] {
            assert_eq!(http_protocol(&h(ct)), "http", "{ct}");
        }
        assert_eq!(http_protocol(&http::HeaderMap::new()), "http");
    }

    #[test]
    fn metrics_carry_istio_names_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let l = RequestLabels {
            reporter: "source".into(),
            response_code: "200".into(),
            connection_security_policy: "mutual_tls".into(),
            ..RequestLabels::default()
        };
        let count = RequestCountLabels {
            labels: l.clone(),
            grpc_response_status: "0".into(),
        };
        m.request(&count, 12.0, 10, 2000);
        m.tcp_opened.get_or_create(&l).inc();
        m.tcp_closed.get_or_create(&l).inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "istio_requests_total{",
            "istio_request_duration_milliseconds_bucket{",
            "istio_request_bytes_sum{",
            "istio_response_bytes_count{",
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains("reporter=\"source\""), "{text}");
        // As in Istio, only istio_requests_total has grpc_response_status.
        for line in text.lines().filter(|l| l.contains("grpc_response_status")) {
            assert!(line.starts_with("istio_requests_total{"), "{line}");
        }
        assert!(text.contains("grpc_response_status=\"0\""), "{text}");
        assert!(
            text.contains("connection_security_policy=\"mutual_tls\""),
            "{text}"
        );
    }

    #[test]
    fn repeated_requests_add_up_in_the_exposed_series() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let l = |code: &str| RequestCountLabels {
            labels: RequestLabels {
                reporter: "destination".into(),
                response_code: code.into(),
                ..RequestLabels::default()
            },
            grpc_response_status: String::new(),
        };
        for _ in 0..3 {
            m.request(&l("200"), 1.0, 10, 20);
        }
        m.request(&l("503"), 2.0, 0, 5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = |prefix: &str, code: &str| {
            text.lines()
                .find(|x| x.starts_with(prefix) && x.contains(&format!("response_code=\"{code}\"")))
                .map(|x| x.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(
            line("istio_requests_total{", "200").as_deref(),
            Some("3"),
            "{text}"
        );
        assert_eq!(
            line("istio_requests_total{", "503").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            line("istio_request_bytes_sum{", "200").as_deref(),
            Some("30.0"),
            "{text}"
        );
        assert_eq!(
            line("istio_response_bytes_count{", "200").as_deref(),
            Some("3"),
            "{text}"
        );
        assert_eq!(
            line("istio_request_duration_milliseconds_sum{", "503").as_deref(),
            Some("2.0"),
            "{text}"
        );
    }

    #[test]
    fn logged_lines_are_buffered_until_flushed() {
        let entry = AccessLog {
            start_time: now_rfc3339(),
            reporter: "source",
            method: "GET",
            path: "/",
            authority: "echo.demo:8080",
            response_code: 200,
            duration_ms: 0.5,
            upstream_host: "10.0.0.1:15006",
            peer_identity: None,
            source_cluster: "c1",
            destination_cluster: "c2",
            request_id: "r",
            grpc_status: None,
            reason: None,
        };
        let w = writer().unwrap();
        log(&entry);
        log(&entry);
        flush_log();
        // The writer thread may have taken the batch first; either way
        // nothing is left behind and nothing was dropped.
        assert!(w.lines.lock().unwrap().is_empty());
        assert_eq!(dropped_log_lines(), 0);
        let line = encode(&entry).unwrap();
        assert!(line.len() < LOG_BUFFER_KEEP);
    }

    #[test]
    fn an_access_log_line_is_one_json_object() {
        let entry = AccessLog {
            start_time: "2026-01-01T00:00:00Z".into(),
            reporter: "source",
            method: "GET",
            path: "/a\nb\"c",
            authority: "echo.demo:8080",
            response_code: 200,
            duration_ms: 1.5,
            upstream_host: "10.0.0.1:15006",
            peer_identity: Some("spiffe://cluster.local/ns/demo/sa/echo"),
            source_cluster: "c1",
            destination_cluster: "c2",
            request_id: "abc",
            grpc_status: Some("14"),
            reason: None,
        };
        let line = encode(&entry).unwrap();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["path"], "/a\nb\"c");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["destination_cluster"], "c2");
        assert_eq!(v["grpc_status"], "14");
        assert!(
            time::OffsetDateTime::parse(
                v["start_time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
    }
}
