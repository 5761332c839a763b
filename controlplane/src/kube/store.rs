//! What the watchers have seen, and the config files built from it. Pure:
//! the watcher tasks turn API events into [`Msg`]s, [`Store::handle`]
//! folds them in, [`Store::files`] builds one synthetic file per object for
//! [`Config::apply`](crate::source::Config::apply).

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use super::convert::{self, NotWorkload};
use crate::source::FileRead;

/// What the control plane does with a watched resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read as a config document as is.
    Document,
    /// Becomes a `WorkloadEntry` when it is a workload.
    Pod,
    /// Gives its pods their locality.
    Node,
    /// Gives pod addresses their readiness.
    Slice,
}

/// A watched resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// A custom resource: its absence (404) means "not installed", which
    /// is an empty set, not an error.
    pub optional: bool,
    pub role: Role,
}

impl Source {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn core(kind: &'static str, plural: &'static str, role: Role) -> Source {
    Source {
        group: "",
        version: "v1",
        kind,
        plural,
        optional: false,
        role,
    }
}

const fn crd(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Source {
    Source {
        group,
        version,
        kind,
        plural,
        optional: true,
        role: Role::Document,
    }
}

/// Everything the Kubernetes config source watches.
pub const SOURCES: [Source; 13] = [
    core("Namespace", "namespaces", Role::Document),
    core("Service", "services", Role::Document),
    core("Pod", "pods", Role::Pod),
    core("Node", "nodes", Role::Node),
    Source {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        optional: false,
        role: Role::Slice,
    },
    crd(
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    crd(
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        "workloadentries",
    ),
    crd(
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    crd(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    crd("networking.istio.io", "v1", "Sidecar", "sidecars"),
    crd(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    crd(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    crd(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "ServiceExport",
        "serviceexports",
    ),
];

/// An object's namespace (empty when cluster-scoped) and name.
pub type Key = (String, String);

/// One object as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Document(Value),
    Pod(Box<Pod>),
    Node(Box<Node>),
    Slice(Box<EndpointSlice>),
    /// The object could not be read as its kind; rejected with this reason.
    Invalid(String),
}

/// Reads one object as served by the API (a JSON mapping) for `source`.
pub fn receive(source: &Source, served: Value) -> Object {
    let doc = match convert::document(&source.api_version(), source.kind, served) {
        Ok(d) => d,
        Err(reason) => return Object::Invalid(reason.to_string()),
    };
    fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<Box<T>, serde_json::Error> {
        serde_json::from_value(doc).map(Box::new)
    }
    let read = match source.role {
        Role::Document => Ok(Object::Document(doc)),
        Role::Pod => typed(doc).map(Object::Pod),
        Role::Node => typed(doc).map(Object::Node),
        Role::Slice => typed(doc).map(Object::Slice),
    };
    read.unwrap_or_else(|e| Object::Invalid(format!("not a valid {}: {e}", source.kind)))
}

/// An event of one watcher (by index into [`SOURCES`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// A (re)list starts: the objects that follow replace the current set.
    Init(usize),
    InitApply(usize, Key, Object),
    /// The (re)list is complete.
    InitDone(usize),
    Apply(usize, Key, Object),
    Delete(usize, Key),
    /// The resource is not served (CRD not installed): an empty set.
    Missing(usize),
    /// The watch failed; the watcher retries with backoff.
    Failed(usize, String),
}

#[derive(Debug, Default)]
struct SourceState {
    objects: BTreeMap<Key, Object>,
    /// Objects of a (re)list in progress.
    listing: Option<BTreeMap<Key, Object>>,
    synced: bool,
    last_error: Option<String>,
}

/// What the watchers have seen of every source.
#[derive(Debug)]
pub struct Store {
    sources: Vec<(Source, SourceState)>,
}

impl Store {
    /// An empty store of these sources, none synced yet.
    pub fn new(sources: &[Source]) -> Store {
        Store {
            sources: sources
                .iter()
                .map(|s| (*s, SourceState::default()))
                .collect(),
        }
    }

    /// Folds in one event. Returns whether the objects changed.
    pub fn handle(&mut self, msg: Msg) -> bool {
        let index = match &msg {
            Msg::Init(i)
            | Msg::InitApply(i, ..)
            | Msg::InitDone(i)
            | Msg::Apply(i, ..)
            | Msg::Delete(i, _)
            | Msg::Missing(i)
            | Msg::Failed(i, _) => *i,
        };
        let Some((_, state)) = self.sources.get_mut(index) else {
            return false;
        };
        match msg {
            Msg::Init(_) => {
                state.listing = Some(BTreeMap::new());
                false
            }
            Msg::InitApply(_, key, object) => {
                state
                    .listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, object);
                false
            }
            Msg::InitDone(_) => {
                let listed = state.listing.take().unwrap_or_default();
                state.synced = true;
                state.last_error = None;
                let changed = listed != state.objects;
                state.objects = listed;
                changed
            }
            Msg::Apply(_, key, object) => state.objects.insert(key, object.clone()) != Some(object),
            Msg::Delete(_, key) => state.objects.remove(&key).is_some(),
            Msg::Missing(_) => {
                state.listing = None;
                state.synced = true;
                state.last_error = None;
                let changed = !state.objects.is_empty();
                state.objects.clear();
                changed
            }
            Msg::Failed(_, error) => {
                state.last_error = Some(error);
                false
            }
        }
    }

    /// Whether every source has been listed (or found missing) once.
    pub fn synced(&self) -> bool {
        self.sources.iter().all(|(_, s)| s.synced)
    }

    /// The sources not listed yet, with their last error when any.
    pub fn pending(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter(|(_, s)| !s.synced)
            .map(|(src, s)| match &s.last_error {
                Some(e) => format!("{} {} ({e})", src.api_version(), src.kind),
                None => format!("{} {}", src.api_version(), src.kind),
            })
            .collect()
    }

    fn of_role(&self, role: Role) -> impl Iterator<Item = (&Source, &Key, &Object)> {
        self.sources
            .iter()
            .filter(move |(src, _)| src.role == role)
            .flat_map(|(src, s)| s.objects.iter().map(move |(k, o)| (src, k, o)))
    }

    /// One synthetic file per config object (`kube://<kind>/<ns>/<name>`):
    /// documents as they are, pods that are workloads as `WorkloadEntry`
    /// documents (under `kube://Pod/...`), objects that could not be read
    /// as rejections. Also returns, for debugging, the pods that are not
    /// workloads and why.
    pub fn files(
        &self,
        cluster: &str,
        network: &str,
    ) -> (BTreeMap<PathBuf, FileRead>, Vec<(Key, NotWorkload)>) {
        let mut files = BTreeMap::new();
        let mut skipped = Vec::new();
        let invalid = |src: &Source, (ns, name): &Key, reason: &str| {
            (
                convert::object_file(src.kind, ns, name),
                Err(reason.to_string()),
            )
        };
        for (src, key, object) in self.of_role(Role::Document) {
            let (file, read) = match object {
                Object::Document(doc) => (
                    convert::object_file(src.kind, &key.0, &key.1),
                    Ok(vec![doc.clone()]),
                ),
                Object::Invalid(reason) => invalid(src, key, reason),
                _ => continue,
            };
            files.insert(file, read);
        }
        let nodes: BTreeMap<&str, &Node> = self
            .of_role(Role::Node)
            .filter_map(|(_, (_, name), o)| match o {
                Object::Node(n) => Some((name.as_str(), &**n)),
                _ => None,
            })
            .collect();
        let readiness =
            convert::slice_readiness(self.of_role(Role::Slice).filter_map(|(_, _, o)| match o {
                Object::Slice(s) => Some(&**s),
                _ => None,
            }));
        for (src, key, object) in self.of_role(Role::Pod) {
            let pod = match object {
                Object::Pod(p) => p,
                Object::Invalid(reason) => {
                    let (file, read) = invalid(src, key, reason);
                    files.insert(file, read);
                    continue;
                }
                _ => continue,
            };
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .and_then(|n| nodes.get(n).copied());
            let slice_ready = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .and_then(|ip| readiness.get(&(key.0.clone(), ip)).copied());
            match convert::pod_workload(pod, node, slice_ready, cluster, network) {
                Ok(doc) => {
                    files.insert(
                        convert::object_file(src.kind, &key.0, &key.1),
                        Ok(vec![doc]),
                    );
                }
                Err(why) => skipped.push((key.clone(), why)),
            }
        }
        (files, skipped)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use serde_json::json;

    use super::*;
    use crate::source::Config;

    fn index(kind: &str) -> usize {
        SOURCES.iter().position(|s| s.kind == kind).unwrap()
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_string(), name.to_string())
    }

    fn obj(kind: &str, served: Value) -> Object {
        receive(&SOURCES[index(kind)], served)
    }

    fn pod(name: &str, ip: &str, node: &str) -> Object {
        obj(
            "Pod",
            json!({"metadata": {"name": name, "namespace": "ns", "labels": {"app": "a"}},
                   "spec": {"nodeName": node, "containers": []},
                   "status": {"phase": "Running", "podIP": ip,
                              "conditions": [{"type": "Ready", "status": "True"}]}}),
        )
    }

    fn list(store: &mut Store, kind: &str, items: Vec<(Key, Object)>) {
        let i = index(kind);
        store.handle(Msg::Init(i));
        for (k, o) in items {
            store.handle(Msg::InitApply(i, k, o));
        }
        store.handle(Msg::InitDone(i));
    }

    fn synced_store() -> Store {
        let mut s = Store::new(&SOURCES);
        for i in 0..SOURCES.len() {
            s.handle(Msg::Missing(i));
        }
        s
    }

    #[test]
    fn synced_once_every_source_is_listed_or_missing() {
        let mut s = Store::new(&SOURCES);
        assert!(!s.synced());
        for source in &SOURCES[..SOURCES.len() - 1] {
            list(&mut s, source.kind, vec![]);
        }
        let last = SOURCES.len() - 1;
        s.handle(Msg::Failed(last, "connection refused".into()));
        assert_eq!(
            s.pending(),
            vec!["multicluster.x-k8s.io/v1alpha1 ServiceExport (connection refused)"]
        );
        s.handle(Msg::Missing(last));
        assert!(s.synced());
        assert!(s.pending().is_empty());
    }

    #[test]
    fn a_relist_replaces_the_set_and_reports_whether_it_changed() {
        let mut s = synced_store();
        let svc = |name: &str| {
            (
                key("ns", name),
                obj(
                    "Service",
                    json!({"metadata": {"name": name, "namespace": "ns"}}),
                ),
            )
        };
        let i = index("Service");
        list(&mut s, "Service", vec![svc("a"), svc("b")]);
        s.handle(Msg::Init(i));
        s.handle(Msg::InitApply(i, svc("a").0, svc("a").1));
        assert!(s.handle(Msg::InitDone(i)), "b went away during the relist");
        assert!(!s.handle(Msg::Apply(i, svc("a").0, svc("a").1)), "no-op");
        assert!(s.handle(Msg::Delete(i, key("ns", "a"))));
        assert!(!s.handle(Msg::Delete(i, key("ns", "a"))));
    }

    #[test]
    fn files_from_documents_pods_nodes_and_slices() {
        let mut s = synced_store();
        list(
            &mut s,
            "DestinationRule",
            vec![(
                key("ns", "Bad_Name"),
                obj(
                    "DestinationRule",
                    json!({"metadata": {"name": "Bad_Name", "namespace": "ns"}}),
                ),
            )],
        );
        list(
            &mut s,
            "Node",
            vec![(
                key("", "n1"),
                obj(
                    "Node",
                    json!({"metadata": {"name": "n1", "labels": {
                    "topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": "z"}}}),
                ),
            )],
        );
        list(
            &mut s,
            "EndpointSlice",
            vec![(
                key("ns", "a-xyz"),
                obj(
                    "EndpointSlice",
                    json!({"metadata": {"name": "a-xyz", "namespace": "ns"},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]}),
                ),
            )],
        );
        list(
            &mut s,
            "Pod",
            vec![
                (key("ns", "p1"), pod("p1", "10.0.0.1", "n1")),
                (key("ns", "p2"), pod("p2", "10.0.0.2", "n1")),
                (
                    key("ns", "p3"),
                    obj("Pod", json!({"metadata": {"name": "p3"}, "spec": 5})),
                ),
            ],
        );
        let (files, skipped) = s.files("c1", "net1");
        assert_eq!(skipped, vec![(key("ns", "p2"), NotWorkload::NotReady)]);
        let config = Config::default().apply(&files);
        let keys: Vec<String> = config.objects.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, vec!["WorkloadEntry ns/p1"]);
        let we = &config.objects.values().next().unwrap();
        assert_eq!(we.file, PathBuf::from("kube://Pod/ns/p1"));
        assert_eq!(we.value["spec"]["locality"], "r/z");
        let rejections: Vec<String> = config.rejections.iter().map(|r| r.to_string()).collect();
        assert_eq!(rejections.len(), 2, "{rejections:?}");
        assert!(
            rejections[0].starts_with(
                "kube://DestinationRule/ns/Bad_Name: DestinationRule ns/Bad_Name: invalid: metadata.name"
            ),
            "{rejections:?}"
        );
        assert!(
            rejections[1].starts_with("kube://Pod/ns/p3: not a valid Pod"),
            "{rejections:?}"
        );
    }
}
