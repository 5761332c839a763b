//! `strait lab demo`: brings labs up, tours them, tears them down. Each
//! step prints what it does and what it saw; the demo fails (exit 1) if any
//! step's check fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::plan::{Lab, Mode, Topology};
use super::{CurlSummary, curl};

const ECHO: &str = "http://echo.demo:8080/";

/// The tour's result: one line per step.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<(String, Result<String, String>)>,
}

impl Report {
    fn record(&mut self, name: &str, r: Result<String>) {
        match &r {
            Ok(seen) => println!(
                "  PASS  {name}\n        {}",
                seen.replace('\n', "\n        ")
            ),
            Err(e) => println!("  FAIL  {name}\n        {e:#}"),
        }
        self.steps
            .push((name.to_string(), r.map_err(|e| format!("{e:#}"))));
    }

    pub fn failed(&self) -> usize {
        self.steps.iter().filter(|(_, r)| r.is_err()).count()
    }
}

fn count(sum: &CurlSummary, needle: &str) -> u32 {
    sum.answered_by
        .iter()
        .filter(|(k, _)| k.contains(needle))
        .map(|(_, n)| n)
        .sum()
}

/// Retries `check` until it passes or `within` elapses (config takes a
/// moment to reach every proxy); the last error otherwise.
fn eventually<T>(within: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > within => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn write(dir: &Path, name: &str, yaml: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, yaml)?;
    Ok(p)
}

/// The tour's objects, shipped in `examples/lab/` (the README's tour
/// applies the same files).
pub const EXAMPLES: [(&str, &str); 5] = [
    (
        "subsets.yaml",
        include_str!("../../examples/lab/subsets.yaml"),
    ),
    ("split.yaml", include_str!("../../examples/lab/split.yaml")),
    (
        "all-to-west.yaml",
        include_str!("../../examples/lab/all-to-west.yaml"),
    ),
    (
        "deny-client.yaml",
        include_str!("../../examples/lab/deny-client.yaml"),
    ),
    (
        "failover.yaml",
        include_str!("../../examples/lab/failover.yaml"),
    ),
];

/// Writes the example `name` into `dir`.
fn example(dir: &Path, name: &str) -> Result<PathBuf> {
    let (_, yaml) = EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| anyhow!("no example {name}"))?;
    write(dir, name, yaml)
}

/// The multi-primary tour on a running lab.
pub fn tour_multi_primary(lab: &Lab, report: &mut Report) -> Result<()> {
    std::fs::create_dir_all(lab.dir.join("demo-files"))?;
    identity_across(lab, report);
    failover(lab, report)?;
    split_across(lab, report)?;
    policy_across(lab, report)?;
    protocols_across(lab, report)?;
    intermediate_rotation(lab, report);
    Ok(())
}

/// A call from east reaches both clusters with the client's identity.
fn identity_across(lab: &Lab, report: &mut Report) {
    report.record(
        "cross-cluster call with end-to-end identity",
        eventually(Duration::from_secs(20), || {
            let sum = curl(lab, "east", ECHO, 20)?;
            if sum.failed() > 0
                || count(&sum, "west/echo/v2") == 0
                || count(&sum, "east/echo/v1") == 0
            {
                bail!(
                    "expected answers from both clusters, all 200:\n{}",
                    sum.render()
                );
            }
            let want = "spiffe://cluster.local/ns/demo/sa/client";
            if sum.identities.keys().any(|k| k != want) {
                bail!(
                    "the echo saw another identity than {want}:\n{}",
                    sum.render()
                );
            }
            Ok(format!("20 requests from east's client:\n{}", sum.render()))
        }),
    );
}

/// Connect failures to a killed gateway are retried on another endpoint.
fn failover(lab: &Lab, report: &mut Report) -> Result<()> {
    let dir = &lab.dir;
    // No routing rules yet: east's client spreads over both clusters.
    // Cut west off: connect failures are retried on another endpoint.
    super::kill(dir, "west/gateway")?;
    report.record(
        "failover when west's gateway is killed",
        (|| {
            let sum = curl(lab, "east", ECHO, 20)?;
            if sum.failed() > 0 {
                bail!("requests failed while west was cut off:\n{}", sum.render());
            }
            Ok(format!("20 requests, none failed:\n{}", sum.render()))
        })(),
    );
    super::start(dir, "west/gateway")?;

    Ok(())
}

