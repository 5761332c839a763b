//! Endpoint selection with state: round robin, least request, random;
//! outlier detection; locality-weighted spread and failover.
//!
//! One [`Balancer`] per (service, subset), shared by every connection to
//! it. Every successful [`Balancer::pick`] must be followed by exactly one
//! [`Balancer::report`] for the picked endpoint: the pick counts a request
//! in flight (for LEAST_REQUEST) and the report ends it.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use strait_proto::strait::mesh::v1 as pb;

use super::Labels;
use super::traffic::{LbAlgorithm, TrafficPolicy};

/// How a request or connection to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (TCP) or answered with a status below 500.
    Success,
    /// Answered with this HTTP status.
    Status(u16),
    /// The connection (or TLS handshake) could not be set up.
    ConnectFailure,
    /// Reset before a response.
    Reset,
}

/// Why no endpoint could be picked (an HTTP 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The service (or subset) has no endpoint.
    #[error("no endpoint of the service matches the subset labels")]
    NoEndpoints,
    /// Endpoints exist but none is healthy.
    #[error("none of the {0} endpoints is healthy")]
    NoHealthyEndpoints(usize),
    /// Every healthy endpoint is ejected by outlier detection.
    #[error("all {0} healthy endpoints are ejected by outlier detection")]
    AllEjected(usize),
}

/// The key [`Balancer::report`] takes: `address:port` (`[v6]:port`).
pub fn endpoint_key(ep: &pb::Endpoint) -> String {
    let mut key = String::with_capacity(ep.address.len() + 8);
    write_endpoint_key(&mut key, ep);
    key
}

/// Writes [`endpoint_key`] into `key` (cleared first), without `fmt`: the
/// balancer does this for every endpoint on every pick.
fn write_endpoint_key(key: &mut String, ep: &pb::Endpoint) {
    key.clear();
    if ep.address.contains(':') {
        key.push('[');
        key.push_str(&ep.address);
        key.push(']');
    } else {
        key.push_str(&ep.address);
    }
    key.push(':');
    key.push_str(itoa::Buffer::new().format(ep.port));
}

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    in_flight: u32,
}

impl EndpointState {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }
}

#[derive(Debug, Default)]
struct State {
    round_robin: u64,
    /// Endpoints the last pick chose among (the base of
    /// `maxEjectionPercent`).
    known: usize,
    endpoints: foldhash::HashMap<String, EndpointState>,
}

/// Endpoint selection state for one (service, subset). Thread-safe.
#[derive(Debug, Default)]
pub struct Balancer {
    state: Mutex<State>,
}

fn region_zone_subzone(locality: &str) -> [&str; 3] {
    let mut it = locality.splitn(3, '/');
    [
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    ]
}

/// Failover tier of an endpoint for a caller (lower is preferred):
/// 0 same region/zone/subzone, 1 same zone, 2 same region, 3.. the
/// `failover` target regions of the caller's region in order, then the
/// rest.
fn tier(endpoint: &str, caller: [&str; 3], failover: &[(String, String)]) -> usize {
    let e = region_zone_subzone(endpoint);
    let c = caller;
    if e == c {
        return 0;
    }
    if e[0] == c[0] && e[1] == c[1] {
        return 1;
    }
    if e[0] == c[0] {
        return 2;
    }
    let targets = failover.iter().filter(|(from, _)| from == c[0]);
    match targets.clone().position(|(_, to)| to == e[0]) {
        Some(i) => 3 + i,
        None => 3 + targets.count(),
    }
}

/// The candidate at `point` in `0..sum of weights`.
fn weighted(cands: &[(usize, u64)], point: u64) -> usize {
    let mut acc = 0;
    for &(i, w) in cands {
        acc += w;
        if point < acc {
            return i;
        }
    }
    cands.last().map_or(0, |c| c.0)
}

fn point(r: f64, total: u64) -> u64 {
    ((r.clamp(0.0, 1.0) * total as f64) as u64).min(total.saturating_sub(1))
}

