//! The app probes a sidecar answers for the kubelet.
//!
//! Under transparent interception the kubelet's `httpGet` and `tcpSocket`
//! probes of an app port are redirected to the sidecar's inbound listener,
//! which under `STRICT` mTLS refuses plain text: the pod would never
//! become ready. As Istio's injector does (`rewriteAppHTTPProbers`),
//! strait's rewrites such a probe to an `httpGet` of the sidecar's health
//! port (15021, never redirected) at `/app-health/<container>/<livez|readyz|startupz>`
//! and hands the sidecar the original probe in the environment variable
//! [`ENV`], a JSON object from those paths to [`AppProbe`]s (the shape of
//! Istio's `ISTIO_KUBE_APP_PROBERS`). The sidecar then probes the app at
//! the pod's IP, as the kubelet would have, from a source address the
//! interception rules let through to the app.
//!
//! [`AppProbers::parse`] reads that variable; it comes from the pod's spec,
//! so it is checked as untrusted input: paths, ports, header names and
//! values that could not go into a request line are refused, naming the
//! entry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The environment variable that carries the probes to the sidecar.
pub const ENV: &str = "STRAIT_APP_PROBERS";
/// Every rewritten probe's path starts with this.
pub const PATH_PREFIX: &str = "/app-health/";
/// The largest [`ENV`] value read.
pub const MAX_LEN: usize = 64 * 1024;
/// The most probes one sidecar answers (three per container).
pub const MAX_PROBES: usize = 96;
/// The longest timeout a probe may ask for, in seconds.
pub const MAX_TIMEOUT_SECONDS: u32 = 3600;

/// One probe of the app, as the pod's spec gave it (named ports resolved
/// to numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// As the kubelet's: the whole probe must answer within it.
    #[serde(default = "one_second")]
    pub timeout_seconds: u32,
}

/// What a probe does: the one of `httpGet`, `tcpSocket` and `grpc` it
/// has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    Http(&'a HttpGet),
    Tcp(&'a TcpSocket),
    Grpc(&'a Grpc),
}

impl AppProbe {
    /// Its action; an error when it has none or more than one (which
    /// [`AppProbers::parse`] refuses).
    pub fn action(&self) -> Result<Action<'_>, &'static str> {
        match (&self.http_get, &self.tcp_socket, &self.grpc) {
            (Some(get), None, None) => Ok(Action::Http(get)),
            (None, Some(tcp), None) => Ok(Action::Tcp(tcp)),
            (None, None, Some(grpc)) => Ok(Action::Grpc(grpc)),
            _ => Err("needs exactly one of httpGet, tcpSocket and grpc"),
        }
    }
}

fn one_second() -> u32 {
    1
}

/// An HTTP GET of the app; 200–399 is success, as for the
/// kubelet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    pub path: String,
    pub port: u16,
    /// `HTTP` (the default) or `HTTPS` (the certificate is not verified,
    /// as the kubelet does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

/// A request header of an [`HttpGet`] probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A TCP connect to the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
}

/// A gRPC health check (`grpc.health.v1.Health/Check`) of the app over
/// h2c; `SERVING` is success, as for the kubelet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    pub port: u16,
    /// The service asked about; none (or empty) is the server as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// The longest gRPC service name a probe may ask about.
pub const MAX_SERVICE_LEN: usize = 1024;

/// A bad [`ENV`] value; it names the entry and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{ENV}: {0} bytes, more than {MAX_LEN}")]
    TooLong(usize),
    /// Not JSON of the expected shape: serde's message (its error is
    /// neither `Clone` nor `Eq`).
    #[error("{ENV}: not valid: {0}")]
    Json(String),
    #[error("{ENV}: {0} probes, more than {MAX_PROBES}")]
    TooMany(usize),
    #[error("{ENV}: {path:?}: {problem}")]
    Entry {
        path: String,
        #[source]
        problem: EntryError,
    },
}