/// A VirtualService splits 80/20 between the clusters' subsets.
fn split_across(lab: &Lab, report: &mut Report) -> Result<()> {
    let dir = &lab.dir;
    let files = dir.join("demo-files");
    let apply = |cluster: &str, file: &Path, put: bool| super::apply(dir, cluster, file, put);
    let subsets = example(&files, "subsets.yaml")?;
    let vs = example(&files, "split.yaml")?;
    apply("east", &subsets, true)?;
    apply("west", &subsets, true)?;
    apply("east", &vs, true)?;
    report.record(
        "80/20 split v1 (east) / v2 (west)",
        eventually(Duration::from_secs(20), || {
            let sum = curl(lab, "east", ECHO, 100)?;
            let (v1, v2) = (count(&sum, "/v1"), count(&sum, "/v2"));
            if sum.failed() > 0 || !(65..=95).contains(&v1) || !(5..=35).contains(&v2) {
                bail!("expected about 80 v1 and 20 v2 of 100:\n{}", sum.render());
            }
            Ok(format!(
                "100 requests: {v1} to v1 in east, {v2} to v2 in west"
            ))
        }),
    );

    Ok(())
}

/// An AuthorizationPolicy in west denies east's client, then allows it.
fn policy_across(lab: &Lab, report: &mut Report) -> Result<()> {
    let dir = &lab.dir;
    let files = dir.join("demo-files");
    let apply = |cluster: &str, file: &Path, put: bool| super::apply(dir, cluster, file, put);
    // Everything to west for the policy step.
    // Same kind, namespace and name: it replaces the split.
    let all_west = example(&files, "all-to-west.yaml")?;
    apply("east", &all_west, true)?;
    let deny = example(&files, "deny-client.yaml")?;
    apply("west", &deny, true)?;
    report.record(
        "AuthorizationPolicy in west denies east's client",
        eventually(Duration::from_secs(20), || {
            let sum = curl(lab, "east", ECHO, 5)?;
            if sum.codes.get("403") != Some(&5) {
                bail!("expected 5 × 403:\n{}", sum.render());
            }
            Ok("5 × 403 RBAC: access denied".to_string())
        }),
    );
    apply("west", &deny, false)?;
    report.record(
        "... and allows it again once deleted",
        eventually(Duration::from_secs(20), || {
            let sum = curl(lab, "east", ECHO, 5)?;
            if sum.failed() > 0 || count(&sum, "west/") != 5 {
                bail!("expected 5 × 200 from west:\n{}", sum.render());
            }
            Ok("5 × 200 from west".to_string())
        }),
    );

    Ok(())
}

/// HTTP/2 and a WebSocket through the gateways.
fn protocols_across(lab: &Lab, report: &mut Report) -> Result<()> {
    // Still everything to west: protocols other than HTTP/1.1 requests.
    let east = lab
        .cluster("east")
        .ok_or_else(|| anyhow!("the lab has no cluster east"))?;
    let proxy = east.client_proxy.trim_start_matches("http://").to_string();
    let netns = east.netns.clone();
    report.record(
        "HTTP/2 (as gRPC speaks it) and a WebSocket across the gateway",
        eventually(Duration::from_secs(20), || {
            let (code, body) = super::netns::within(netns.as_deref(), || {
                super::proxy_get_h2(&proxy, "echo.demo:8080", "/")
            })??;
            let doc: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| anyhow!("h2c answer {code} {body:?}: {e}"))?;
            if code != 200 || doc["cluster"] != "west" || doc["protocol"] != "HTTP/2.0" {
                bail!("expected 200 from west's echo over HTTP/2, got {code}: {body}");
            }
            let (who, back) = super::netns::within(netns.as_deref(), || {
                super::websocket_echo(&proxy, ECHO, "ping")
            })??;
            if who["cluster"] != "west" || back != "ping" {
                bail!("WebSocket: answered by {who}, {back:?} came back");
            }
            Ok(format!(
                "h2c GET from east's client: 200 from west's echo, which got it as {}\n\
                 WebSocket to west's echo: switched, \"ping\" came back",
                doc["protocol"]
            ))
        }),
    );

    Ok(())
}

