//! The lab's clients, as an app behind a cluster's client sidecar calls
//! through it: `lab curl` (HTTP/1.1 through the HTTP proxy, answers
//! summarised), and h2c and WebSocket calls for the demo and the tests.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use super::netns;
use super::plan::Lab;

/// What `lab curl` saw.
#[derive(Debug, Default)]
pub struct CurlSummary {
    pub codes: std::collections::BTreeMap<String, u32>,
    pub answered_by: std::collections::BTreeMap<String, u32>,
    pub identities: std::collections::BTreeMap<String, u32>,
    pub bodies: Vec<serde_json::Value>,
}

/// How long `lab curl` waits for one answer by default.
pub const CURL_TIMEOUT: Duration = Duration::from_secs(10);

/// The status-code entry of a request that got no answer in time.
pub fn timed_out(timeout: Duration) -> String {
    format!(
        "timed out (no answer within {})",
        crate::cli::format_duration(timeout)
    )
}

impl CurlSummary {
    /// Requests that got no 200: other codes, time-outs and errors.
    pub fn failed(&self) -> u32 {
        self.codes
            .iter()
            .filter(|(c, _)| c.as_str() != "200")
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let hist = |title: &str, m: &std::collections::BTreeMap<String, u32>, out: &mut String| {
            out.push_str(title);
            out.push('\n');
            for (k, n) in m {
                out.push_str(&format!("  {n:>5}  {k}\n"));
            }
        };
        hist("status codes:", &self.codes, &mut out);
        hist(
            "answered by (cluster/service/version):",
            &self.answered_by,
            &mut out,
        );
        hist("identity the server saw:", &self.identities, &mut out);
        out
    }
}

/// N requests through a cluster's client sidecar (HTTP proxy), each
/// given [`CURL_TIMEOUT`].
pub fn curl(lab: &Lab, cluster: &str, url: &str, n: u32) -> Result<CurlSummary> {
    curl_with(lab, cluster, url, n, CURL_TIMEOUT)
}

/// [`curl`] with a per-request `timeout`. A request that gets no answer
/// in time, or fails, is counted under "status codes" (as
/// [`timed_out`] or `error: ...`) and the next one is sent: the summary
/// says what came back of all `n`.
pub fn curl_with(
    lab: &Lab,
    cluster: &str,
    url: &str,
    n: u32,
    timeout: Duration,
) -> Result<CurlSummary> {
    let c = super::objects::find_cluster(lab, cluster)?;
    if !url.starts_with("http://") {
        return Err(crate::cli::UsageError(format!(
            "{url}: only http:// URLs (the sidecar adds mTLS)"
        ))
        .into());
    }
    let proxy = c
        .client_proxy
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("bad client proxy {}", c.client_proxy))?
        .to_string();
    let mut sum = CurlSummary::default();
    for _ in 0..n {
        let got = netns::within(c.netns.as_deref(), || {
            proxy_get_within(&proxy, url, timeout)
        })?;
        let (code, body) = match got {
            Ok(answer) => answer,
            Err(GetError::TimedOut) => {
                *sum.codes.entry(timed_out(timeout)).or_default() += 1;
                continue;
            }
            Err(GetError::Other(e)) => {
                *sum.codes.entry(format!("error: {e:#}")).or_default() += 1;
                continue;
            }
        };
        *sum.codes.entry(code.to_string()).or_default() += 1;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
            let who = format!(
                "{}/{}/{}",
                v["cluster"].as_str().unwrap_or("?"),
                v["service"].as_str().unwrap_or("?"),
                v["version"].as_str().unwrap_or("?")
            );
            *sum.answered_by.entry(who).or_default() += 1;
            let id = v["peer_identity"].as_str().unwrap_or("(none)").to_string();
            *sum.identities.entry(id).or_default() += 1;
            sum.bodies.push(v);
        } else if code != 200 {
            *sum.answered_by
                .entry(format!(
                    "({})",
                    body.trim().chars().take(80).collect::<String>()
                ))
                .or_default() += 1;
        }
    }
    Ok(sum)
}

