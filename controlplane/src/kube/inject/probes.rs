//! The app probes of a transparent pod, rewritten for its sidecar.
//!
//! The kubelet's `httpGet`, `tcpSocket` and `grpc` probes of an app port
//! would be redirected to the sidecar's inbound listener, which refuses
//! plaintext under STRICT. [`rewritten`] points them at the sidecar's
//! health port instead and gives back the originals, which the sidecar
//! runs itself ([`strait_model::probe`]).

use serde_json::{Value, json};
use strait_model::probe::{self, AppProbe, AppProbers, Grpc, Header, HttpGet, TcpSocket};

use super::HEALTH_PORT;

/// Why an app probe cannot be rewritten: names the container and the
/// probe's field.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("container {index} has no name")]
    NoName { index: usize },
    #[error("container {container}: {probe}.timeoutSeconds: {value} is not a number of seconds")]
    Timeout {
        container: String,
        probe: &'static str,
        value: Value,
    },
    #[error(
        "container {container}: {probe}.httpGet.httpHeaders: {header} needs a name and a value"
    )]
    Header {
        container: String,
        probe: &'static str,
        header: Value,
    },
    #[error("container {container}: {probe}.{field}: {source}")]
    Port {
        container: String,
        probe: &'static str,
        /// `httpGet.port`, `tcpSocket.port` or `grpc.port`.
        field: &'static str,
        #[source]
        source: PortError,
    },
    #[error("container {container}: {probe}.grpc.service: {value} is not a string")]
    GrpcService {
        container: String,
        probe: &'static str,
        value: Value,
    },
    /// The sidecar could not run the probe.
    #[error("container {container}: {probe}: {source}")]
    Unrunnable {
        container: String,
        probe: &'static str,
        #[source]
        source: probe::ProbeError,
    },
}

/// Why a probe's `port` names no port of its container.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{0} is not a port")]
    NotAPort(Value),
    #[error("{0:?} is neither a port of the container nor a number")]
    UnknownName(String),
    /// gRPC probes take no named port.
    #[error("{0} is not a port number")]
    NotANumber(Value),
}

