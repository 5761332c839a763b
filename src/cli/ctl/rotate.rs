//! `straitctl trust rotate-root STEP [--wait]`: one step of the root
//! rotation and the broker's report, and with `--wait` the polling after
//! it until every cluster has done what the stage needs ([`progress`], pure)
//! or the time is up: a progress bar per stage on a terminal, one line per
//! change elsewhere.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde_json::json;
use strait_proto::strait::broker::v1 as pb;
use tokio::time::Instant;

use super::conn::Conn;
use super::{Output, print, short, time_str, yes_no};
use crate::cli::{format_duration, parse_duration};

/// How often `--wait` asks the broker.
const POLL: Duration = Duration::from_secs(1);
/// How long one status call may take before the broker counts as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub(super) struct RotateRoot {
    #[arg(value_enum)]
    step: RootStep,
    /// finish: do not wait for every intermediate or for old leaves to expire.
    #[arg(long)]
    force: bool,
    /// After the step, wait until every cluster has done what the stage
    /// needs: after begin, acknowledge the bundle with the new root; after
    /// advance, sign under an intermediate of the new root; after finish
    /// or abort, acknowledge the bundle that follows. Progress goes to
    /// stderr, the report to stdout once the wait ends.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long to wait before giving up (exit 1, naming the
    /// clusters still behind).
    #[arg(
        long,
        value_parser = parse_duration,
        default_value = "30m",
        value_name = "DURATION",
        requires = "wait"
    )]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RootStep {
    Begin,
    Advance,
    Finish,
    Abort,
    Status,
}

impl RootStep {
    fn as_str(self) -> &'static str {
        match self {
            RootStep::Begin => "begin",
            RootStep::Advance => "advance",
            RootStep::Finish => "finish",
            RootStep::Abort => "abort",
            RootStep::Status => "status",
        }
    }
}

/// `straitctl trust rotate-root ...`.
pub(super) async fn rotate_root(conn: &mut Conn, out: Output, a: RotateRoot) -> Result<()> {
    let r = conn
        .admin
        .rotate_root(pb::RotateRootRequest {
            step: a.step.as_str().into(),
            force: a.force,
        })
        .await
        .map_err(|s| conn.fail(s))?
        .into_inner();
    if !a.wait {
        return print_rotation(out, &r);
    }
    let (last, behind) = wait(conn, r, a.timeout).await?;
    print_rotation(out, &last)?;
    match behind {
        None => Ok(()),
        Some(why) => Err(anyhow::anyhow!(why)),
    }
}

/// What the stage of a rotation needs of every cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Acknowledge the bundle: in `distributing` the one with the new root
    /// (`advance` waits for it), in `idle` the one `finish` or an abort
    /// left.
    Bundle,
    /// Sign under an intermediate of the target root (`reissuing`; `finish`
    /// waits for it): the new root, or the old one when aborting.
    Intermediate { aborting: bool },
}

/// Where the clusters stand against what the current stage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) stage: String,
    pub(super) need: Need,
    /// The clusters that did it, by name.
    pub(super) done: Vec<String>,
    /// The clusters still behind, by name.
    pub(super) behind: Vec<String>,
}

/// What the stage of `r` needs of each cluster (the broker's
/// `bundle_acknowledged` or `on_target`, as `advance` and `finish` check
/// them) and who has done it; an error for a stage this straitctl does not
/// know.
pub(super) fn progress(r: &pb::RotationStatus) -> Result<Progress, String> {
    let need = match r.stage.as_str() {
        "distributing" | "idle" => Need::Bundle,
        "reissuing" => Need::Intermediate {
            aborting: r.aborting,
        },
        other => {
            return Err(format!(
                "the broker reports rotation stage {other:?}, which this straitctl does not \
                 know: it cannot tell what to wait for"
            ));
        }
    };
    let (mut done, mut behind) = (Vec::new(), Vec::new());
    for c in &r.clusters {
        let did = match need {
            Need::Bundle => c.bundle_acknowledged,
            Need::Intermediate { .. } => c.on_target,
        };
        if did { &mut done } else { &mut behind }.push(c.name.clone());
    }
    done.sort();
    behind.sort();
    Ok(Progress {
        stage: r.stage.clone(),
        need,
        done,
        behind,
    })
}

impl Progress {
    /// Every cluster has done what the stage needs.
    pub(super) fn complete(&self) -> bool {
        self.behind.is_empty()
    }

    fn total(&self) -> usize {
        self.done.len() + self.behind.len()
    }

    /// What is counted, and the word before "N/M clusters".
    fn what(&self) -> (&'static str, &'static str) {
        match self.need {
            Need::Bundle => ("bundle acknowledged", "by"),
            Need::Intermediate { aborting: false } => ("intermediate on the new root", "in"),
            Need::Intermediate { aborting: true } => ("intermediate back on the old root", "in"),
        }
    }

    /// Who is behind: `; waiting for north`, or nothing.
    fn waiting(&self) -> String {
        if self.behind.is_empty() {
            return String::new();
        }
        format!("; waiting for {}", self.behind.join(", "))
    }