/// The intermediate rotated under traffic, with no failed request.
fn intermediate_rotation(lab: &Lab, report: &mut Report) {
    let m = &lab.brokers[0];
    report.record("intermediate rotation under traffic, no failed request", (|| {
        let before = std::fs::read(lab.clusters[0].dir.join("state/cacerts/ca-cert.pem"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = {
            let lab = lab.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut total = CurlSummary::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match curl(&lab, "west", ECHO, 5) {
                        Ok(s) => {
                            for (k, n) in s.codes {
                                *total.codes.entry(k).or_default() += n;
                            }
                        }
                        Err(e) => *total.codes.entry(format!("error: {e}")).or_default() += 1,
                    }
                }
                total
            })
        };
        super::straitctl(m, &["trust", "rotate-intermediate", "east"])?;
        let rotated = eventually(Duration::from_secs(30), || {
            let now = std::fs::read(lab.clusters[0].dir.join("state/cacerts/ca-cert.pem"))?;
            if now == before {
                bail!("east still has its old intermediate");
            }
            Ok(())
        });
        // Let traffic run on the new intermediate for a moment.
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let total = traffic.join().map_err(|_| anyhow!("traffic thread panicked"))?;
        rotated?;
        let n: u32 = total.codes.values().sum();
        if total.failed() > 0 {
            bail!("{} of {n} requests failed during rotation:\n{}", total.failed(), total.render());
        }
        Ok(format!("east got a new intermediate; {n} requests from west during the rotation, none failed"))
    })());
}

/// The federated tour: a call across trust domains.
pub fn tour_federated(lab: &Lab, report: &mut Report) -> Result<()> {
    report.record(
        "federated call across trust domains",
        eventually(Duration::from_secs(30), || {
            let sum = curl(
                lab,
                "east",
                "http://echo.demo.svc.clusterset.local:8080/",
                10,
            )?;
            let want = "spiffe://mesh-a.local/ns/demo/sa/client";
            if sum.failed() > 0 || count(&sum, "west/") == 0 {
                bail!("expected answers from west (mesh-b):\n{}", sum.render());
            }
            if !sum.identities.contains_key(want) {
                bail!("west's echo did not see {want}:\n{}", sum.render());
            }
            Ok(format!(
                "east (mesh-a.local) → west (mesh-b.local):\n{}",
                sum.render()
            ))
        }),
    );
    Ok(())
}

/// A tour of one running lab.
type Tour = fn(&Lab, &mut Report) -> Result<()>;

/// Runs the whole demo under `dir`.
pub fn demo(dir: &Path, base: u8, kube: bool) -> Result<()> {
    if kube && let Some(why) = super::kube::unavailable(false) {
        bail!("{why}");
    }
    let mut report = Report::default();
    let tours: [(Topology, Tour); 2] = [
        (Topology::MultiPrimary, tour_multi_primary),
        (Topology::Federated, tour_federated),
    ];
    for (topology, tour) in tours {
        let lab_dir = dir.join(super::topology_name(topology));
        let lab = Lab::new(topology, &lab_dir, Mode::Sni, base, false)
            .map_err(|e| anyhow!(e))?
            .with_kube(kube);
        println!(
            "\n== {} lab in {}",
            super::topology_name(topology),
            lab_dir.display()
        );
        super::check_not_running(&lab_dir)?;
        let up = super::bring_up(&lab, false);
        let result = up.and_then(|()| tour(&lab, &mut report));
        if let Err(e) = &result {
            report.record(
                &format!("{} lab", super::topology_name(topology)),
                Err(anyhow!("{e:#}")),
            );
        }
        println!("   stopping the {} lab", super::topology_name(topology));
        super::down(&lab_dir)?;
    }
    let failed = report.failed();
    println!(
        "\n{} of {} steps passed",
        report.steps.len() - failed,
        report.steps.len()
    );
    if failed > 0 {
        return Err(crate::cli::Rejected(format!("{failed} demo step(s) failed")).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_example_is_objects_the_control_plane_reads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lab");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        shipped.sort();
        let mut embedded: Vec<String> = EXAMPLES.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(shipped, embedded, "every shipped example is in the demo");
        for (name, yaml) in EXAMPLES {
            let docs = strait_controlplane::source::parse_file(yaml).unwrap();
            assert!(!docs.is_empty(), "{name}");
            for d in docs {
                let key = strait_controlplane::source::check(&d)
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert_eq!(key.namespace, crate::lab::DEMO_NAMESPACE, "{name}");
            }
        }
    }
}