/// What is wrong with one probe entry (its path or its probe).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the path does not start with {PATH_PREFIX}")]
    PathPrefix,
    #[error("the path needs a name after the prefix, of printable characters with no '?' or '#'")]
    PathName,
    #[error("timeoutSeconds {0} is not between 1 and {MAX_TIMEOUT_SECONDS}")]
    Timeout(u32),
    /// None or several of `httpGet`, `tcpSocket` and `grpc`.
    #[error("{0}")]
    Action(&'static str),
    /// The action (`httpGet`, `tcpSocket`, `grpc`) whose port is 0.
    #[error("{0}.port is 0")]
    ZeroPort(&'static str),
    #[error("httpGet.path {0:?} does not start with '/' or has spaces or control characters")]
    HttpPath(String),
    #[error("httpGet.scheme {0:?} is neither HTTP nor HTTPS")]
    Scheme(String),
    #[error("header name {0:?} is not an HTTP token")]
    HeaderName(String),
    #[error("header {0} has a control character in its value")]
    HeaderValue(String),
    #[error("grpc.service is longer than {MAX_SERVICE_LEN} bytes")]
    GrpcService,
}

/// The probes a sidecar answers, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppProbers(BTreeMap<String, AppProbe>);

impl HttpGet {
    /// Whether the probe speaks TLS.
    pub fn https(&self) -> bool {
        self.scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
    }
}

impl AppProbers {
    /// Reads and checks an [`ENV`] value.
    pub fn parse(text: &str) -> Result<Self, ProbeError> {
        if text.len() > MAX_LEN {
            return Err(ProbeError::TooLong(text.len()));
        }
        let probers: AppProbers =
            serde_json::from_str(text).map_err(|e| ProbeError::Json(e.to_string()))?;
        if probers.0.len() > MAX_PROBES {
            return Err(ProbeError::TooMany(probers.0.len()));
        }
        for (path, probe) in &probers.0 {
            check_entry(path, probe)?;
        }
        Ok(probers)
    }

    /// Adds a probe; the same checks as [`AppProbers::parse`].
    pub fn insert(&mut self, path: String, probe: AppProbe) -> Result<(), ProbeError> {
        check_entry(&path, &probe)?;
        self.0.insert(path, probe);
        Ok(())
    }

    /// The probe answered at `path`.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.0.get(path)
    }

    /// The paths answered, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The [`ENV`] value.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("probes serialize")
    }
}

/// The path a rewritten probe of `container` asks the sidecar for;
/// `kind` is `livez`, `readyz` or `startupz`.
pub fn path_for(container: &str, kind: &str) -> String {
    format!("{PATH_PREFIX}{container}/{kind}")
}

fn check_entry(path: &str, probe: &AppProbe) -> Result<(), ProbeError> {
    check(path, probe).map_err(|problem| ProbeError::Entry {
        path: path.to_string(),
        problem,
    })
}

fn check(path: &str, probe: &AppProbe) -> Result<(), EntryError> {
    let rest = path
        .strip_prefix(PATH_PREFIX)
        .ok_or(EntryError::PathPrefix)?;
    if rest.is_empty()
        || !rest
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    {
        return Err(EntryError::PathName);
    }
    if probe.timeout_seconds == 0 || probe.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(EntryError::Timeout(probe.timeout_seconds));
    }
    match probe.action().map_err(EntryError::Action)? {
        Action::Http(get) => {
            if get.port == 0 {
                return Err(EntryError::ZeroPort("httpGet"));
            }
            if !get.path.starts_with('/') || !get.path.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(EntryError::HttpPath(get.path.clone()));
            }
            if let Some(s) = &get.scheme
                && !s.eq_ignore_ascii_case("HTTP")
                && !s.eq_ignore_ascii_case("HTTPS")
            {
                return Err(EntryError::Scheme(s.clone()));
            }
            for h in &get.http_headers {
                if http_token(&h.name).is_none() {
                    return Err(EntryError::HeaderName(h.name.clone()));
                }
                if h.value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                    return Err(EntryError::HeaderValue(h.name.clone()));
                }
            }
            Ok(())
        }
        Action::Tcp(tcp) if tcp.port == 0 => Err(EntryError::ZeroPort("tcpSocket")),
        Action::Tcp(_) => Ok(()),
        Action::Grpc(g) if g.port == 0 => Err(EntryError::ZeroPort("grpc")),
        Action::Grpc(g)
            if g.service
                .as_ref()
                .is_some_and(|s| s.len() > MAX_SERVICE_LEN) =>
        {
            Err(EntryError::GrpcService)
        }
        Action::Grpc(_) => Ok(()),
    }
}