    /// Where it stands, on one line: `bundle acknowledged by 2/3 clusters:
    /// east, west; waiting for north`.
    pub(super) fn line(&self) -> String {
        if self.total() == 0 {
            return "no joined clusters: nothing to wait for".into();
        }
        let (what, by) = self.what();
        let mut line = format!("{what} {by} {}/{} clusters", self.done.len(), self.total());
        if !self.done.is_empty() {
            line.push_str(&format!(": {}", self.done.join(", ")));
        }
        line.push_str(&self.waiting());
        line
    }
}

/// Polls the broker every [`POLL`] from the report `first` until every
/// cluster has done what the stage needs or `timeout` has passed: the last
/// report, and when the time ran out why (naming the clusters behind). A
/// broker that does not answer is left for its next address and the wait
/// goes on; a refusal (permission) ends it with an error.
async fn wait(
    conn: &mut Conn,
    first: pb::RotationStatus,
    timeout: Duration,
) -> Result<(pb::RotationStatus, Option<String>)> {
    let deadline = Instant::now() + timeout;
    let mut shown = Shown::new(std::io::stderr().is_terminal());
    let mut last = first;
    // What went wrong talking to the broker, while it lasts.
    let mut trouble: Option<String> = None;
    loop {
        let p = progress(&last).map_err(anyhow::Error::msg)?;
        shown.show(&p);
        if p.complete() {
            shown.finish();
            eprintln!(
                "stage {} done: {}; next: {}",
                p.stage,
                p.line(),
                last.next_step
            );
            return Ok((last, None));
        }
        let now = Instant::now();
        if now >= deadline {
            shown.finish();
            let mut why = format!(
                "--wait: stage {} not done within {}: {}",
                p.stage,
                format_duration(timeout),
                p.line()
            );
            if let Some(t) = trouble {
                why.push_str(&format!(" (the broker did not answer at the end: {t})"));
            }
            return Ok((last, Some(why)));
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
        // Up to CALL_TIMEOUT, but not much past the deadline: at least one
        // POLL, for a last look when it is reached.
        let start = Instant::now();
        let limit = CALL_TIMEOUT.min(deadline.max(start + POLL) - start);
        let call = tokio::time::timeout(
            limit,
            conn.admin.rotate_root(pb::RotateRootRequest {
                step: RootStep::Status.as_str().into(),
                force: false,
            }),
        );
        let why = match call.await {
            Ok(Ok(r)) => {
                if trouble.take().is_some() {
                    shown.note(&format!("broker {} answers", conn.broker));
                }
                last = r.into_inner();
                continue;
            }
            Ok(Err(status)) if !gone(status.code()) => {
                shown.finish();
                return Err(conn.fail(status));
            }
            Ok(Err(status)) => status.message().to_string(),
            Err(_) => format!("no answer within {}", format_duration(limit)),
        };
        shown.note(&format!(
            "broker {}: {why}; {}",
            conn.broker,
            if conn.replicas() > 1 {
                "connecting to the next address"
            } else {
                "connecting again"
            }
        ));
        trouble = Some(
            match tokio::time::timeout_at(deadline, conn.reconnect()).await {
                Ok(Ok(())) => {
                    shown.note(&format!("connected to broker {}", conn.broker));
                    why
                }
                Ok(Err(e)) => {
                    let e = crate::cli::describe(&e);
                    shown.note(&e);
                    e
                }
                Err(_) => why,
            },
        );
    }
}

/// Whether a status code says the broker went away or is in trouble (try
/// another address, or again), rather than refusing the caller.
fn gone(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

/// A wait's progress on stderr: on a terminal a bar per stage (clusters
/// done of all; a stage left behind stays as a line), elsewhere one line
/// per change.
struct Shown {
    terminal: bool,
    /// The bar of the stage shown, by stage and what it needs.
    bar: Option<((String, Need), indicatif::ProgressBar)>,
    /// The last progress shown, as a line.
    last: String,
}

impl Shown {
    fn new(terminal: bool) -> Self {
        Shown {
            terminal,
            bar: None,
            last: String::new(),
        }
    }

    fn show(&mut self, p: &Progress) {
        let line = p.line();
        if line == self.last {
            return;
        }
        if !self.terminal {
            eprintln!("{line}");
            self.last = line;
            return;
        }
        let key = (p.stage.clone(), p.need);
        if self.bar.as_ref().is_none_or(|(k, _)| *k != key) {
            if let Some(((stage, _), bar)) = self.bar.take() {
                bar.finish_and_clear();
                eprintln!("stage {stage}: {}", self.last);
            }
            let bar = indicatif::ProgressBar::new(p.total() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "stage {prefix} [{bar:20}] {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(p.stage.clone());
            self.bar = Some((key, bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_message(format!("{}{}", p.what().0, p.waiting()));
            bar.set_length(p.total() as u64);
            bar.set_position(p.done.len() as u64);
        }
        self.last = line;
    }

    /// A line that is not progress (a broker gone away), above the bar.
    fn note(&self, text: &str) {
        match &self.bar {
            Some((_, bar)) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// Clears the bar, for the closing line.
    fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Prints a rotation report: stage and roots, then a row per cluster.
fn print_rotation(out: Output, r: &pb::RotationStatus) -> Result<()> {
    let value = json!({
        "stage": r.stage,
        "aborting": r.aborting,
        "bundle_version": r.bundle_version,
        "signing_root": r.signing_root,
        "target_root": r.target_root,
        "retiring_root": r.retiring_root,
        "roots": r.roots.iter().map(|x| json!({"sha256": x.sha256, "subject": x.subject, "expires": time_str(x.expires_unix)})).collect::<Vec<_>>(),
        "clusters": r.clusters.iter().map(|c| json!({
            "name": c.name,
            "bundle_acknowledged": c.bundle_acknowledged,
            "intermediate_root": c.intermediate_root,
            "on_target": c.on_target,
        })).collect::<Vec<_>>(),
        "next_step": r.next_step,
    });
    if out == Output::Table {
        println!(
            "stage {}{}  bundle version {}  signing root {}",
            r.stage,
            if r.aborting { " (aborting)" } else { "" },
            r.bundle_version,
            short(&r.signing_root)
        );
        for x in &r.roots {
            let role = if x.sha256 == r.target_root {
                "new"
            } else if x.sha256 == r.retiring_root {
                "old"
            } else {
                "current"
            };
            println!(
                "root {:<7} {}  {}  expires {}",
                role,
                short(&x.sha256),
                x.subject,
                time_str(x.expires_unix)
            );
        }
        println!("next: {}", r.next_step);
        println!();
    }
    let rows = r
        .clusters
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                yes_no(c.bundle_acknowledged),
                short(&c.intermediate_root),
                yes_no(c.on_target),
            ]
        })
        .collect();
    print(
        out,
        &value,
        &[
            "CLUSTER",
            "BUNDLE-ACKED",
            "INTERMEDIATE-ROOT",
            "ON-NEW-ROOT",
        ],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, acked: bool, on_target: bool) -> pb::ClusterRotation {
        pb::ClusterRotation {
            name: name.into(),
            bundle_acknowledged: acked,
            on_target,
            ..Default::default()
        }
    }

    fn status(
        stage: &str,
        aborting: bool,
        clusters: Vec<pb::ClusterRotation>,
    ) -> pb::RotationStatus {
        pb::RotationStatus {
            stage: stage.into(),
            aborting,
            clusters,
            ..Default::default()
        }
    }

    #[test]
    fn distributing_waits_for_every_bundle_acknowledgement() {
        let r = status(
            "distributing",
            false,
            vec![
                cluster("west", true, false),
                cluster("north", false, true),
                cluster("east", true, false),
            ],
        );
        let p = progress(&r).unwrap();
        assert_eq!(p.need, Need::Bundle);
        assert_eq!(p.done, ["east", "west"]);
        assert_eq!(
            p.behind,
            ["north"],
            "on the target root does not count here"
        );
        assert!(!p.complete());
        assert_eq!(
            p.line(),
            "bundle acknowledged by 2/3 clusters: east, west; waiting for north"
        );
    }

    #[test]
    fn reissuing_waits_for_every_intermediate_on_the_target_root() {
        let r = status(
            "reissuing",
            false,
            vec![cluster("east", true, true), cluster("west", true, false)],
        );
        let p = progress(&r).unwrap();
        assert_eq!(p.need, Need::Intermediate { aborting: false });
        assert_eq!(p.behind, ["west"], "an acknowledged bundle is not enough");
        assert_eq!(
            p.line(),
            "intermediate on the new root in 1/2 clusters: east; waiting for west"
        );
        let back = status("reissuing", true, vec![cluster("east", true, true)]);
        let p = progress(&back).unwrap();
        assert!(p.complete());
        assert_eq!(
            p.line(),
            "intermediate back on the old root in 1/1 clusters: east"
        );
    }

    #[test]
    fn idle_waits_for_the_bundle_finish_or_abort_left() {
        let r = status("idle", false, vec![cluster("east", false, true)]);
        let p = progress(&r).unwrap();
        assert_eq!(p.need, Need::Bundle);
        assert!(!p.complete());
        assert_eq!(
            p.line(),
            "bundle acknowledged by 0/1 clusters; waiting for east"
        );
    }

    #[test]
    fn no_cluster_is_nothing_to_wait_for() {
        let p = progress(&status("distributing", false, vec![])).unwrap();
        assert!(p.complete());
        assert_eq!(p.line(), "no joined clusters: nothing to wait for");
    }

    #[test]
    fn an_unknown_stage_is_named_not_waited_on() {
        let e = progress(&status("replanting", false, vec![])).unwrap_err();
        assert!(e.contains("\"replanting\""), "{e}");
    }

    #[test]
    fn only_a_broker_in_trouble_is_retried() {
        assert!(gone(tonic::Code::Unavailable));
        assert!(gone(tonic::Code::DeadlineExceeded));
        assert!(!gone(tonic::Code::PermissionDenied));
        assert!(!gone(tonic::Code::Unauthenticated));
        assert!(!gone(tonic::Code::InvalidArgument));
    }
}
