//! Watches a config directory and keeps the config in force current.
//!
//! The directory (and its `imported/` subdirectory, where the broker link
//! writes imports) is scanned every [`POLL`]; when a file's size or
//! modification time changes, or a file appears or goes, the directory is
//! read again and folded into the previous [`Config`] with
//! [`Config::apply`], so a bad file or object keeps its last good version.
//! Each file is read within [`Limits`] (its size checked before it is
//! read, its YAML parsed under a budget); a file that was refused is not
//! read again until its size or modification time changes, so a huge file
//! or a YAML bomb costs its parse once.
//! Polling is used rather than inotify so that the same code works on
//! every file system (network mounts, ConfigMap volumes whose files are
//! swapped by symlink) and the latency bound is simple: one poll interval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::source::{self, Config, FileRead, Limits, Rejection};

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

/// Reads the config directory and its `imported/` subdirectory, each
/// file within `limits`.
pub fn read_all(dir: &Path, limits: &Limits) -> std::io::Result<BTreeMap<PathBuf, FileRead>> {
    read_all_cached(dir, limits, &mut Refused::new())
}

/// The files that could not be read or parsed, by what a scan saw of them
/// (size, modification time): they are not read again until they change,
/// so a rejected huge file or YAML bomb costs its parse once.
pub type Refused = BTreeMap<PathBuf, ((u64, Option<SystemTime>), String)>;

/// [`read_all`], skipping the files `refused` already refused as they are.
pub fn read_all_cached(
    dir: &Path,
    limits: &Limits,
    refused: &mut Refused,
) -> std::io::Result<BTreeMap<PathBuf, FileRead>> {
    let mut seen = Refused::new();
    let mut read_one = |path: &Path| {
        let stamp = std::fs::metadata(path)
            .map(|m| (m.len(), m.modified().ok()))
            .ok();
        if let (Some(stamp), Some((was, why))) = (stamp, refused.get(path))
            && stamp == *was
        {
            seen.insert(path.to_path_buf(), (stamp, why.clone()));
            return Err(why.clone());
        }
        let result = source::read_file(path, limits);
        if let (Some(stamp), Err(why)) = (stamp, &result) {
            seen.insert(path.to_path_buf(), (stamp, why.clone()));
        }
        result
    };
    let mut read = source::read_dir_with(dir, &mut read_one)?;
    let imported = dir.join(IMPORTED_DIR);
    if imported.is_dir() {
        read.extend(source::read_dir_with(&imported, &mut read_one)?);
    }
    *refused = seen;
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
pub fn watch_dir(dir: PathBuf, limits: Limits) -> std::io::Result<watch::Receiver<Arc<Config>>> {
    // Taken before the first read, so that a change made during the read
    // is seen by the first poll.
    let mut seen = fingerprint(&dir);
    let mut refused = Refused::new();
    let first = Config::default().apply(&read_all_cached(&dir, &limits, &mut refused)?);
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
            let read = match read_all_cached(&dir, &limits, &mut refused) {
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
        let mut rx = watch_dir(dir.path().to_path_buf(), Limits::default()).unwrap();
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
    fn a_refused_file_is_remembered_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, "kind: [unclosed").unwrap();
        let mut refused = Refused::new();
        let first = read_all_cached(dir.path(), &Limits::default(), &mut refused).unwrap();
        assert!(first[&path].is_err());
        assert_eq!(refused.len(), 1);
        let again = read_all_cached(dir.path(), &Limits::default(), &mut refused).unwrap();
        assert_eq!(again, first);
        // Changed (another size): read again, and forgotten once good.
        std::fs::write(&path, SVC).unwrap();
        let fixed = read_all_cached(dir.path(), &Limits::default(), &mut refused).unwrap();
        assert_eq!(fixed[&path].as_ref().map(Vec::len), Ok(1));
        assert!(refused.is_empty());
        // A removed file is forgotten too.
        std::fs::write(&path, "kind: [unclosed").unwrap();
        read_all_cached(dir.path(), &Limits::default(), &mut refused).unwrap();
        std::fs::remove_file(&path).unwrap();
        read_all_cached(dir.path(), &Limits::default(), &mut refused).unwrap();
        assert!(refused.is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let e = watch_dir(
            PathBuf::from("/nonexistent/strait-config"),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