impl Balancer {
    /// A balancer with no history.
    pub fn new() -> Balancer {
        Balancer::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters that are
        // still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks one of `endpoints` (returns its index) for a caller in
    /// `caller_locality` (`region/zone/subzone`), with `r` in `0..1`.
    ///
    /// Candidates are the healthy endpoints carrying every `subset_labels`
    /// label and not ejected; each counts `weight` times (a gateway stands
    /// for that many endpoints). With outlier detection and locality
    /// balancing on, only the best failover tier that has a candidate is
    /// used (see [`tier`]); otherwise traffic spreads over all candidates
    /// of all clusters by weight.
    pub fn pick(
        &self,
        endpoints: &[pb::Endpoint],
        subset_labels: Option<&Labels>,
        policy: &TrafficPolicy,
        caller_locality: &str,
        now: Instant,
        r: f64,
    ) -> Result<usize, PickError> {
        // One pass over the endpoints, with one buffer for their keys: this
        // runs on every request.
        let mut key = String::with_capacity(64);
        let caller =
            (policy.outlier.is_some() && policy.locality.enabled && !caller_locality.is_empty())
                .then(|| region_zone_subzone(caller_locality));
        let mut st = self.lock();
        if st.endpoints.len() > 2 * endpoints.len() + 16 {
            let all: foldhash::HashSet<String> = endpoints.iter().map(endpoint_key).collect();
            st.endpoints
                .retain(|k, s| s.in_flight > 0 || s.ejected(now) || all.contains(k));
        }
        let (mut in_subset, mut healthy) = (0, 0);
        let mut best_tier = usize::MAX;
        // (index, weight) of the endpoints traffic may go to.
        let mut cands: Vec<(usize, u64)> = Vec::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            let wanted = subset_labels
                .is_none_or(|want| want.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
            if !wanted {
                continue;
            }
            in_subset += 1;
            if !e.healthy {
                continue;
            }
            healthy += 1;
            write_endpoint_key(&mut key, e);
            if let Some(s) = st.endpoints.get_mut(key.as_str()) {
                if s.ejected(now) {
                    continue;
                }
                if s.ejected_until.take().is_some() {
                    // Back from ejection with a clean slate.
                    s.consecutive_5xx = 0;
                    s.consecutive_gateway = 0;
                }
            }
            if let Some(caller) = caller {
                let t = tier(&e.locality, caller, &policy.locality.failover);
                if t > best_tier {
                    continue;
                }
                if t < best_tier {
                    best_tier = t;
                    cands.clear();
                }
            }
            cands.push((i, u64::from(e.weight.max(1))));
        }
        st.known = healthy;
        if in_subset == 0 {
            return Err(PickError::NoEndpoints);
        }
        if healthy == 0 {
            return Err(PickError::NoHealthyEndpoints(in_subset));
        }
        if cands.is_empty() {
            return Err(PickError::AllEjected(healthy));
        }
        let total: u64 = cands.iter().map(|c| c.1).sum();
        let chosen = match policy.lb {
            LbAlgorithm::RoundRobin => {
                let p = st.round_robin % total;
                st.round_robin = st.round_robin.wrapping_add(1);
                weighted(&cands, p)
            }
            LbAlgorithm::Random | LbAlgorithm::Passthrough => weighted(&cands, point(r, total)),
            LbAlgorithm::LeastRequest => {
                // Power of two choices; the second draw comes from the low
                // bits of `r`.
                let a = weighted(&cands, point(r, total));
                let b = weighted(&cands, point((r * 65536.0).fract(), total));
                let mut load = |i: usize| {
                    write_endpoint_key(&mut key, &endpoints[i]);
                    let in_flight = st.endpoints.get(key.as_str()).map_or(0, |s| s.in_flight);
                    (u64::from(in_flight), u64::from(endpoints[i].weight.max(1)))
                };
                let ((la, wa), (lb, wb)) = (load(a), load(b));
                // in_flight / weight, compared without division.
                if lb * wa < la * wb { b } else { a }
            }
        };
        write_endpoint_key(&mut key, &endpoints[chosen]);
        match st.endpoints.get_mut(key.as_str()) {
            Some(s) => s.in_flight += 1,
            None => {
                st.endpoints.insert(
                    key,
                    EndpointState {
                        in_flight: 1,
                        ..EndpointState::default()
                    },
                );
            }
        }
        Ok(chosen)
    }

    /// Records how a request to the endpoint `endpoint_key` (see
    /// [`endpoint_key`]) ended, and ejects it when outlier detection says
    /// so: after `consecutive5xxErrors` 5xx answers (connect failures and
    /// resets count) or `consecutiveGatewayErrors` 502/503/504 in a row,
    /// for `baseEjectionTime` × times ejected, unless `maxEjectionPercent`
    /// of the endpoints are already ejected (Envoy's check: ejected share
    /// before this one below the maximum).
    pub fn report(
        &self,
        endpoint_key: &str,
        outcome: Outcome,
        policy: &TrafficPolicy,
        now: Instant,
    ) {
        let mut st = self.lock();
        let known = st.known.max(1);
        if !st.endpoints.contains_key(endpoint_key) {
            st.endpoints
                .insert(endpoint_key.to_owned(), EndpointState::default());
        }
        let State { endpoints, .. } = &mut *st;
        let Some(e) = endpoints.get_mut(endpoint_key) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
            }
            Outcome::Status(s) if s < 500 => {
                e.consecutive_5xx = 0;
                e.consecutive_gateway = 0;
            }
            Outcome::Status(s) => {
                e.consecutive_5xx += 1;
                if matches!(s, 502..=504) {
                    e.consecutive_gateway += 1;
                } else {
                    e.consecutive_gateway = 0;
                }
            }
            Outcome::ConnectFailure | Outcome::Reset => {
                e.consecutive_5xx += 1;
                e.consecutive_gateway += 1;
            }
        }
        let Some(od) = policy.outlier else { return };
        if e.ejected(now) {
            return;
        }
        let tripped = (od.consecutive_5xx > 0 && e.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_gateway > 0 && e.consecutive_gateway >= od.consecutive_gateway);
        if !tripped {
            return;
        }
        // Counted only when about to eject: a scan of every endpoint.
        let ejected_now = endpoints.values().filter(|s| s.ejected(now)).count();
        let Some(e) = endpoints.get_mut(endpoint_key) else {
            return;
        };
        if (ejected_now as u64) * 100 < u64::from(od.max_ejection_percent) * known as u64 {
            e.times_ejected += 1;
            e.ejected_until = Some(now + od.base_ejection_time * e.times_ejected);
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
        }
    }

    /// Keys of the endpoints ejected at `now`, sorted (for metrics and
    /// debugging).
    pub fn ejected(&self, now: Instant) -> Vec<String> {
        let st = self.lock();
        let mut keys: Vec<String> = st
            .endpoints
            .iter()
            .filter(|(_, s)| s.ejected(now))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::traffic::{LocalityPolicy, OutlierPolicy};
    use super::*;

    fn ep(addr: &str, locality: &str, weight: u32, version: &str) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            port: 15006,
            locality: locality.into(),
            weight,
            healthy: true,
            labels: [("version".to_owned(), version.to_owned())].into(),
            ..Default::default()
        }
    }

    fn policy(lb: LbAlgorithm, outlier: Option<OutlierPolicy>) -> TrafficPolicy {
        TrafficPolicy {
            lb,
            outlier,
            tls: true,
            ..Default::default()
        }
    }

    fn od(consecutive_5xx: u32, max_ejection_percent: u32) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent,
            ..Default::default()
        }
    }

    /// Picks `n` times with evenly spread `r`, reporting success, and
    /// counts picks per index.
    fn spread(
        b: &Balancer,
        eps: &[pb::Endpoint],
        p: &TrafficPolicy,
        caller: &str,
        now: Instant,
        n: u32,
    ) -> Vec<u32> {
        let mut counts = vec![0; eps.len()];
        for k in 0..n {
            let i = b
                .pick(eps, None, p, caller, now, f64::from(k) / f64::from(n))
                .unwrap();
            b.report(&endpoint_key(&eps[i]), Outcome::Success, p, now);
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_cycles_by_weight() {
        let eps = [ep("10.0.0.1", "", 1, "v1"), ep("10.0.0.2", "", 2, "v1")];
        let b = Balancer::new();
        let p = policy(LbAlgorithm::RoundRobin, None);
        let picks: Vec<usize> = (0..6)
            .map(|_| b.pick(&eps, None, &p, "", Instant::now(), 0.0).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 1, 0, 1, 1]);
    }

    #[test]
    fn weighted_spread_by_endpoint_weight_across_clusters() {
        // A local pod and a remote gateway standing for 3 endpoints.
        let mut gw = ep("192.0.2.1", "eu/b/", 3, "v1");
        gw.kind = pb::endpoint::Kind::Gateway as i32;
        let eps = [ep("10.0.0.1", "us/a/", 1, "v1"), gw];
        let b = Balancer::new();
        let now = Instant::now();
        for lb in [
            LbAlgorithm::Random,
            LbAlgorithm::RoundRobin,
            LbAlgorithm::LeastRequest,
        ] {
            let counts = spread(&b, &eps, &policy(lb, None), "us/a/", now, 400);
            assert_eq!(counts, [100, 300], "{lb:?}");
        }
    }

    #[test]
    fn subset_and_health_filters() {
        let mut sick = ep("10.0.0.3", "", 1, "v2");
        sick.healthy = false;
        let eps = [
            ep("10.0.0.1", "", 1, "v1"),
            ep("10.0.0.2", "", 1, "v2"),
            sick,
        ];
        let b = Balancer::new();
        let p = policy(LbAlgorithm::Random, None);
        let v2: Labels = [("version".to_owned(), "v2".to_owned())].into();
        for k in 0..10 {
            assert_eq!(
                b.pick(&eps, Some(&v2), &p, "", Instant::now(), f64::from(k) / 10.0),
                Ok(1)
            );
        }
        let v9: Labels = [("version".to_owned(), "v9".to_owned())].into();
        assert_eq!(
            b.pick(&eps, Some(&v9), &p, "", Instant::now(), 0.5),
            Err(PickError::NoEndpoints)
        );
        assert_eq!(
            b.pick(&eps[2..], None, &p, "", Instant::now(), 0.5),
            Err(PickError::NoHealthyEndpoints(1))
        );
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = [ep("10.0.0.1", "", 1, "v1"), ep("10.0.0.2", "", 1, "v1")];
        let b = Balancer::new();
        let p = policy(LbAlgorithm::LeastRequest, None);
        let now = Instant::now();
        // r = 0.0 draws endpoint 0 twice: it now has a request in flight.
        assert_eq!(b.pick(&eps, None, &p, "", now, 0.0), Ok(0));
        // An r whose first draw is endpoint 0 and second draw endpoint 1:
        // the idle endpoint 1 wins.
        let r = (0..1000)
            .map(|k| f64::from(k) / 1000.0)
            .find(|r| *r < 0.5 && (r * 65536.0).fract() >= 0.5)
            .unwrap();
        assert_eq!(
            b.pick(&eps, None, &p, "", now, r),
            Ok(1),
            "endpoint 0 is busy"
        );
        b.report(&endpoint_key(&eps[0]), Outcome::Success, &p, now);
        b.report(&endpoint_key(&eps[1]), Outcome::Success, &p, now);
        assert_eq!(
            b.pick(&eps, None, &p, "", now, r),
            Ok(0),
            "equal load: first draw"
        );
    }

    #[test]
    fn outlier_ejection_and_return() {
        let eps: Vec<pb::Endpoint> = (1..=4)
            .map(|i| ep(&format!("10.0.0.{i}"), "", 1, "v1"))
            .collect();
        let b = Balancer::new();
        let p = policy(LbAlgorithm::RoundRobin, Some(od(3, 100)));
        let t0 = Instant::now();
        let bad = endpoint_key(&eps[0]);
        b.pick(&eps, None, &p, "", t0, 0.0).unwrap();
        for s in [503, 500] {
            b.report(&bad, Outcome::Status(s), &p, t0);
        }
        b.report(&bad, Outcome::Success, &p, t0);
        assert!(b.ejected(t0).is_empty(), "a success resets the count");
        for s in [
            Outcome::Status(503),
            Outcome::ConnectFailure,
            Outcome::Status(502),
        ] {
            b.report(&bad, s, &p, t0);
        }
        assert_eq!(b.ejected(t0), std::slice::from_ref(&bad));
        let during = spread(&b, &eps, &p, "", t0 + Duration::from_secs(29), 30);
        assert_eq!(during[0], 0, "ejected endpoint gets no traffic");
        let after = t0 + Duration::from_secs(30);
        assert!(b.ejected(after).is_empty());
        assert!(
            spread(&b, &eps, &p, "", after, 8)[0] > 0,
            "returns after baseEjectionTime"
        );
        // Second ejection lasts twice as long.
        for _ in 0..3 {
            b.report(&bad, Outcome::Status(500), &p, after);
        }
        assert_eq!(b.ejected(after + Duration::from_secs(59)), [bad]);
        assert!(b.ejected(after + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn gateway_errors_only_count_502_to_504() {
        let eps = [ep("10.0.0.1", "", 1, "v1"), ep("10.0.0.2", "", 1, "v1")];
        let b = Balancer::new();
        let p = policy(
            LbAlgorithm::Random,
            Some(OutlierPolicy {
                consecutive_5xx: 0,
                consecutive_gateway: 2,
                max_ejection_percent: 100,
                ..od(0, 100)
            }),
        );
        let now = Instant::now();
        b.pick(&eps, None, &p, "", now, 0.0).unwrap();
        let k = endpoint_key(&eps[0]);
        for s in [500, 500, 500, 503] {
            b.report(&k, Outcome::Status(s), &p, now);
        }
        assert!(b.ejected(now).is_empty());
        b.report(&k, Outcome::Status(504), &p, now);
        assert_eq!(b.ejected(now), [k]);
    }

    #[test]
    fn max_ejection_percent_caps_ejections() {
        let eps: Vec<pb::Endpoint> = (1..=4)
            .map(|i| ep(&format!("10.0.0.{i}"), "", 1, "v1"))
            .collect();
        let now = Instant::now();
        let cases = [(0, 0), (10, 1), (25, 1), (26, 2), (50, 2), (100, 4)];
        for (max, want) in cases {
            let b = Balancer::new();
            let p = policy(LbAlgorithm::Random, Some(od(1, max)));
            b.pick(&eps, None, &p, "", now, 0.0).unwrap();
            for e in &eps {
                b.report(&endpoint_key(e), Outcome::Status(500), &p, now);
            }
            assert_eq!(b.ejected(now).len(), want, "maxEjectionPercent {max}");
        }
        let b = Balancer::new();
        let p = policy(LbAlgorithm::Random, Some(od(1, 100)));
        b.pick(&eps, None, &p, "", now, 0.0).unwrap();
        for e in &eps {
            b.report(&endpoint_key(e), Outcome::ConnectFailure, &p, now);
        }
        assert_eq!(
            b.pick(&eps, None, &p, "", now, 0.5),
            Err(PickError::AllEjected(4))
        );
    }

    #[test]
    fn locality_failover_order() {
        let eps = [
            ep("10.0.0.1", "us-east/a/x", 1, "v1"),
            ep("10.0.0.2", "us-east/b/y", 1, "v1"),
            ep("10.0.0.3", "eu-west/a/x", 1, "v1"),
            ep("10.0.0.4", "us-west/a/x", 1, "v1"),
        ];
        let now = Instant::now();
        let mut p = policy(LbAlgorithm::Random, Some(od(1, 100)));
        p.locality = LocalityPolicy {
            enabled: true,
            failover: vec![("us-east".into(), "us-west".into())],
        };
        let b = Balancer::new();
        let only = |b: &Balancer| {
            let picked: std::collections::BTreeSet<usize> = (0..20)
                .map(|k| {
                    let i = b
                        .pick(&eps, None, &p, "us-east/a/x", now, f64::from(k) / 20.0)
                        .unwrap();
                    b.report(&endpoint_key(&eps[i]), Outcome::Success, &p, now);
                    i
                })
                .collect();
            picked.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(only(&b), [0], "same zone first");
        b.report(&endpoint_key(&eps[0]), Outcome::Status(503), &p, now);
        assert_eq!(only(&b), [1], "then same region");
        b.report(&endpoint_key(&eps[1]), Outcome::Status(503), &p, now);
        assert_eq!(only(&b), [3], "then the failover region, before eu-west");
        b.report(&endpoint_key(&eps[3]), Outcome::Status(503), &p, now);
        assert_eq!(only(&b), [2], "then the rest");
        // Without outlier detection, no failover: spread over everything.
        let spread_all = policy(LbAlgorithm::Random, None);
        let counts = spread(&Balancer::new(), &eps, &spread_all, "us-east/a/x", now, 40);
        assert_eq!(counts, [10, 10, 10, 10]);
        // Disabled locality balancing spreads too.
        let mut off = policy(LbAlgorithm::Random, Some(od(5, 10)));
        off.locality.enabled = false;
        assert_eq!(
            spread(&Balancer::new(), &eps, &off, "us-east/a/x", now, 40),
            [10, 10, 10, 10]
        );
    }

    #[test]
    fn tiers() {
        let f = vec![
            ("r1".to_owned(), "r3".to_owned()),
            ("r1".to_owned(), "r2".to_owned()),
        ];
        let cases = [
            ("r1/z1/s1", 0),
            ("r1/z1/s2", 1),
            ("r1/z2/s1", 2),
            ("r3/z1/s1", 3),
            ("r2/z1/s1", 4),
            ("r4/z1/s1", 5),
            ("", 5),
        ];
        for (loc, want) in cases {
            assert_eq!(
                tier(loc, region_zone_subzone("r1/z1/s1"), &f),
                want,
                "{loc}"
            );
        }
    }
}
