//! `--access-log off`: no line is written, the metrics still count. A test
//! binary of its own: the switch is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use strait_ca::testing::TestPki;
use strait_sidecar::metrics::{logged_lines, set_access_log};

/// `istio_requests_total` of `sidecar` with reporter `reporter`.
fn requests(sidecar: &Sidecar, reporter: &str) -> u64 {
    sidecar
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn off_writes_no_line_and_the_metrics_still_count() {
    let pki = TestPki::new(TD);
    let (client, server, _mesh) = sleep_and_echo(&pki, backend("v1").await).await;
    set_access_log(false);
    for _ in 0..3 {
        let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(logged_lines(), 0);
    assert_eq!(requests(&client, "source"), 3);
    assert_eq!(requests(&server, "destination"), 3);

    // On again: a line per request from each side.
    set_access_log(true);
    let r = via_proxy(client.outbound, "http://echo.demo:8080/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(logged_lines(), 2);
}
