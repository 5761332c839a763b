//! Endpoint picking with outlier reporting: the balancer's choice for one
//! attempt, avoiding the endpoints tried before, and its outcome reported
//! exactly once.

use std::time::Instant;

use strait_proto::strait::mesh::v1 as pb;

use crate::Shared;
use crate::policy::{Outcome, TrafficPolicy, endpoint_key};

/// An endpoint the balancer picked. Its outcome is reported exactly once:
/// by [`Picked::report`], or, when the request is abandoned first (the
/// client went away), on drop as a non-error answer, which keeps the
/// balancer's in-flight count right.
pub(super) struct Picked<'a> {
    pub(super) balancer: &'a crate::policy::Balancer,
    pub(super) tp: &'a TrafficPolicy,
    pub(super) key: String,
    /// Index of the endpoint in its service's `endpoints`.
    pub(super) index: usize,
    pub(super) reported: bool,
}

impl Picked<'_> {
    pub(super) fn report(mut self, outcome: Outcome) {
        self.reported = true;
        self.balancer
            .report(&self.key, outcome, self.tp, Instant::now());
    }
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        if !self.reported {
            // nginx's "client closed request": not the endpoint's fault.
            self.balancer
                .report(&self.key, Outcome::Status(499), self.tp, Instant::now());
        }
    }
}

/// Picks an endpoint of `service` for `tp`, avoiding the `tried` ones
/// while others can serve (Envoy's `previous_hosts` retry predicate,
/// which Istio turns on).
pub(super) fn pick<'a>(
    shared: &'a Shared,
    service: &pb::Service,
    tp: &'a TrafficPolicy,
    locality: &str,
    tried: &[String],
) -> Result<Picked<'a>, crate::policy::PickError> {
    let from = |endpoints: &[pb::Endpoint]| {
        shared.balancer.pick(
            endpoints,
            tp.subset_labels.as_ref(),
            tp,
            locality,
            Instant::now(),
            fastrand::f64(),
        )
    };
    let all = &service.endpoints;
    let index = if tried.is_empty() {
        from(all)?
    } else {
        // A retry (the uncommon path, so copying is fine): the endpoints
        // not tried yet, mapped back to their index in `all`.
        let fresh: Vec<usize> = (0..all.len())
            .filter(|&i| !tried.contains(&endpoint_key(&all[i])))
            .collect();
        let fresh_endpoints: Vec<pb::Endpoint> = fresh.iter().map(|&i| all[i].clone()).collect();
        if fresh.is_empty() {
            from(all)?
        } else {
            from(&fresh_endpoints)
                .map(|j| fresh[j])
                .or_else(|_| from(all))?
        }
    };
    Ok(Picked {
        balancer: &shared.balancer,
        tp,
        key: endpoint_key(&all[index]),
        index,
        reported: false,
    })
}
