//! strait's protobuf APIs and the Istio APIs it serves, generated at build
//! time by `build.rs` (protox + tonic-prost-build; no system `protoc`).
//!
//! Modules follow the protobuf packages: [`istio::v1::auth`] is Istio's
//! certificate signing API (`IstioCertificateService/CreateCertificate`),
//! wire-compatible with istiod so that an Istio agent can use strait's
//! control plane as its CA.

/// strait's own APIs.
pub mod strait {
    /// The trust broker.
    pub mod broker {
        /// Version 1 of the broker API: `Federation` (clusters) and `Admin`.
        #[allow(warnings, clippy::all, clippy::pedantic, clippy::unwrap_used)]
        pub mod v1 {
            tonic::include_proto!("strait.broker.v1");
        }
    }

    /// The discovery resources the local control plane pushes to proxies.
    pub mod mesh {
        /// Version 1: `Service`, `Workload`, `Policy`, `TrustBundle`,
        /// `GatewayRoute`, `Network`, `MeshSettings`.
        #[allow(warnings, clippy::all, clippy::pedantic, clippy::unwrap_used)]
        pub mod v1 {
            tonic::include_proto!("strait.mesh.v1");

            /// The xDS type URL of each resource type.
            pub mod type_url {
                pub const SERVICE: &str = "type.googleapis.com/strait.mesh.v1.Service";
                pub const WORKLOAD: &str = "type.googleapis.com/strait.mesh.v1.Workload";
                pub const POLICY: &str = "type.googleapis.com/strait.mesh.v1.Policy";
                pub const TRUST_BUNDLE: &str = "type.googleapis.com/strait.mesh.v1.TrustBundle";
                pub const GATEWAY_ROUTE: &str = "type.googleapis.com/strait.mesh.v1.GatewayRoute";
                pub const NETWORK: &str = "type.googleapis.com/strait.mesh.v1.Network";
                pub const MESH_SETTINGS: &str = "type.googleapis.com/strait.mesh.v1.MeshSettings";
                /// Every type, in the order a proxy should apply them.
                pub const ALL: [&str; 7] = [
                    MESH_SETTINGS,
                    TRUST_BUNDLE,
                    NETWORK,
                    WORKLOAD,
                    SERVICE,
                    POLICY,
                    GATEWAY_ROUTE,
                ];
            }
        }
    }
}

/// strait's gateway-to-gateway tunnel framing.
pub mod tunnel {
    /// Version 1 of the tunnel header.
    #[allow(warnings, clippy::all, clippy::pedantic, clippy::unwrap_used)]
    pub mod v1 {
        tonic::include_proto!("strait.tunnel.v1");
    }
}

/// Istio APIs.
pub mod istio {
    /// Istio API version 1.
    pub mod v1 {
        /// Istio's certificate signing API (package `istio.v1.auth`).
        #[allow(warnings, clippy::all, clippy::pedantic, clippy::unwrap_used)]
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
    use prost::Message;

    /// The field numbers and wire types are Istio's: a byte-level check, so a
    /// renumbered field in the `.proto` cannot slip through.
    #[test]
    fn csr_request_uses_istio_field_numbers() {
        let mut metadata = prost_types::Struct::default();
        metadata.fields.insert(
            "ClusterID".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("east".into())),
            },
        );
        let req = IstioCertificateRequest {
            csr: "C".into(),
            validity_duration: 7,
            metadata: Some(metadata),
        };
        let bytes = req.encode_to_vec();
        // field 1, wire type 2 (length-delimited), length 1, "C"
        assert_eq!(&bytes[..3], &[0x0a, 0x01, b'C']);
        // field 3, wire type 0 (varint), value 7
        assert_eq!(&bytes[3..5], &[0x18, 0x07]);
        // field 4, wire type 2 (the Struct message)
        assert_eq!(bytes[5], 0x22);
        let back = IstioCertificateRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, req);
    }

    #[test]
    fn cert_chain_is_repeated_field_one() {
        let resp = IstioCertificateResponse {
            cert_chain: vec!["leaf".into(), "root".into()],
        };
        let bytes = resp.encode_to_vec();
        assert_eq!(&bytes[..6], &[0x0a, 0x04, b'l', b'e', b'a', b'f']);
        assert_eq!(&bytes[6..8], &[0x0a, 0x04]);
    }

    #[test]
    fn service_path_is_istios() {
        // The generated client names the method by its full gRPC path.
        let src = include_str!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        assert!(
            src.contains("/istio.v1.auth.IstioCertificateService/CreateCertificate"),
            "generated code lacks Istio's method path"
        );
    }
}

/// What the discovery protocol carries, besides the messages themselves.
pub mod xds {
    /// One resource as served: its version and its encoded message.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Versioned {
        /// Hex FNV-1a of the encoded resource (the control plane's choice;
        /// a client compares it, never parses it).
        pub version: String,
        pub resource: prost_types::Any,
    }
}