/// The app containers' `httpGet` (HTTP and HTTPS), `tcpSocket` and `grpc` probes, rewritten
/// to `httpGet` of the sidecar's health port at
/// `/app-health/<container>/<livez|readyz|startupz>` (JSON Patch
/// operations), and the originals the sidecar is to run for them. Probes
/// that do not go through the inbound redirect, or that the sidecar cannot
/// run, stay as they are: `exec` probes and ones aimed at another
/// `host`.
pub(super) fn rewritten(containers: &[Value]) -> Result<(Vec<Value>, AppProbers), ProbeError> {
    let mut ops = Vec::new();
    let mut probers = AppProbers::default();
    for (i, c) in containers.iter().enumerate() {
        let name = c["name"].as_str().ok_or(ProbeError::NoName { index: i })?;
        for (field, kind) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(spec) = c[field].as_object() else {
                continue;
            };
            let Some(original) = original(c, name, field, spec)? else {
                continue;
            };
            let path = probe::path_for(name, kind);
            probers
                .insert(path.clone(), original)
                .map_err(|source| ProbeError::Unrunnable {
                    container: name.to_string(),
                    probe: field,
                    source,
                })?;
            let mut rewritten = spec.clone();
            rewritten.remove("tcpSocket");
            rewritten.remove("grpc");
            rewritten.insert(
                "httpGet".into(),
                json!({"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}),
            );
            ops.push(json!({
                "op": "replace",
                "path": format!("/spec/containers/{i}/{field}"),
                "value": rewritten,
            }));
        }
    }
    Ok((ops, probers))
}

/// The probe `field` (`spec`) of container `c` (named `name`) as the
/// sidecar runs it, or `None` when it stays as it is (an `exec` probe, one
/// aimed at another `host`).
fn original(
    c: &Value,
    name: &str,
    field: &'static str,
    spec: &serde_json::Map<String, Value>,
) -> Result<Option<AppProbe>, ProbeError> {
    let port_error = |at: &'static str| {
        move |source: PortError| ProbeError::Port {
            container: name.to_string(),
            probe: field,
            field: at,
            source,
        }
    };
    let timeout_seconds = match &spec.get("timeoutSeconds") {
        None => 1,
        Some(t) => t
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ProbeError::Timeout {
                container: name.to_string(),
                probe: field,
                value: (*t).clone(),
            })?
            .clamp(1, probe::MAX_TIMEOUT_SECONDS),
    };
    let original = if let Some(get) = spec.get("httpGet") {
        let scheme = get["scheme"].as_str().unwrap_or("HTTP");
        let https = scheme.eq_ignore_ascii_case("HTTPS");
        if !(https || scheme.eq_ignore_ascii_case("HTTP"))
            || get["host"].as_str().is_some_and(|h| !h.is_empty())
        {
            return Ok(None);
        }
        let path = get["path"].as_str().unwrap_or_default();
        let mut http_headers = Vec::new();
        for h in get["httpHeaders"].as_array().into_iter().flatten() {
            let (Some(name), Some(value)) = (h["name"].as_str(), h["value"].as_str()) else {
                return Err(ProbeError::Header {
                    container: name.to_string(),
                    probe: field,
                    header: h.clone(),
                });
            };
            http_headers.push(Header {
                name: name.into(),
                value: value.into(),
            });
        }
        AppProbe {
            http_get: Some(HttpGet {
                // The kubelet asks for "/" when the path is empty.
                path: if path.starts_with('/') {
                    path.into()
                } else {
                    format!("/{path}")
                },
                port: container_port(c, &get["port"]).map_err(port_error("httpGet.port"))?,
                scheme: https.then(|| "HTTPS".to_string()),
                http_headers,
            }),
            tcp_socket: None,
            grpc: None,
            timeout_seconds,
        }
    } else if let Some(tcp) = spec.get("tcpSocket") {
        if tcp["host"].as_str().is_some_and(|h| !h.is_empty()) {
            return Ok(None);
        }
        AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket {
                port: container_port(c, &tcp["port"]).map_err(port_error("tcpSocket.port"))?,
            }),
            grpc: None,
            timeout_seconds,
        }
    } else if let Some(grpc) = spec.get("grpc") {
        let service = match &grpc["service"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => {
                return Err(ProbeError::GrpcService {
                    container: name.to_string(),
                    probe: field,
                    value: other.clone(),
                });
            }
        };
        AppProbe {
            http_get: None,
            tcp_socket: None,
            grpc: Some(Grpc {
                // A number only: gRPC probes take no named port.
                port: match &grpc["port"] {
                    Value::Number(_) => container_port(c, &grpc["port"]),
                    other => Err(PortError::NotANumber(other.clone())),
                }
                .map_err(port_error("grpc.port"))?,
                service,
            }),
            timeout_seconds,
        }
    } else {
        return Ok(None);
    };
    Ok(Some(original))
}