/// Why [`proxy_get_within`] got no answer.
#[derive(Debug)]
pub enum GetError {
    /// None within the time-out.
    TimedOut,
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for GetError {
    fn from(e: E) -> Self {
        GetError::Other(e.into())
    }
}

/// One HTTP/1.1 GET of `url` through the proxy at `proxy`; status and body
/// (30 s for the answer).
pub fn proxy_get(proxy: &str, url: &str) -> Result<(u16, String)> {
    proxy_get_within(proxy, url, Duration::from_secs(30)).map_err(|e| match e {
        GetError::TimedOut => {
            anyhow!("GET {url}: no answer from the client sidecar at {proxy} within 30s")
        }
        GetError::Other(e) => e,
    })
}

/// [`proxy_get`] with `timeout` for the whole answer.
pub fn proxy_get_within(
    proxy: &str,
    url: &str,
    timeout: Duration,
) -> Result<(u16, String), GetError> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = proxy.parse().with_context(|| format!("proxy {proxy}"))?;
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the client sidecar at {proxy}"))?;
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .ok_or_else(|| anyhow!("{url}: only http:// URLs (the sidecar adds mTLS)"))?;
    write!(
        s,
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    // The time-out bounds the whole answer, not each read.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(GetError::TimedOut);
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(GetError::TimedOut);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow!("GET {url} through {proxy}: {e}").into()),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP answer from {proxy}: {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// One GET of `path` through the proxy at `proxy` over HTTP/2 with prior
/// knowledge (h2c, as gRPC clients speak), naming the service in
/// `:authority`; status and body.
pub fn proxy_get_h2(proxy: &str, authority: &str, path: &str) -> Result<(u16, String)> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(proxy),
        )
        .await
        .map_err(|_| anyhow!("connecting to the client sidecar at {proxy} timed out"))?
        .with_context(|| format!("cannot reach the client sidecar at {proxy}"))?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .with_context(|| format!("HTTP/2 with {proxy}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://{authority}{path}"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
            .await
            .map_err(|_| anyhow!("GET {authority}{path} over h2c: no answer within 30s"))?
            .with_context(|| format!("GET {authority}{path} over h2c through {proxy}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

/// A WebSocket handshake for `url` through the HTTP proxy at `proxy`,
/// then `msg` sent and read back: the echo's first line (who answered,
/// as JSON) and what came back.
pub fn websocket_echo(proxy: &str, url: &str, msg: &str) -> Result<(serde_json::Value, String)> {
    use std::io::{BufRead, Read, Write};
    let addr: std::net::SocketAddr = proxy.parse().with_context(|| format!("proxy {proxy}"))?;
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .ok_or_else(|| anyhow!("{url}: only http:// URLs"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the client sidecar at {proxy}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 101") {
        bail!("WebSocket handshake for {url}: {:?}", status.trim_end());
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("WebSocket handshake for {url}: closed in the head");
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut first = String::new();
    r.read_line(&mut first)?;
    s.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    r.read_exact(&mut back)
        .with_context(|| format!("reading {msg:?} back over the WebSocket"))?;
    let who =
        serde_json::from_str(&first).with_context(|| format!("the echo's first line {first:?}"))?;
    Ok((who, String::from_utf8_lossy(&back).into_owned()))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_silent_proxy_is_a_time_out_within_the_deadline() {
        // Accepts and never answers, as a sidecar whose upstream stalls.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = l.local_addr().unwrap().to_string();
        let start = std::time::Instant::now();
        let got = proxy_get_within(&proxy, "http://echo.demo:8080/", Duration::from_millis(300));
        assert!(matches!(got, Err(GetError::TimedOut)), "{got:?}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(l);
        // Nothing listening: an error, not a time-out.
        let got = proxy_get_within(&proxy, "http://echo.demo:8080/", Duration::from_millis(300));
        assert!(matches!(got, Err(GetError::Other(_))), "{got:?}");
    }

    #[test]
    fn time_outs_count_as_failed_and_show_in_the_summary() {
        let mut sum = CurlSummary::default();
        sum.codes.insert("200".into(), 7);
        sum.codes.insert(timed_out(Duration::from_secs(10)), 3);
        assert_eq!(sum.failed(), 3);
        assert!(
            sum.render()
                .contains("      3  timed out (no answer within 10s)"),
            "{}",
            sum.render()
        );
    }

    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
