//! Netns mode (`strait lab up --netns`, root): each cluster in its own
//! network namespace, joined to the others by a WAN bridge in the host
//! namespace, so that a partition between two clusters is a real cut.
//!
//! - The bridge `st<base>wan` carries `10.<base>.0.0/16`; brokers listen on
//!   its addresses `10.<base>.0.<mesh + 1>` (in the host namespace).
//! - Cluster `i` lives in the namespace `strait<base>-<cluster>`, linked to
//!   the bridge by a veth pair (`st<base>v<i>` outside, `eth0` inside)
//!   carrying its control plane `10.<base>.<i + 1>.1` and gateway
//!   `10.<base>.<i + 1>.2`. Its workloads and sidecars stay on the
//!   namespace's own loopback (`127.<block>.0.x`): only gateways, control
//!   planes and brokers are reachable across the WAN.
//! - The bridge's traffic is let through iptables' FORWARD chain by one
//!   rule (`-i <bridge> -o <bridge> -j ACCEPT`, commented `strait lab
//!   <bridge>`), added by `up` and removed by `down`: with Docker's engine
//!   running (it loads `br_netfilter` and sets the FORWARD policy to DROP)
//!   the clusters would otherwise not reach each other at all, while every
//!   process reported ready. `up` and `status` check that each cluster
//!   reaches the others' gateways ([`wan_links`]).
//! - `partition A B` adds `unreachable` routes for each other's WAN /24 in
//!   both namespaces (connections fail at once, as behind a router that
//!   answers with ICMP unreachable; live connections stall); `heal` takes
//!   them away.
//!
//! Everything is done with iproute2 (`ip`), as an operator would.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::plan::Lab;

/// The WAN bridge of a lab.
pub fn bridge(base: u8) -> String {
    format!("st{base}wan")
}

/// The host-side veth of cluster `i`.
fn veth(base: u8, i: usize) -> String {
    format!("st{base}v{i}")
}

/// The WAN /24 of cluster `i`.
pub fn wan_net(base: u8, i: usize) -> String {
    format!("10.{base}.{}.0/24", i + 1)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why netns mode cannot run here, if it cannot: not root, or no `ip`.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("--netns needs root (network namespaces, veth, a bridge)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("--netns needs iproute2's `ip` on the PATH".into()),
    }
}

/// Creates the bridge, the namespaces and their links. Leftovers of a lab
/// with the same base that was not torn down are removed first.
pub fn setup(lab: &Lab) -> Result<()> {
    teardown(lab);
    let base = lab.base();
    let br = bridge(base);
    ip(&["link", "add", &br, "type", "bridge"])?;
    ip(&["link", "set", &br, "up"])?;
    allow_forwarding(base)?;
    for m in &lab.brokers {
        ip(&["addr", "add", &format!("{}/16", m.ip), "dev", &br])?;
    }
    for (i, c) in lab.clusters.iter().enumerate() {
        let Some(ns) = &c.netns else { continue };
        let v = veth(base, i);
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["link", "set", &v, "master", &br])?;
        ip(&["link", "set", &v, "up"])?;
        for host in [c.cp_ip(), c.gw_ip()] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{host}/16"),
                "dev",
                "eth0",
            ])?;
        }
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// Removes what [`setup`] made (the veths go with their namespaces);
/// what is already gone is fine.
pub fn teardown(lab: &Lab) {
    for (i, c) in lab.clusters.iter().enumerate() {
        if let Some(ns) = &c.netns {
            let _ = ip(&["netns", "del", ns]);
            // A namespace some process still holds outlives its name, and
            // keeps the pair: take the host end away explicitly.
            let _ = ip(&["link", "del", &veth(lab.base(), i)]);
        }
    }
    let _ = ip(&["link", "del", &bridge(lab.base())]);
    remove_forwarding(lab.base());
}

/// The comment that marks the forwarding rules of a lab's WAN bridge.
fn rule_comment(base: u8) -> String {
    format!("strait lab {}", bridge(base))
}

