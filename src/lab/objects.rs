//! `lab apply`/`delete`, object by object as `kubectl apply`/`delete` are.
//!
//! A lab cluster's config directory holds one file per object, named by
//! the object's identity (`virtualservice.demo.echo.yaml`: kind,
//! namespace, name), so applying an object replaces the object of the
//! same kind, namespace and name whichever file it came from, and
//! deleting removes the objects by identity. `lab up` writes the demo's
//! objects the same way.
//!
//! After writing, `apply` waits (bounded) until the control plane serving
//! the cluster has read the new files, on its `/debug/config`: an object is
//! in force when it is listed from its file with the content written; it
//! was rejected when a rejection names its file and identity. A rejected
//! object's file is put back as it was (the control plane keeps the last
//! good version in force, and the directory says the same), and `apply`
//! fails with the control plane's reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use strait_controlplane::remote::REMOTE_KINDS;
use strait_controlplane::source::{ObjectKey, check, parse_file};

use super::plan::{Cluster, Lab};
use super::run;
use crate::cli::{Rejected, UsageError};

/// How long `apply`/`delete` wait for the control plane to read a change
/// (it polls its directory every 200 ms).
pub const CONFIRM_DEADLINE: Duration = Duration::from_secs(20);
/// How long `apply` waits for a rejected object's file, put back, to be
/// read again.
const RESTORE_DEADLINE: Duration = Duration::from_secs(2);

/// The file holding one object: `kind.namespace.name.yaml` (kind in lower
/// case; `kind.name.yaml` for a cluster-scoped object). Unique per
/// identity: a namespace has no dot, and the key passed [`check`], so its
/// name is a DNS subdomain (no `/`, no `..`).
pub fn object_file(config_dir: &Path, key: &ObjectKey) -> PathBuf {
    let kind = key.kind.to_ascii_lowercase();
    let name = if key.namespace.is_empty() {
        format!("{kind}.{}.yaml", key.name)
    } else {
        format!("{kind}.{}.{}.yaml", key.namespace, key.name)
    };
    config_dir.join(name)
}

/// One document of an input file: its identity and content, or why it
/// cannot be applied at all.
type Doc = Result<(ObjectKey, Value), String>;

/// Splits a YAML file into objects, each checked as the control plane
/// checks it (kind known, names valid).
pub fn read_objects(file: &Path) -> Result<Vec<Doc>> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let docs = parse_file(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    if docs.is_empty() {
        bail!("{}: no objects in it", file.display());
    }
    Ok(docs
        .into_iter()
        .map(|doc| match check(&doc) {
            Ok(key) => Ok((key, doc)),
            Err((Some(key), reason)) => Err(format!("{key}: {reason}")),
            Err((None, reason)) => Err(reason.to_string()),
        })
        .collect())
}

/// Writes `yaml`'s objects into `config_dir`, one file each (no waiting:
/// `lab up` does so before the control plane starts).
pub fn write_objects(config_dir: &Path, yaml: &str) -> Result<()> {
    let docs = parse_file(yaml).map_err(|e| anyhow!("lab config: {e}"))?;
    for doc in docs {
        let key = check(&doc).map_err(|(_, e)| anyhow!("lab config: {e}"))?;
        write_atomic(&object_file(config_dir, &key), &to_yaml(&doc)?)?;
    }
    Ok(())
}

fn to_yaml(doc: &Value) -> Result<String> {
    serde_saphyr::to_string(doc).map_err(|e| anyhow!("cannot write YAML: {e}"))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    // Not `.yaml`, so the control plane never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

/// `cluster` of `lab`, or a usage error listing the lab's clusters.
pub fn find_cluster<'a>(lab: &'a Lab, cluster: &str) -> Result<&'a Cluster> {
    lab.cluster(cluster).ok_or_else(|| {
        let known: Vec<&str> = lab.clusters.iter().map(|c| c.name.as_str()).collect();
        UsageError(format!(
            "no cluster {cluster:?} in this lab; its clusters: {}",
            known.join(", ")
        ))
        .into()
    })
}

