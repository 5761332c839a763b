//! The directory config source: every `*.yaml` file of a config directory,
//! multi-document, Kubernetes-style objects. Each object is judged on its
//! own and as a whole, by the rules the Kubernetes API server and Istio's
//! webhook apply to its kind ([`strait_model::validation`]): a bad object
//! (or a file that does not parse) is rejected with its file, object and
//! every bad field with its value, and the rest applies; the last good
//! version of a rejected object stays in force.
//!
//! Reading is separate from judging: [`parse_file`] turns one file's text
//! into documents, [`Config::apply`] folds a new read of the directory into
//! the previous config. Both are pure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use strait_model::validation::{InvalidObject, validate_object};

/// The kinds the control plane understands, by `apiVersion` group and kind.
const KNOWN: [(&str, &str); 11] = [
    ("", "Service"),
    ("", "Namespace"),
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "WorkloadEntry"),
    ("networking.istio.io", "VirtualService"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "Sidecar"),
    ("security.istio.io", "PeerAuthentication"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("multicluster.x-k8s.io", "ServiceExport"),
    ("multicluster.x-k8s.io", "ServiceImport"),
];

/// Which object: kind, namespace and name (cluster-scoped objects have an
/// empty namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One accepted object and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub file: PathBuf,
    pub value: Value,
}

/// A rejection: the file, the object when known, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub file: PathBuf,
    pub object: Option<ObjectKey>,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// What one file said: its documents, or why it could not be read at all.
pub type FileRead = Result<Vec<Value>, String>;

/// The default cap on one config file: 3 MiB, the Kubernetes API server's
/// limit on one request body (an object in etcd may be 1.5 MiB). A
/// cluster's config files are kilobytes; a file of this size already holds
/// some ten thousand objects.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 3 * 1024 * 1024;
/// The most YAML documents (objects) one file may hold.
pub const MAX_DOCUMENTS: usize = 10_000;
/// The most YAML nodes (mappings, sequences, scalars) one file may hold.
pub const MAX_NODES: usize = 500_000;
/// The deepest nesting of mappings and sequences (Kubernetes objects nest
/// a dozen levels).
pub const MAX_DEPTH: usize = 64;
/// The most aliases (`*ref`) one file may use.
pub const MAX_ALIASES: usize = 10_000;
/// The most nodes aliases may expand to in all (what a "billion laughs"
/// multiplies).
pub const MAX_ALIAS_EXPANSION: usize = 20_000;

/// What one config file may cost: its size is checked before it is read,
/// and the YAML budget (documents, nodes, depth, aliases and what they
/// expand to) while it is parsed, so that a huge file or a YAML bomb is
/// rejected by name without the memory it would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest file read, in bytes.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

impl Limits {
    fn too_large(&self, size: u64) -> String {
        format!(
            "{size} bytes, over the limit of {} bytes for one config file \
             (--max-config-file-bytes); not read",
            self.max_file_bytes
        )
    }
}

/// The parser's options: strait's YAML budget.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_nodes = MAX_NODES;
    budget.max_events = 2 * MAX_NODES;
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    budget.max_recorded_anchor_events = MAX_ALIAS_EXPANSION;
    budget.max_total_scalar_bytes = usize::try_from(DEFAULT_MAX_FILE_BYTES).unwrap_or(usize::MAX);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // One line per error (it goes into a log line); the message has the
    // line and column.
    options.with_snippet = false;
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_EXPANSION;
    options
}

/// The error a parser error wraps (with its location or alias context).
fn innermost(mut e: &serde_saphyr::Error) -> &serde_saphyr::Error {
    while let serde_saphyr::Error::WithSnippet { error, .. }
    | serde_saphyr::Error::AliasError { error, .. } = e
    {
        e = error;
    }
    e
}

/// Parses one file's text into documents (empty documents are skipped),
/// within [`Limits::default`].
pub fn parse_file(text: &str) -> FileRead {
    parse_file_with(text, &Limits::default())
}