/// The iptables rule that lets traffic cross the WAN bridge: where the
/// bridge's frames go through iptables (`br_netfilter`, which Docker's
/// engine loads) and the FORWARD policy is DROP (which `dockerd` sets),
/// the clusters would otherwise not reach each other at all. The same
/// rule kind and libvirt add for their bridges.
fn forward_rule(base: u8) -> Vec<String> {
    let br = bridge(base);
    [
        "FORWARD",
        "-i",
        &br,
        "-o",
        &br,
        "-m",
        "comment",
        "--comment",
        &rule_comment(base),
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(op: &str, rule: &[String]) -> Option<bool> {
    let out = Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .ok()?;
    Some(out.status.success())
}

/// Adds the WAN bridge's forwarding rule (once). Without `iptables` there
/// is no firewall to pass: nothing to do.
fn allow_forwarding(base: u8) -> Result<()> {
    let rule = forward_rule(base);
    match iptables("-C", &rule) {
        None | Some(true) => return Ok(()),
        Some(false) => {}
    }
    let mut insert = vec![rule[0].clone(), "1".to_string()];
    insert.extend_from_slice(&rule[1..]);
    if iptables("-I", &insert) != Some(true) {
        bail!(
            "cannot add the iptables FORWARD rule for {} (iptables -I {})",
            bridge(base),
            insert.join(" ")
        );
    }
    Ok(())
}

/// Removes every copy of the WAN bridge's forwarding rule.
fn remove_forwarding(base: u8) {
    let rule = forward_rule(base);
    while iptables("-C", &rule) == Some(true) {
        if iptables("-D", &rule) != Some(true) {
            break;
        }
    }
}

/// One pair of clusters and whether the first reaches the second's
/// gateway across the WAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WanLink {
    pub from: String,
    pub to: String,
    /// The address tried: the other cluster's gateway.
    pub target: String,
    pub reachable: bool,
}

/// Whether a TCP connection to `target` gets an answer: accepted, or
/// refused (the other side's host answered: the path works, its process
/// is down). Dropped (a timeout) or unroutable (a partition) is not.
fn reaches(target: &str) -> bool {
    let Ok(addr) = target.parse::<std::net::SocketAddr>() else {
        return false;
    };
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// From each cluster's namespace, a TCP connection to every other
/// cluster's gateway: what cross-cluster traffic needs, checked rather
/// than assumed from processes being up.
pub fn wan_links(lab: &Lab) -> Vec<WanLink> {
    let mut out = Vec::new();
    for from in &lab.clusters {
        let Some(ns) = &from.netns else { continue };
        for to in lab.clusters.iter().filter(|c| c.name != from.name) {
            let target = to.gateway.tcp.clone();
            let reachable = within(Some(ns), || reaches(&target)).unwrap_or(false);
            out.push(WanLink {
                from: from.name.clone(),
                to: to.name.clone(),
                target,
                reachable,
            });
        }
    }
    out
}

/// Why cross-cluster traffic cannot flow, if it cannot: the first pair of
/// clusters that do not reach each other, with where to look.
pub fn check_wan(lab: &Lab) -> Result<()> {
    if let Some(l) = wan_links(lab).into_iter().find(|l| !l.reachable) {
        bail!(
            "{} cannot reach {}'s gateway {} across the WAN bridge {}: cross-cluster \
             traffic would fail. Is it partitioned (`strait lab heal`)? Does a firewall \
             drop bridged traffic (`iptables -S FORWARD`; dockerd sets the policy to DROP)?",
            l.from,
            l.to,
            l.target,
            bridge(lab.base())
        );
    }
    Ok(())
}

fn cluster_index(lab: &Lab, name: &str) -> Result<usize> {
    lab.clusters
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = lab.clusters.iter().map(|c| c.name.as_str()).collect();
            crate::cli::UsageError(format!(
                "no cluster {name:?} in this lab; its clusters: {}",
                names.join(", ")
            ))
            .into()
        })
}

fn netns_of(lab: &Lab, i: usize) -> Result<&str> {
    match &lab.clusters[i].netns {
        Some(ns) => Ok(ns),
        None => bail!(
            "this lab does not run in network namespaces: start it with `strait lab up --netns`"
        ),
    }
}

/// Cuts the WAN between clusters `a` and `b`.
pub fn partition(lab: &Lab, a: &str, b: &str) -> Result<()> {
    let (i, j) = (cluster_index(lab, a)?, cluster_index(lab, b)?);
    if i == j {
        bail!("partition: {a} and {b} are the same cluster");
    }
    let base = lab.base();
    for (from, to) in [(i, j), (j, i)] {
        let ns = netns_of(lab, from)?;
        let net = wan_net(base, to);
        // Already cut: nothing to add.
        let _ = ip(&["-n", ns, "route", "del", "unreachable", &net]);
        ip(&["-n", ns, "route", "add", "unreachable", &net])?;
    }
    Ok(())
}

/// Restores every cut link.
pub fn heal(lab: &Lab) -> Result<()> {
    let base = lab.base();
    for i in 0..lab.clusters.len() {
        let ns = netns_of(lab, i)?;
        for j in 0..lab.clusters.len() {
            if i != j {
                let _ = ip(&["-n", ns, "route", "del", "unreachable", &wan_net(base, j)]);
            }
        }
    }
    Ok(())
}

/// Runs `f` on a thread that has entered the network namespace `ns`
/// (sockets it opens live there), or here when `ns` is `None`.
pub fn within<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    let path = Path::new("/var/run/netns").join(ns);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {ns} ({})", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            use std::os::fd::AsFd;
            // Only this (scoped, short-lived) thread changes namespace.
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("cannot enter network namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in network namespace {ns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_interface_names() {
        // IFNAMSIZ is 16 with the NUL: at most 15 characters.
        assert!(bridge(250).len() <= 15);
        assert!(veth(250, 9).len() <= 15);
        assert_eq!(wan_net(10, 1), "10.10.2.0/24");
    }

    #[test]
    fn within_no_namespace_runs_here() {
        assert_eq!(within(None, || 7).unwrap(), 7);
        let e = within(Some("strait-no-such-namespace"), || 7).unwrap_err();
        assert!(
            format!("{e:#}").contains("strait-no-such-namespace"),
            "{e:#}"
        );
    }
}
