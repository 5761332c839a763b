//! The mesh model of strait, and what an importing cluster is given.
//!
//! No I/O lives here: the broker and the control plane feed in what they
//! read and get back typed, validated values and ready-to-apply objects.
//!
//! - [`mesh`]: clusters ([`ClusterInfo`]: name, [`Network`], [`Locality`],
//!   east-west [`GatewayAddress`]es, trust domain), services ([`ServiceKey`],
//!   [`ServicePort`], [`Protocol`]), who may import them ([`ExportTo`],
//!   [`ExportTarget`]), and what a cluster publishes per exported service
//!   ([`ExportedService`], seen by an importer as a [`RemoteService`]) or has
//!   locally ([`LocalService`]). Validating constructors; deterministic
//!   serde forms.
//! - [`export`]: the export signal. `strait.io/export: "true"` on a
//!   `Service` or `ServiceEntry`, or an MCS `ServiceExport`, exports a
//!   service; `strait.io/export-to: "west,mesh:partner"` limits who may
//!   import it. Bad values are errors that name the object, the annotation
//!   and the value, and export nothing.
//! - [`imports`]: [`import_objects`] turns the exports an importer receives
//!   into Istio `ServiceEntry` (host `<svc>.<ns>.svc.clusterset.local`, one
//!   endpoint per exporting cluster, through its east-west gateway or, on a
//!   shared network, straight to its pods), `WorkloadEntry` objects (where
//!   the service also exists locally, so that the local Service selects the
//!   remote endpoints) and MCS `ServiceImport`s, plus warnings for what it
//!   had to leave out. [`ImportObjects::to_yaml`] writes them as one
//!   multi-document YAML stream that passes the Istio and MCS CRD schemas.
//! - [`istio`]: the Istio policy kinds the sidecar implements
//!   (`VirtualService`, `DestinationRule`, `PeerAuthentication`,
//!   `AuthorizationPolicy`, `Sidecar`): serde types of their `spec` and
//!   validation with errors that name the field path ([`istio::parse`]).
//! - [`objects`]: the serde types of those Istio and MCS objects.
//! - [`local`]: what a cluster's own config exports
//!   ([`local::local_exports`]: exported `Service`s and the
//!   `WorkloadEntry`s they select).
//! - [`names`]: Kubernetes name rules and bounded generated names.
//! - [`request_path`]: HTTP request path normalization as Istio's
//!   `meshConfig.pathNormalization` sets Envoy up (`BASE` by default), so
//!   that policy, routing and the app see one path.
//! - [`validation`]: whole-object validation of the Kubernetes-style
//!   objects of a config (Kubernetes' and Istio's rules: names, labels,
//!   ports, protocols, addresses), with errors that name every bad field.
//! - [`probe`]: the app probes an injected sidecar answers for the kubelet
//!   under transparent interception ([`probe::AppProbers`]).
//! - [`sni`]: Istio's SNI codec (`outbound_.<port>_.<subset>_.<host>`),
//!   the one the sidecar and the east-west gateway both use.
//!
//! # Object names
//!
//! Generated objects live in the service's namespace `<ns>` and carry
//! `app.kubernetes.io/managed-by: strait` and `strait.io/service: <svc>`:
//!
//! | object | name |
//! |---|---|
//! | ServiceEntry | `strait-<svc>` |
//! | WorkloadEntry (via a gateway) | `strait-<svc>.<cluster>` |
//! | WorkloadEntry (a pod on a shared network) | `strait-<svc>.<cluster>.<ip with '-'>` |
//! | ServiceImport | `<svc>` |
//!
//! Service and cluster names are DNS labels, so the `.` keeps the names of
//! different (service, cluster) pairs apart. A name longer than 63
//! characters is cut to 52 and ends in `-` and 10 hex digits of a hash of
//! the full name ([`names::bounded_name`]), so every generated name is also
//! a valid label value. A cluster of another trust domain (a peered mesh)
//! appears as `<cluster>-<8 hex digits of its trust domain's hash>`. The
//! [`imports`] module documentation has the full rules.

pub mod export;
pub mod imports;
pub mod istio;
pub mod local;
pub mod mesh;
pub mod names;
pub mod objects;
pub mod probe;
pub mod request_path;
pub mod sni;
pub mod validation;

pub use export::{ExportError, ObjectKind, ObjectRef, export_decision};
pub use imports::{ImportObjects, ImportWarning, import_objects};
pub use mesh::{
    ClusterInfo, ExportTarget, ExportTo, ExportedService, GatewayAddress, LocalService, Locality,
    LocalityEndpoints, ModelError, Network, Protocol, RemoteService, ServiceKey, ServicePort,
};