/// Parses one file's text into documents (empty documents are skipped):
/// refused when the text is larger than `limits` allow or the YAML goes
/// over the budget.
pub fn parse_file_with(text: &str, limits: &Limits) -> FileRead {
    let size = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if size > limits.max_file_bytes {
        return Err(limits.too_large(size));
    }
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(
        |e| match innermost(&e) {
            serde_saphyr::Error::Budget { .. }
            | serde_saphyr::Error::AliasReplayLimitExceeded { .. }
            | serde_saphyr::Error::AliasReplayStackDepthExceeded { .. } => format!(
                "over the YAML budget of a config file ({MAX_DOCUMENTS} documents, \
                 {MAX_NODES} nodes, nesting {MAX_DEPTH} deep, {MAX_ALIASES} aliases \
                 expanding to {MAX_ALIAS_EXPANSION} nodes): {e}"
            ),
            _ => format!("not valid YAML: {e}"),
        },
    )?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Reads and parses one file within `limits`: a file larger than the limit
/// is not read at all (its size is checked first, and the read stops one
/// byte past the limit in case it grows meanwhile).
pub fn read_file(path: &Path, limits: &Limits) -> FileRead {
    use std::io::Read;
    let unreadable = |e: std::io::Error| format!("unreadable: {e}");
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    if size > limits.max_file_bytes {
        return Err(limits.too_large(size));
    }
    let mut bytes = Vec::new();
    file.take(limits.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > limits.max_file_bytes {
        return Err(limits.too_large(read));
    }
    let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    parse_file_with(&text, limits)
}

/// Why one document of a config is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("apiVersion and kind are required")]
    NoTypeMeta,
    #[error("{api_version} {kind} is not a kind strait reads")]
    UnknownKind { api_version: String, kind: String },
    #[error("spec must be a mapping")]
    SpecNotMapping,
    /// The object breaks Kubernetes' or Istio's rules for its kind: every
    /// bad field with its value.
    #[error("invalid: {0}")]
    Invalid(#[from] InvalidObject),
}

/// Checks one whole document by the rules of its kind
/// ([`strait_model::validation`]); returns its key. A document that fails
/// is refused as a whole, so the last good version of its object stays in
/// force ([`Config::apply`]).
pub fn check(doc: &Value) -> Result<ObjectKey, (Option<ObjectKey>, CheckError)> {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    if api.is_empty() || kind.is_empty() {
        return Err((None, CheckError::NoTypeMeta));
    }
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cluster_scoped = kind == "Namespace";
    let namespace = if cluster_scoped {
        String::new()
    } else {
        doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    };
    let key = ObjectKey {
        kind: kind.to_string(),
        namespace,
        name,
    };
    let group = api.rsplit_once('/').map_or("", |(g, _)| g);
    if !KNOWN.iter().any(|(g, k)| *g == group && *k == kind) {
        return Err((
            Some(key),
            CheckError::UnknownKind {
                api_version: api.to_string(),
                kind: kind.to_string(),
            },
        ));
    }
    if !doc["spec"].is_null() && !doc["spec"].is_object() {
        return Err((Some(key), CheckError::SpecNotMapping));
    }
    match validate_object(doc) {
        Ok(()) => Ok(key),
        Err(e) => Err((Some(key), e.into())),
    }
}

/// The config in force: accepted objects, and the current rejections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub objects: BTreeMap<ObjectKey, Object>,
    pub rejections: Vec<Rejection>,
}

impl Config {
    /// Folds a new read of the directory (every file and what it said)
    /// into this config. Valid objects replace their previous versions;
    /// objects no longer in any file are removed; a rejected object (or
    /// the objects of a file that no longer parses) keeps its last good
    /// version; a key defined twice keeps the first file's version.
    pub fn apply(&self, read: &BTreeMap<PathBuf, FileRead>) -> Config {
        let mut objects = BTreeMap::new();
        let mut rejections = Vec::new();
        let mut keep: BTreeSet<ObjectKey> = BTreeSet::new();
        for (file, result) in read {
            let docs = match result {
                Ok(d) => d,
                Err(reason) => {
                    rejections.push(Rejection {
                        file: file.clone(),
                        object: None,
                        reason: reason.clone(),
                    });
                    // Everything that came from this file stays as it was.
                    keep.extend(
                        self.objects
                            .iter()
                            .filter(|(_, o)| &o.file == file)
                            .map(|(k, _)| k.clone()),
                    );
                    continue;
                }
            };
            for doc in docs {
                match check(doc) {
                    Ok(key) => {
                        if let Some(prev) = objects.get(&key).map(|o: &Object| o.file.clone()) {
                            rejections.push(Rejection {
                                file: file.clone(),
                                object: Some(key),
                                reason: format!("already defined in {}", prev.display()),
                            });
                            continue;
                        }
                        objects.insert(
                            key,
                            Object {
                                file: file.clone(),
                                value: doc.clone(),
                            },
                        );
                    }
                    Err((key, reason)) => {
                        if let Some(k) = &key {
                            keep.insert(k.clone());
                        }
                        rejections.push(Rejection {
                            file: file.clone(),
                            object: key,
                            reason: reason.to_string(),
                        });
                    }
                }
            }
        }
        for k in keep {
            if !objects.contains_key(&k)
                && let Some(prev) = self.objects.get(&k)
            {
                objects.insert(k, prev.clone());
            }
        }
        Config {
            objects,
            rejections,
        }
    }
}

/// Reads every `*.yaml`/`*.yml` file directly in `dir` (sorted; the
/// `imported/` subdirectory, where imports are written, is not a source),
/// each within `limits`.
pub fn read_dir(dir: &Path, limits: &Limits) -> std::io::Result<BTreeMap<PathBuf, FileRead>> {
    read_dir_with(dir, |path| read_file(path, limits))
}

/// [`read_dir`] with each file read by `read`.
pub fn read_dir_with(
    dir: &Path,
    mut read: impl FnMut(&Path) -> FileRead,
) -> std::io::Result<BTreeMap<PathBuf, FileRead>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        if !yaml || !path.is_file() {
            continue;
        }
        let result = read(&path);
        out.insert(path, result);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(files: &[(&str, &str)]) -> BTreeMap<PathBuf, FileRead> {
        files
            .iter()
            .map(|(f, t)| (PathBuf::from(f), parse_file(t)))
            .collect()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec: {ports: [{port: 9080}]}\n";

    #[test]
    fn good_objects_apply_and_bad_ones_are_named() {
        let c = Config::default().apply(&read(&[(
            "a.yaml",
            &format!("{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: Bad_Name}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n"),
        )]));
        assert_eq!(c.objects.len(), 1);
        assert_eq!(c.rejections.len(), 2);
        let text: Vec<String> = c.rejections.iter().map(|r| r.to_string()).collect();
        assert!(
            text[0].contains("a.yaml: Service default/Bad_Name: invalid: metadata.name"),
            "{text:?}"
        );
        assert!(
            text[1].contains("apps/v1 Deployment is not a kind strait reads"),
            "{text:?}"
        );
    }

    #[test]
    fn a_rejected_object_keeps_its_last_good_version() {
        let good = Config::default().apply(&read(&[("a.yaml", SVC)]));
        let broken = SVC.replace("spec: {ports: [{port: 9080}]}", "spec: [1, 2]");
        let next = good.apply(&read(&[("a.yaml", &broken)]));
        assert_eq!(next.objects, good.objects, "last good version stays");
        assert_eq!(next.rejections.len(), 1);
        assert!(next.rejections[0].reason.contains("spec must be a mapping"));
    }

    #[test]
    fn an_unparsable_file_keeps_its_objects_and_a_deleted_one_removes_them() {
        let good = Config::default().apply(&read(&[("a.yaml", SVC), ("b.yaml", "")]));
        let next = good.apply(&read(&[("a.yaml", "key: [unclosed"), ("b.yaml", "")]));
        assert_eq!(next.objects, good.objects);
        assert!(
            next.rejections[0]
                .to_string()
                .starts_with("a.yaml: not valid YAML"),
            "{:?}",
            next.rejections
        );
        let gone = next.apply(&read(&[("b.yaml", "")]));
        assert!(gone.objects.is_empty());
        assert!(gone.rejections.is_empty());
    }

    #[test]
    fn duplicates_keep_the_first_file() {
        let c = Config::default().apply(&read(&[("a.yaml", SVC), ("b.yaml", SVC)]));
        assert_eq!(c.objects.len(), 1);
        assert_eq!(
            c.objects.values().next().unwrap().file,
            PathBuf::from("a.yaml")
        );
        assert!(
            c.rejections[0]
                .to_string()
                .contains("already defined in a.yaml")
        );
    }

    #[test]
    fn shapes() {
        let ns: Value = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bookinfo"}});
        assert_eq!(check(&ns).unwrap().to_string(), "Namespace bookinfo");
        let no_kind: Value = serde_json::json!({"apiVersion": "v1"});
        assert_eq!(check(&no_kind).unwrap_err().1, CheckError::NoTypeMeta);
        let bad_ns: Value = serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "x", "namespace": "Bad"}});
        assert!(
            check(&bad_ns)
                .unwrap_err()
                .1
                .to_string()
                .contains("metadata.namespace: Invalid value: \"Bad\""),
        );
    }

    #[test]
    fn a_file_over_the_size_limit_is_not_read_and_keeps_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, SVC).unwrap();
        let limits = Limits {
            max_file_bytes: 1024,
        };
        let good = Config::default().apply(&read_dir(dir.path(), &limits).unwrap());
        assert_eq!(good.objects.len(), 1);
        // The same object, padded past the limit with a comment.
        std::fs::write(&path, format!("{SVC}#{}\n", "x".repeat(2000))).unwrap();
        let next = good.apply(&read_dir(dir.path(), &limits).unwrap());
        assert_eq!(next.objects, good.objects, "last good version stays");
        let r = next.rejections[0].to_string();
        assert!(r.contains("a.yaml: "), "{r}");
        assert!(
            r.contains(
                "bytes, over the limit of 1024 bytes for one config file (--max-config-file-bytes)"
            ),
            "{r}"
        );
        // Text handed over directly is held to the same limit.
        let err = parse_file_with(&"#".repeat(1025), &limits).unwrap_err();
        assert!(
            err.starts_with("1025 bytes, over the limit of 1024"),
            "{err}"
        );
        assert!(parse_file_with(&"#".repeat(1024), &limits).is_ok());
        // Not text.
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        let r = read_file(&path, &limits).unwrap_err();
        assert!(r.starts_with("not UTF-8"), "{r}");
    }

    /// The classic "billion laughs": each level holds ten aliases of the
    /// one before, so `levels` levels expand to 10^levels strings.
    fn laughs(levels: usize) -> String {
        let mut y = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..levels {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            y.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        y
    }

    #[test]
    fn yaml_bombs_are_refused_within_the_budget() {
        // A few levels of aliases are fine.
        assert!(parse_file(&laughs(3)).is_ok());
        for (what, text) in [
            ("billion laughs", laughs(9)),
            (
                "deep nesting",
                format!("{}{}", "[".repeat(200), "]".repeat(200)),
            ),
            ("document storm", "---\na: 1\n".repeat(MAX_DOCUMENTS + 1)),
            (
                "many aliases",
                format!("a: &a x\nb: [{}]\n", vec!["*a"; MAX_ALIASES + 1].join(",")),
            ),
        ] {
            let started = std::time::Instant::now();
            let err = parse_file(&text).unwrap_err();
            assert!(
                err.starts_with("over the YAML budget of a config file"),
                "{what}: {err}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{what}: refused only after {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn reads_yaml_files_of_a_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not config").unwrap();
        std::fs::create_dir(dir.path().join("imported")).unwrap();
        std::fs::write(dir.path().join("imported/x.yaml"), SVC).unwrap();
        let r = read_dir(dir.path(), &Limits::default()).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(Config::default().apply(&r).objects.len(), 1);
    }
}