/// The control plane serving `c` (its own; a remote's primary's) and the
/// URL of its `/debug/config`, with the network namespace it runs in.
fn debug_url(lab: &Lab, c: &Cluster) -> Result<(String, Option<String>)> {
    let serving = if c.control_plane.is_some() {
        c
    } else {
        c.primary(lab)
            .ok_or_else(|| anyhow!("no control plane serves {}", c.name))?
    };
    // The debug listener is on loopback: the control plane's own loopback
    // address, or in netns mode the namespace's 127.0.0.1 (entered below).
    let host = match serving.netns {
        Some(_) => "127.0.0.1".to_string(),
        None => serving.cp_ip().to_string(),
    };
    Ok((
        format!("http://{host}:{}/debug/config", super::plan::DEBUG_PORT),
        serving.netns.clone(),
    ))
}

/// What the control plane says of one object of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// In force from this file with this content.
    InForce,
    /// Rejected from this file, with the reason.
    Rejected(String),
    /// In force from another file (not the lab's).
    Elsewhere(String),
    /// Not in force at all.
    Absent,
    /// In force from this file, with another content (the change is not
    /// read yet).
    Stale,
}

/// Judges one object in a `/debug/config` cluster entry.
pub fn seen(cluster: &Value, file: &Path, key: &ObjectKey, want: Option<&Value>) -> Seen {
    let file = file.display().to_string();
    let same_key = |o: &&Value| {
        o["kind"] == key.kind.as_str()
            && o["namespace"] == key.namespace.as_str()
            && o["name"] == key.name.as_str()
    };
    let objects = cluster["objects"].as_array().map_or(&[][..], Vec::as_slice);
    let rejected = cluster["rejected"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if let Some(r) = rejected.iter().filter(same_key).find(|r| r["file"] == file) {
        return Seen::Rejected(r["reason"].as_str().unwrap_or_default().to_string());
    }
    match objects.iter().find(same_key) {
        None => Seen::Absent,
        Some(o) if o["file"] != file => {
            Seen::Elsewhere(o["file"].as_str().unwrap_or_default().to_string())
        }
        Some(o) if want.is_none_or(|w| &o["value"] == w) => Seen::InForce,
        Some(_) => Seen::Stale,
    }
}

/// `/debug/config`'s entry for `cluster`.
fn debug_config(url: &str, netns: Option<&str>, cluster: &str) -> Result<Value> {
    let (code, body) = super::netns::within(netns, || run::http_get(url, Duration::from_secs(2)))?
        .ok_or_else(|| anyhow!("the control plane does not answer on {url}"))?;
    if code != 200 {
        bail!("{url}: HTTP {code}");
    }
    let doc: Value = serde_json::from_str(&body).map_err(|e| anyhow!("{url}: {e}"))?;
    Ok(doc["clusters"][cluster].clone())
}

/// Polls `/debug/config` until `done` says every object is settled, or the
/// deadline; the last answer.
fn wait_until(
    lab: &Lab,
    c: &Cluster,
    deadline: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Result<Value, String> {
    let (url, netns) = debug_url(lab, c).map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        let last = debug_config(&url, netns.as_deref(), &c.name);
        if let Ok(v) = &last
            && done(v)
        {
            return Ok(v.clone());
        }
        if start.elapsed() > deadline {
            return Err(match last {
                Ok(_) => format!(
                    "the control plane ({url}) did not read the change within {}s",
                    deadline.as_secs()
                ),
                Err(e) => format!("{e:#}"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `strait lab apply CLUSTER FILE`.
pub fn apply(dir: &Path, cluster: &str, file: &Path) -> Result<()> {
    let lab = super::read_lab(dir)?;
    let c = find_cluster(&lab, cluster)?;
    let docs = read_objects(file)?;
    if c.role == "remote" {
        let policy: Vec<String> = docs
            .iter()
            .flatten()
            .filter(|(k, _)| !REMOTE_KINDS.contains(&k.kind.as_str()))
            .map(|(k, _)| k.to_string())
            .collect();
        if !policy.is_empty() {
            let primary = c.primary(&lab).map_or("the primary", |p| p.name.as_str());
            return Err(UsageError(format!(
                "{cluster} is a remote cluster: its control plane is {primary}'s, which reads \
                 only {} objects from it and takes policy from {primary}'s own config. Apply \
                 {} to {primary} instead (`strait lab apply {primary} {}`)",
                REMOTE_KINDS.join(", "),
                policy.join(", "),
                file.display()
            ))
            .into());
        }
    }
    // Written, with what each file held before.
    let mut written: Vec<(ObjectKey, PathBuf, Value, Option<String>)> = Vec::new();
    let mut failed = Vec::new();
    for doc in docs {
        match doc {
            Ok((key, value)) => {
                let path = object_file(&c.config_dir, &key);
                let before = std::fs::read_to_string(&path).ok();
                write_atomic(&path, &to_yaml(&value)?)?;
                written.push((key, path, value, before));
            }
            Err(reason) => {
                println!("rejected: {reason}");
                failed.push(reason);
            }
        }
    }
    let settled = |v: &Value| {
        // Until the control plane has read a file, its object is absent,
        // stale or in force from another file; once read, it is in force
        // from it or rejected (a duplicate of another file's is too).
        written
            .iter()
            .all(|(k, p, w, _)| matches!(seen(v, p, k, Some(w)), Seen::InForce | Seen::Rejected(_)))
    };
    let config = wait_until(&lab, c, CONFIRM_DEADLINE, settled).map_err(|e| {
        anyhow!(
            "{} object(s) written to {cluster}'s config, not confirmed: {e}",
            written.len()
        )
    })?;
    let mut restored = Vec::new();
    for (key, path, value, before) in &written {
        match seen(&config, path, key, Some(value)) {
            Seen::InForce => {
                let how = match before {
                    None => "created",
                    Some(b) if to_yaml(value).ok().as_deref() == Some(b.as_str()) => "unchanged",
                    Some(_) => "configured",
                };
                println!("{key} {how}");
            }
            Seen::Rejected(reason) => {
                println!("{key} rejected: {reason}");
                failed.push(format!("{key}: {reason}"));
                match before {
                    Some(b) => write_atomic(path, b)?,
                    None => remove(path)?,
                }
                restored.push((key.clone(), path.clone(), before.clone()));
            }
            Seen::Elsewhere(_) | Seen::Stale | Seen::Absent => {}
        }
    }
    // The directory back as the control plane has it in force (so that a
    // restart does not bring the rejected version), and read again, so
    // that the next apply does not see this one's rejection. Bounded
    // short: when another file holds the object, the restored one stays
    // rejected.
    if !restored.is_empty() {
        let _ = wait_until(&lab, c, RESTORE_DEADLINE, |v| {
            restored.iter().all(|(k, p, before)| {
                let back = seen(v, p, k, None);
                match before {
                    Some(_) => back == Seen::InForce,
                    None => back == Seen::Absent || matches!(back, Seen::Elsewhere(_)),
                }
            })
        });
    }
    if !failed.is_empty() {
        return Err(Rejected(format!(
            "error: {} of the object(s) in {} not applied to {cluster} (the last good version \
             stays in force):\n  {}",
            failed.len(),
            file.display(),
            failed.join("\n  ")
        ))
        .into());
    }
    Ok(())
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// `strait lab delete CLUSTER FILE`: removes the file's objects by
/// identity (whatever their content), and waits until the control plane
/// no longer has them in force.
pub fn delete(dir: &Path, cluster: &str, file: &Path) -> Result<()> {
    let lab = super::read_lab(dir)?;
    let c = find_cluster(&lab, cluster)?;
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for doc in read_objects(file)? {
        match doc {
            Ok((key, _)) => {
                let path = object_file(&c.config_dir, &key);
                if path.exists() {
                    remove(&path)?;
                    removed.push((key, path));
                } else {
                    println!("{key} not found");
                    failed.push(format!("{key}: not found in {cluster}"));
                }
            }
            Err(reason) => failed.push(reason),
        }
    }
    let config = wait_until(&lab, c, CONFIRM_DEADLINE, |v| {
        removed
            .iter()
            .all(|(k, p)| !matches!(seen(v, p, k, None), Seen::InForce | Seen::Rejected(_)))
    })
    .map_err(|e| anyhow!("removed from {cluster}'s config, not confirmed: {e}"))?;
    for (key, path) in &removed {
        match seen(&config, path, key, None) {
            Seen::Elsewhere(f) => {
                println!("{key} deleted (still defined in {f})");
                failed.push(format!("{key}: still defined in {f}"));
            }
            _ => println!("{key} deleted"),
        }
    }
    if !failed.is_empty() {
        return Err(Rejected(format!(
            "error: {} of the object(s) in {} not deleted from {cluster}:\n  {}",
            failed.len(),
            file.display(),
            failed.join("\n  ")
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn key(kind: &str, ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn one_file_per_identity() {
        let d = Path::new("/c");
        assert_eq!(
            object_file(d, &key("VirtualService", "demo", "echo")),
            PathBuf::from("/c/virtualservice.demo.echo.yaml")
        );
        assert_eq!(
            object_file(d, &key("Namespace", "", "demo")),
            PathBuf::from("/c/namespace.demo.yaml")
        );
        // The separator is one no namespace holds: these two differ.
        assert_ne!(
            object_file(d, &key("Service", "a-b", "c")),
            object_file(d, &key("Service", "a", "b-c"))
        );
    }

    #[test]
    fn bad_objects_are_named_and_never_become_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in.yaml");
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Service\nmetadata: {name: ../../etc/x, namespace: demo}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: demo}\n\
             spec: {ports: [{port: 80}]}\n",
        )
        .unwrap();
        let docs = read_objects(&f).unwrap();
        assert!(docs[0].as_ref().unwrap_err().contains("metadata.name"));
        assert!(docs[1].as_ref().unwrap_err().contains("Deployment"));
        assert_eq!(docs[2].as_ref().unwrap().0, key("Service", "demo", "ok"));
        std::fs::write(&f, "kind: [").unwrap();
        assert!(read_objects(&f).unwrap_err().to_string().contains("YAML"));
        std::fs::write(&f, "---\n").unwrap();
        assert!(
            read_objects(&f)
                .unwrap_err()
                .to_string()
                .contains("no objects")
        );
    }

    #[test]
    fn written_objects_read_back_as_the_same_value() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: demo\n  annotations: {strait.io/export: \"true\", n: \"8080\"}\nspec:\n  ports: [{name: http, port: 8080}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  trafficPolicy: {outlierDetection: {interval: 1s, maxEjectionPercent: 100, weight: 0.5, on: 'yes', nothing: null}}\n";
        write_objects(dir.path(), yaml).unwrap();
        let want = parse_file(yaml).unwrap();
        for doc in want {
            let k = check(&doc).unwrap();
            let text = std::fs::read_to_string(object_file(dir.path(), &k)).unwrap();
            assert_eq!(parse_file(&text).unwrap(), vec![doc]);
        }
    }

    #[test]
    fn what_the_control_plane_says_of_an_object() {
        let k = key("VirtualService", "demo", "echo");
        let file = Path::new("/c/virtualservice.demo.echo.yaml");
        let v = json!({"spec": {"hosts": ["echo"]}});
        let other = json!({"spec": {"hosts": ["other"]}});
        let entry =
            |objects: Value, rejected: Value| json!({"objects": objects, "rejected": rejected});
        let obj = |f: &str, value: &Value| json!([{"kind": "VirtualService", "namespace": "demo", "name": "echo", "file": f, "value": value}]);
        assert_eq!(
            seen(&entry(json!([]), json!([])), file, &k, Some(&v)),
            Seen::Absent
        );
        let in_force = entry(obj("/c/virtualservice.demo.echo.yaml", &v), json!([]));
        assert_eq!(seen(&in_force, file, &k, Some(&v)), Seen::InForce);
        assert_eq!(seen(&in_force, file, &k, Some(&other)), Seen::Stale);
        assert_eq!(seen(&in_force, file, &k, None), Seen::InForce);
        assert_eq!(
            seen(
                &entry(obj("/c/split.yaml", &v), json!([])),
                file,
                &k,
                Some(&v)
            ),
            Seen::Elsewhere("/c/split.yaml".into())
        );
        // A rejection of this file wins over the last good version in force.
        let rejected = entry(
            obj("/c/virtualservice.demo.echo.yaml", &other),
            json!([{"kind": "VirtualService", "namespace": "demo", "name": "echo",
                    "file": "/c/virtualservice.demo.echo.yaml", "reason": "bad weight"}]),
        );
        assert_eq!(
            seen(&rejected, file, &k, Some(&v)),
            Seen::Rejected("bad weight".into())
        );
        // Another object's rejection is not this one's.
        let k2 = key("VirtualService", "demo", "other");
        assert_eq!(seen(&rejected, file, &k2, Some(&v)), Seen::Absent);
    }
}