/// `name` when it is a non-empty RFC 9110 token.
fn http_token(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "/app-health/app/livez": {"httpGet": {"path": "/healthz?full=1", "port": 8080, "scheme": "HTTP",
            "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]}, "timeoutSeconds": 3},
        "/app-health/app/readyz": {"tcpSocket": {"port": 8080}}
    }"#;

    #[test]
    fn reads_what_the_injector_writes() {
        let p = AppProbers::parse(GOOD).unwrap();
        assert_eq!(p.len(), 2);
        let live = p.get("/app-health/app/livez").unwrap();
        assert_eq!(live.timeout_seconds, 3);
        assert_eq!(live.http_get.as_ref().unwrap().path, "/healthz?full=1");
        let ready = p.get("/app-health/app/readyz").unwrap();
        assert_eq!(ready.timeout_seconds, 1, "the kubelet's default");
        assert_eq!(ready.tcp_socket, Some(TcpSocket { port: 8080 }));
        assert_eq!(AppProbers::parse(&p.to_json()).unwrap(), p, "round trip");
        assert!(!live.http_get.as_ref().unwrap().https());
        let tls = r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 8443, "scheme": "https"}}}"#;
        let tls = AppProbers::parse(tls).unwrap();
        let grpc = r#"{"/app-health/a/readyz": {"grpc": {"port": 9090, "service": "shop"}}}"#;
        let grpc = AppProbers::parse(grpc).unwrap();
        assert_eq!(
            grpc.get("/app-health/a/readyz").unwrap().grpc,
            Some(Grpc {
                port: 9090,
                service: Some("shop".into())
            })
        );
        assert!(
            tls.get("/app-health/a/livez")
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .https()
        );
        assert_eq!(
            path_for("app", "livez"),
            "/app-health/app/livez",
            "the path the injector rewrites to"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_entry() {
        let cases: &[(&str, &str)] = &[
            ("", "not valid"),
            ("[]", "not valid"),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": "http"}}}"#,
                "not valid",
            ),
            (
                r#"{"/app-health/a/livez": {"exec": {"command": ["true"]}}}"#,
                "not valid",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 70000}}}"#,
                "not valid",
            ),
            (
                r#"{"/healthz": {"tcpSocket": {"port": 1}}}"#,
                "\"/healthz\": the path does not start",
            ),
            (
                r#"{"/app-health/": {"tcpSocket": {"port": 1}}}"#,
                "needs a name",
            ),
            (
                r#"{"/app-health/a b": {"tcpSocket": {"port": 1}}}"#,
                "needs a name",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 0}}}"#,
                "tcpSocket.port is 0",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 0}}}"#,
                "httpGet.port is 0",
            ),
            (r#"{"/app-health/a/livez": {}}"#, "exactly one of"),
            (
                r#"{"/app-health/a/livez": {"grpc": {"port": 0}}}"#,
                "grpc.port is 0",
            ),
            (
                r#"{"/app-health/a/livez": {"grpc": {"port": 1}, "tcpSocket": {"port": 1}}}"#,
                "exactly one of",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 1}, "tcpSocket": {"port": 1}}}"#,
                "exactly one of",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "healthz", "port": 1}}}"#,
                "\"healthz\" does not start",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/a b", "port": 1}}}"#,
                "has spaces",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/a\r\nX: y", "port": 1}}}"#,
                "control",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 1, "scheme": "GRPC"}}}"#,
                "neither HTTP nor HTTPS",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 1, "httpHeaders": [{"name": "A:B", "value": ""}]}}}"#,
                "\"A:B\" is not an HTTP token",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"path": "/", "port": 1, "httpHeaders": [{"name": "A", "value": "x\ny"}]}}}"#,
                "header A has a control character",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0}}"#,
                "timeoutSeconds 0",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 3601}}"#,
                "timeoutSeconds 3601",
            ),
        ];
        for (text, want) in cases {
            let err = AppProbers::parse(text).unwrap_err().to_string();
            assert!(err.starts_with(ENV), "{text}: {err}");
            assert!(err.contains(want), "{text}: {err:?} should say {want:?}");
        }
        let long = format!(
            r#"{{"/app-health/a/livez": {{"grpc": {{"port": 1, "service": "{}"}}}}}}"#,
            "s".repeat(MAX_SERVICE_LEN + 1)
        );
        let err = AppProbers::parse(&long).unwrap_err().to_string();
        assert!(
            err.contains("grpc.service is longer than 1024 bytes"),
            "{err}"
        );
        let huge = format!("{{\"{}\": 1}}", "x".repeat(MAX_LEN));
        assert!(
            AppProbers::parse(&huge)
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
        let many: Vec<String> = (0..=MAX_PROBES)
            .map(|i| format!("\"/app-health/c{i}/livez\": {{\"tcpSocket\": {{\"port\": 1}}}}"))
            .collect();
        let err = AppProbers::parse(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(err.to_string().contains("97 probes"), "{err}");
    }

    #[test]
    fn insert_checks_as_parse_does() {
        let mut p = AppProbers::default();
        let tcp = AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket { port: 0 }),
            grpc: None,
            timeout_seconds: 1,
        };
        assert!(p.insert("/app-health/a/livez".into(), tcp).is_err());
        assert!(p.is_empty());
    }
}
