//! `/debug/config`: the config in force of every cluster this control
//! plane serves (its own, then the remotes'), object by object, with the
//! file each came from, and every current rejection with its reason
//! (and whether the object's last good version stays in force).
//!
//! It is how a tool that wrote a file learns what became of its objects
//! (`strait lab apply` waits on it): an object is in force when it is
//! listed with that file and that content; it was refused when a
//! rejection names that file and that object.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::source::{Config, ObjectKey};

/// The config channel of each served cluster, by cluster name.
pub type Configs = Vec<(String, watch::Receiver<Arc<Config>>)>;

fn key_json(k: &ObjectKey) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("kind".into(), json!(k.kind));
    m.insert("namespace".into(), json!(k.namespace));
    m.insert("name".into(), json!(k.name));
    m
}

/// One cluster's config as `/debug/config` shows it.
pub fn config_json(config: &Config) -> Value {
    let objects: Vec<Value> = config
        .objects
        .iter()
        .map(|(k, o)| {
            let mut m = key_json(k);
            m.insert("file".into(), json!(o.file.display().to_string()));
            m.insert("value".into(), o.value.clone());
            Value::Object(m)
        })
        .collect();
    let rejected: Vec<Value> = config
        .rejections
        .iter()
        .map(|r| {
            let mut m = r.object.as_ref().map(key_json).unwrap_or_default();
            m.insert("file".into(), json!(r.file.display().to_string()));
            m.insert("reason".into(), json!(r.reason));
            // Whether an earlier good version of the object is still what
            // is served (a bad edit withdraws nothing).
            let in_force = r
                .object
                .as_ref()
                .is_some_and(|k| config.objects.contains_key(k));
            m.insert("last_good_in_force".into(), json!(in_force));
            Value::Object(m)
        })
        .collect();
    json!({ "objects": objects, "rejected": rejected })
}

/// The body of `/debug/config`: `{"clusters": {NAME: {objects, rejected}}}`.
pub fn configs_json(configs: &Configs) -> Value {
    let clusters: serde_json::Map<String, Value> = configs
        .iter()
        .map(|(name, rx)| (name.clone(), config_json(&rx.borrow())))
        .collect();
    json!({ "clusters": clusters })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::source::parse_file;

    #[test]
    fn objects_carry_their_file_and_rejections_their_reason() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\n\
                   spec: {ports: [{port: 80}]}\n";
        let read = BTreeMap::from([
            (PathBuf::from("/c/a.yaml"), parse_file(svc)),
            (PathBuf::from("/c/b.yaml"), parse_file(svc)),
            (PathBuf::from("/c/c.yaml"), parse_file("kind: [")),
        ]);
        let config = Config::default().apply(&read);
        let (_tx, rx) = watch::channel(Arc::new(config));
        let j = configs_json(&vec![("east".to_string(), rx)]);
        let east = &j["clusters"]["east"];
        assert_eq!(east["objects"].as_array().unwrap().len(), 1);
        let o = &east["objects"][0];
        assert_eq!(
            (&o["kind"], &o["namespace"], &o["name"], &o["file"]),
            (
                &json!("Service"),
                &json!("demo"),
                &json!("echo"),
                &json!("/c/a.yaml")
            )
        );
        assert_eq!(o["value"]["metadata"]["name"], "echo");
        let rejected = east["rejected"].as_array().unwrap();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(rejected[0]["file"], "/c/b.yaml");
        assert_eq!(rejected[0]["name"], "echo");
        assert!(
            rejected[0]["reason"]
                .as_str()
                .unwrap()
                .contains("already defined in /c/a.yaml"),
            "{rejected:?}"
        );
        // A file that does not parse names no object.
        assert_eq!(rejected[1]["file"], "/c/c.yaml");
        assert!(rejected[1].get("name").is_none());
    }
}
