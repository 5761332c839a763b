//! Watches a config directory and keeps the config in force current.
//!
//! The directory (and its `imported/` subdirectory, where the broker link
//! writes imports) is scanned every [`POLL`]; when a file's size or
//! modification time changes, or a file appears or goes, the directory is
//! read again and folded into the previous [`Config`] with
//! [`Config::apply`], so a bad file or object keeps its last good version.
//! Polling is used rather than inotify so that the same code works on
//! every file system (network mounts, ConfigMap volumes whose files are
//! swapped by symlink) and the latency bound is simple: one poll interval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::source::{self, Config, FileRead, Rejection};

/// How often the directory is scanned.
pub const POLL: Duration = Duration::from_millis(200);
/// The subdirectory the broker link writes imports to.
pub const IMPORTED_DIR: &str = "imported";

/// What a scan saw of each YAML file: size and modification time.
type Fingerprint = BTreeMap<PathBuf, (u64, Option<SystemTime>)>;

fn yaml_files(dir: &Path, out: &mut Fingerprint) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml");
        if !yaml {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.is_file()
        {
            out.insert(path, (meta.len(), meta.modified().ok()));
        }
    }
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut f = Fingerprint::new();
    yaml_files(dir, &mut f);
    yaml_files(&dir.join(IMPORTED_DIR), &mut f);
    f
}

/// Reads the config directory and its `imported/` subdirectory.
pub fn read_all(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, FileRead>> {
    let mut read = source::read_dir(dir)?;
    let imported = dir.join(IMPORTED_DIR);
    if imported.is_dir() {
        read.extend(source::read_dir(&imported)?);
    }
    Ok(read)
}

/// Whether an object came from the imports the broker link wrote (and so
/// is not this cluster's own config, e.g. not to be exported again).
pub fn is_imported(config_dir: &Path, file: &Path) -> bool {
    file.starts_with(config_dir.join(IMPORTED_DIR))
}

/// Logs the rejections that are new since the previous config.
fn log_rejections(previous: &[Rejection], now: &[Rejection]) {
    for r in now {
        if !previous.contains(r) {
            tracing::warn!(rejection = %r, "config object rejected; its last good version stays in force");
        }
    }
}

/// Reads the directory once (an error if it cannot be read at all) and
/// then keeps the returned channel current until the receiver is dropped.
pub fn watch_dir(dir: PathBuf) -> std::io::Result<watch::Receiver<Arc<Config>>> {
    // Taken before the first read, so that a change made during the read
    // is seen by the first poll.
    let mut seen = fingerprint(&dir);
    let first = Config::default().apply(&read_all(&dir)?);
    log_rejections(&[], &first.rejections);
    tracing::info!(
        dir = %dir.display(),
        objects = first.objects.len(),
        rejected = first.rejections.len(),
        "config directory read"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = tx.closed() => return,
            }
            let now = fingerprint(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            let read = match read_all(&dir) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "config directory unreadable; keeping the last config");
                    continue;
                }
            };
            let previous = tx.borrow().clone();
            let next = previous.apply(&read);
            log_rejections(&previous.rejections, &next.rejections);
            if next != *previous {
                tracing::info!(
                    objects = next.objects.len(),
                    rejected = next.rejections.len(),
                    "config changed"
                );
                tx.send_replace(Arc::new(next));
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec: {selector: {app: echo}, ports: [{name: http, port: 8080}]}\n";

    async fn changed(rx: &mut watch::Receiver<Arc<Config>>) -> Arc<Config> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a change within 5 s")
            .expect("watcher alive");
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn changes_apply_and_bad_files_keep_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        let mut rx = watch_dir(dir.path().to_path_buf()).unwrap();
        assert_eq!(rx.borrow().objects.len(), 1);

        // A new file with a second object.
        std::fs::write(
            dir.path().join("b.yaml"),
            SVC.replace("name: echo", "name: other"),
        )
        .unwrap();
        let c = changed(&mut rx).await;
        assert_eq!(c.objects.len(), 2);

        // A file that no longer parses keeps its objects, with a rejection
        // naming the file.
        std::fs::write(dir.path().join("b.yaml"), "kind: [unclosed").unwrap();
        let c = changed(&mut rx).await;
        assert_eq!(c.objects.len(), 2);
        assert!(
            c.rejections
                .iter()
                .any(|r| r.file.ends_with("b.yaml") && r.reason.contains("YAML")),
            "{:?}",
            c.rejections
        );

        // Imports are read from imported/ and known as such.
        std::fs::create_dir(dir.path().join(IMPORTED_DIR)).unwrap();
        std::fs::write(
            dir.path().join(IMPORTED_DIR).join("imports.yaml"),
            SVC.replace("name: echo", "name: remote"),
        )
        .unwrap();
        let c = changed(&mut rx).await;
        let remote = c
            .objects
            .values()
            .find(|o| o.value["metadata"]["name"] == "remote")
            .unwrap();
        assert!(is_imported(dir.path(), &remote.file));

        // A removed file removes its objects.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let c = changed(&mut rx).await;
        assert_eq!(c.objects.len(), 2, "echo and remote remain");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let e = watch_dir(PathBuf::from("/nonexistent/strait-config")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
