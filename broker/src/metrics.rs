//! The broker's Prometheus metrics (`strait_broker_*`), and which clusters
//! have a live sync stream.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strait_ca::ClusterName;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

pub struct Metrics {
    connected: Gauge,
    exports: Gauge,
    imports_pushed: Counter,
    joins: Family<ResultLabel, Counter>,
    sync_apply: Histogram,
    streams: Mutex<BTreeMap<String, usize>>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            connected: Gauge::default(),
            exports: Gauge::default(),
            imports_pushed: Counter::default(),
            joins: Family::default(),
            sync_apply: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            streams: Mutex::new(BTreeMap::new()),
        };
        let r = registry.sub_registry_with_prefix("strait_broker");
        r.register(
            "clusters_connected",
            "Clusters with a live sync stream",
            m.connected.clone(),
        );
        r.register(
            "exports",
            "Services exported across the mesh",
            m.exports.clone(),
        );
        r.register(
            "imports_pushed",
            "Import updates pushed to clusters",
            m.imports_pushed.clone(),
        );
        r.register("joins", "Join attempts by result", m.joins.clone());
        r.register(
            "sync_apply_seconds",
            "Time to validate, durably store and apply one exports update",
            m.sync_apply.clone(),
        );
        m
    }

    /// Marks `cluster` connected until the guard drops.
    pub fn connected(&self, cluster: &ClusterName) -> ConnectedGuard<'_> {
        let mut s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        *s.entry(cluster.to_string()).or_default() += 1;
        self.connected
            .set(i64::try_from(s.len()).unwrap_or(i64::MAX));
        ConnectedGuard {
            metrics: self,
            cluster: cluster.to_string(),
        }
    }

    pub fn is_connected(&self, cluster: &str) -> bool {
        let s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        s.get(cluster).is_some_and(|n| *n > 0)
    }

    pub fn set_exports(&self, n: usize) {
        self.exports.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn imports_pushed(&self) {
        self.imports_pushed.inc();
    }

    pub fn join(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.joins.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn sync_applied(&self, took: Duration) {
        self.sync_apply.observe(took.as_secs_f64());
    }
}

pub struct ConnectedGuard<'a> {
    metrics: &'a Metrics,
    cluster: String,
}

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        let mut s = self
            .metrics
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = s.get_mut(&self.cluster) {
            *n -= 1;
            if *n == 0 {
                s.remove(&self.cluster);
            }
        }
        self.metrics
            .connected
            .set(i64::try_from(s.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connected_counts_clusters_not_streams() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        let east = ClusterName::new("east").unwrap();
        let a = m.connected(&east);
        let b = m.connected(&east);
        assert!(m.is_connected("east"));
        drop(a);
        assert!(m.is_connected("east"));
        drop(b);
        assert!(!m.is_connected("east"));
        m.join(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("strait_broker_clusters_connected 0"),
            "{text}"
        );
        assert!(
            text.contains("strait_broker_joins_total{result=\"ok\"} 1"),
            "{text}"
        );
    }
}