/// A probe's port: a number, or the name of one of the container's ports
/// (then, as the kubelet, a number written as a string).
fn container_port(container: &Value, port: &Value) -> Result<u16, PortError> {
    let number = |n: u64| u16::try_from(n).ok().filter(|n| *n != 0);
    match port {
        Value::Number(n) => n
            .as_u64()
            .and_then(number)
            .ok_or_else(|| PortError::NotAPort(port.clone())),
        Value::String(name) => container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(number)
            .or_else(|| name.parse().ok().and_then(number))
            .ok_or_else(|| PortError::UnknownName(name.clone())),
        other => Err(PortError::NotAPort(other.clone())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tests::{apply, cfg, sidecar_args};
    use super::super::{CONTAINER, INTERCEPTION_ANNOTATION, REWRITE_PROBES_ANNOTATION, patch_for};
    use super::*;

    /// The sidecar's env value of `name`.
    fn sidecar_env(patched: &Value, name: &str) -> Option<String> {
        patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == CONTAINER)
            .unwrap()["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_string())
    }

    fn probed_pod(annotations: Value) -> Value {
        json!({
            "metadata": {"annotations": annotations},
            "spec": {"containers": [
                {
                    "name": "web",
                    "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9901}],
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": "http",
                                    "httpHeaders": [{"name": "X-Probe", "value": "k$(HOME)"}]},
                        "timeoutSeconds": 3, "periodSeconds": 7, "failureThreshold": 2,
                    },
                    "readinessProbe": {"tcpSocket": {"port": 9901}},
                    "startupProbe": {"exec": {"command": ["true"]}},
                },
                {
                    "name": "tls",
                    "ports": [{"containerPort": 8443}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8443, "scheme": "HTTPS"}},
                    "startupProbe": {"grpc": {"port": 9090, "service": "tls"}, "failureThreshold": 30},
                    "livenessProbe": {"httpGet": {"path": "/up", "port": "8443", "host": "10.0.0.9"}},
                },
            ]},
        })
    }

    #[test]
    fn a_transparent_pods_http_and_tcp_probes_go_to_the_sidecar() {
        let p = probed_pod(json!({INTERCEPTION_ANNOTATION: "transparent"}));
        let patched = apply(p.clone(), &patch_for(&p, &cfg()).unwrap().unwrap());
        let web = &patched["spec"]["containers"][0];
        // Rewritten to the health port, the probe's timing kept.
        assert_eq!(
            web["livenessProbe"],
            json!({
                "httpGet": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"},
                "timeoutSeconds": 3, "periodSeconds": 7, "failureThreshold": 2,
            })
        );
        assert_eq!(
            web["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"}})
        );
        // An HTTPS probe too; probes that do not meet the inbound redirect
        // stay.
        assert_eq!(
            web["startupProbe"],
            p["spec"]["containers"][0]["startupProbe"]
        );
        let tls = &patched["spec"]["containers"][1];
        assert_eq!(
            tls["readinessProbe"]["httpGet"],
            json!({"path": "/app-health/tls/readyz", "port": 15021, "scheme": "HTTP"})
        );
        assert_eq!(
            tls["livenessProbe"],
            p["spec"]["containers"][1]["livenessProbe"]
        );

        // The sidecar runs the originals, named ports resolved; '$' is
        // written "$$" so that Kubernetes does not expand $(HOME).
        let env = sidecar_env(&patched, probe::ENV).unwrap();
        assert!(env.contains("k$$(HOME)"), "{env}");
        let probers = AppProbers::parse(&env.replace("$$", "$")).unwrap();
        assert_eq!(
            tls["startupProbe"],
            json!({
                "httpGet": {"path": "/app-health/tls/startupz", "port": 15021, "scheme": "HTTP"},
                "failureThreshold": 30,
            })
        );
        assert_eq!(probers.len(), 4);
        assert_eq!(
            probers.get("/app-health/tls/startupz").unwrap().grpc,
            Some(Grpc {
                port: 9090,
                service: Some("tls".into())
            })
        );
        let tls = probers
            .get("/app-health/tls/readyz")
            .unwrap()
            .http_get
            .clone()
            .unwrap();
        assert!(
            tls.https() && tls.port == 8443 && tls.path == "/ready",
            "{tls:?}"
        );
        let live = probers.get("/app-health/web/livez").unwrap();
        let get = live.http_get.as_ref().unwrap();
        assert_eq!(
            (get.path.as_str(), get.port, live.timeout_seconds),
            ("/healthz", 8080, 3)
        );
        assert_eq!(
            get.http_headers,
            vec![Header {
                name: "X-Probe".into(),
                value: "k$(HOME)".into()
            }]
        );
        assert_eq!(
            probers.get("/app-health/web/readyz").unwrap().tcp_socket,
            Some(TcpSocket { port: 9901 })
        );
        // Probed where the kubelet would have: the pod's IP.
        assert!(
            sidecar_args(&patched).contains(&"--app-probe-address=$(POD_IP)".to_string()),
            "{:?}",
            sidecar_args(&patched)
        );
        let sidecar = patched["spec"]["containers"]
            .as_array()
            .unwrap()
            .last()
            .unwrap();
        assert!(
            sidecar["env"].as_array().unwrap().contains(&json!(
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
            )),
            "{sidecar}"
        );
        // Injected once: the patched pod is left alone.
        assert_eq!(patch_for(&patched, &cfg()).unwrap(), None);
    }

    #[test]
    fn probes_stay_in_explicit_mode_or_when_the_pod_says_so() {
        for annotations in [
            json!({}),
            json!({INTERCEPTION_ANNOTATION: "transparent", REWRITE_PROBES_ANNOTATION: "false"}),
        ] {
            let p = probed_pod(annotations);
            let patched = apply(p.clone(), &patch_for(&p, &cfg()).unwrap().unwrap());
            assert_eq!(
                patched["spec"]["containers"][0]["livenessProbe"],
                p["spec"]["containers"][0]["livenessProbe"]
            );
            assert_eq!(sidecar_env(&patched, probe::ENV), None);
            assert!(
                !sidecar_args(&patched)
                    .iter()
                    .any(|a| a.starts_with("--app-probe-address"))
            );
        }
        // "true" asks for the default; in explicit mode the kubelet reaches
        // the app directly, so there is nothing to rewrite.
        let p = probed_pod(json!({REWRITE_PROBES_ANNOTATION: "true"}));
        let patched = apply(p.clone(), &patch_for(&p, &cfg()).unwrap().unwrap());
        assert_eq!(sidecar_env(&patched, probe::ENV), None);
    }

    #[test]
    fn bad_probes_are_refused_naming_the_container_and_field() {
        let cases = [
            (
                json!({"httpGet": {"path": "/", "port": "nope"}}),
                "container web: livenessProbe.httpGet.port: \"nope\" is neither",
            ),
            (
                json!({"tcpSocket": {"port": 0}}),
                "container web: livenessProbe.tcpSocket.port: 0 is not a port",
            ),
            (json!({"tcpSocket": {"port": 70000}}), "70000 is not a port"),
            (
                json!({"grpc": {"port": "grpc"}}),
                "livenessProbe.grpc.port: \"grpc\" is not a port number",
            ),
            (
                json!({"grpc": {"port": 9090, "service": 1}}),
                "livenessProbe.grpc.service: 1 is not a string",
            ),
            (
                json!({"httpGet": {"path": "/", "port": 80, "httpHeaders": [{"name": "A"}]}}),
                "needs a name and a value",
            ),
            (
                json!({"httpGet": {"path": "/a b", "port": 80}}),
                "livenessProbe: STRAIT_APP_PROBERS",
            ),
            (
                json!({"tcpSocket": {"port": 80}, "timeoutSeconds": "1"}),
                "livenessProbe.timeoutSeconds: \"1\" is not a number",
            ),
        ];
        for (probe, want) in cases {
            let p = json!({
                "metadata": {"annotations": {INTERCEPTION_ANNOTATION: "transparent"}},
                "spec": {"containers": [{"name": "web", "livenessProbe": probe}]},
            });
            let err = patch_for(&p, &cfg()).unwrap_err().to_string();
            assert!(err.contains(want), "{probe}: {err:?} should say {want:?}");
        }
        let p = json!({
            "metadata": {"annotations": {REWRITE_PROBES_ANNOTATION: "no"}},
            "spec": {"containers": [{"name": "web"}]},
        });
        assert_eq!(
            patch_for(&p, &cfg()).unwrap_err().to_string(),
            "annotation sidecar.strait.io/rewriteAppHTTPProbers: \"no\" is neither \"true\" nor \"false\""
        );
    }
}
