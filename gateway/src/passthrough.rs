//! The SNI passthrough listener (Istio `AUTO_PASSTHROUGH` compatible): read
//! the ClientHello without terminating TLS, admit only exported services,
//! connect to a healthy local endpoint (one retry on another), replay the
//! bytes read so far and splice both ways with half-close and an idle
//! timeout. Anything else is closed and counted by reason; one connection
//! never disturbs another.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::hello::{self, Progress};
use crate::route::{self, ISTIO_ALPN, RouteTable};

/// Timeouts and checks of the passthrough listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// The whole ClientHello must arrive within this.
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Require one of Istio's ALPN values.
    pub require_istio_alpn: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            require_istio_alpn: true,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// `strait_gateway_*` metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    connections: Family<Outcome, Counter>,
    tunnels: Family<Outcome, Counter>,
    streams: Family<Outcome, Counter>,
    active: Gauge,
    tunnels_active: Gauge,
    bytes_sent: Family<ServiceLabel, Counter>,
    bytes_received: Family<ServiceLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("strait_gateway");
        r.register(
            "connections",
            "Passthrough connections by outcome and reason",
            m.connections.clone(),
        );
        r.register(
            "active_connections",
            "Connections being spliced",
            m.active.clone(),
        );
        r.register(
            "active_tunnels",
            "QUIC tunnels from other gateways that are up",
            m.tunnels_active.clone(),
        );
        r.register(
            "tunnel_connections",
            "QUIC tunnel connections from other gateways, by outcome",
            m.tunnels.clone(),
        );
        r.register(
            "tunnel_streams",
            "Tunnel and egress streams by outcome and reason",
            m.streams.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes from clients to endpoints, by service",
            m.bytes_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes from endpoints to clients, by service",
            m.bytes_received.clone(),
        );
        m
    }

    /// Connections being spliced right now.
    pub fn active(&self) -> i64 {
        self.active.get()
    }

    /// Counts one incoming tunnel up until the guard drops.
    pub(crate) fn tunnel_up(&self) -> TunnelGuard {
        self.tunnels_active.inc();
        TunnelGuard(self.tunnels_active.clone())
    }

    pub(crate) fn count_tunnel(&self, outcome: &'static str, reason: &'static str) {
        self.tunnels
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }

    pub(crate) fn count_stream(&self, outcome: &'static str, reason: &'static str) {
        self.streams
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }

    fn count(&self, outcome: &'static str, reason: &'static str) {
        self.connections
            .get_or_create(&Outcome { outcome, reason })
            .inc();
    }
}

/// Decrements the active-tunnel gauge when a tunnel ends.
pub(crate) struct TunnelGuard(Gauge);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The data-plane runtime for `worker_threads` workers (`None`: one per
/// CPU). With one worker it is a current-thread runtime: the I/O driver,
/// the timers and every connection run on the calling thread, with no
/// work-stealing queues and no cross-thread wake-ups; the multi-thread
/// scheduler only pays off when there are several workers to balance.
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        Some(0) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "worker threads: at least 1 is needed (got 0)",
        )),
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = n {
                builder.worker_threads(n);
            }
            builder.enable_all().build()
        }
    }
}

/// Serves until the listener task is dropped (or `shutdown` flips), then
/// stops accepting; live connections finish on their own.
pub async fn serve(
    listener: TcpListener,
    table: watch::Receiver<Arc<RouteTable>>,
    config: Config,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let table = table.borrow().clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            handle(tcp, peer, &table, &config, &metrics).await;
        });
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    table: &RouteTable,
    config: &Config,
    metrics: &Metrics,
) {
    // 1. The ClientHello, within the deadline and the size limit.
    let (hello, buf) = match read_hello(&mut client, config.hello_timeout).await {
        Ok(h) => h,
        Err((reason, detail)) => {
            metrics.count("refused", reason);
            tracing::info!(%peer, reason, detail, "connection refused");
            return;
        }
    };
    // 2. Where to.
    if config.require_istio_alpn
        && !hello
            .alpn
            .iter()
            .any(|p| ISTIO_ALPN.contains(&p.as_slice()))
    {
        metrics.count("refused", "alpn");
        tracing::info!(%peer, alpn = ?hello.alpn, "no Istio ALPN offered");
        return;
    }
    let Some(sni) = hello.server_name else {
        metrics.count("refused", "no_sni");
        return;
    };
    let target = match route::parse_target(&sni) {
        Ok(t) => t,
        Err(e) => {
            metrics.count("refused", "bad_sni");
            tracing::info!(%peer, error = %e, "connection refused");
            return;
        }
    };
    tracing::debug!(%peer, %sni, "routing");
    forward(client, buf, &target, table, config, metrics, "passthrough").await;
}

/// Reads the ClientHello at the start of `client` within `deadline`.
/// Returns it with every byte read (to replay upstream), or a metrics
/// reason and a detail.
pub async fn read_hello<S: AsyncRead + Unpin>(
    client: &mut S,
    deadline: Duration,
) -> Result<(hello::ClientHello, Vec<u8>), (&'static str, String)> {
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(deadline, async {
        loop {
            match hello::parse(&buf) {
                Ok(Progress::Done(h)) => return Ok(h),
                Ok(Progress::NeedMore) => {}
                Err(e) => return Err(("malformed_hello", e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            match client.read(&mut chunk).await {
                Ok(0) => return Err(("closed_before_hello", "client closed".to_string())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(("read_error", e.to_string())),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(h)) => Ok((h, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err((
            "hello_timeout",
            "no complete ClientHello in time".to_string(),
        )),
    }
}

/// Routes one connection to `target`: picks a healthy endpoint (one retry
/// on another), replays `buffered`, then splices. Used for passthrough
/// connections and for tunnel streams alike.
pub async fn forward<S>(
    client: S,
    buffered: Vec<u8>,
    target: &crate::route::Target,
    table: &RouteTable,
    config: &Config,
    metrics: &Metrics,
    via: &'static str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let buf = buffered;
    let candidates = match table.pick(target, 2) {
        Ok(c) => c,
        Err(e) => {
            metrics.count("refused", e.reason());
            tracing::info!(via, host = %target.host, error = %e, "connection refused");
            return;
        }
    };
    // Connect, one retry on another endpoint.
    let mut upstream = None;
    for addr in &candidates {
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                upstream = Some(s);
                break;
            }
            Ok(Err(e)) => tracing::info!(%addr, error = %e, "endpoint connect failed"),
            Err(_) => tracing::info!(%addr, "endpoint connect timed out"),
        }
    }
    let Some(mut upstream) = upstream else {
        metrics.count("failed", "connect");
        return;
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = upstream.write_all(&buf).await {
        metrics.count("failed", "upstream_write");
        tracing::info!(error = %e, "replaying the ClientHello failed");
        return;
    }
    // Not kept for the connection's life: only its length is counted.
    let replayed = buf.len() as u64;
    drop(buf);
    // Splice.
    metrics.count("spliced", "ok");
    metrics.active.inc();
    let service = ServiceLabel {
        service: target.host.clone(),
    };
    let (up, down) = splice(client, upstream, config.idle_timeout).await;
    metrics.active.dec();
    metrics
        .bytes_sent
        .get_or_create(&service)
        .inc_by(up + replayed);
    metrics.bytes_received.get_or_create(&service).inc_by(down);
    tracing::debug!(via, host = %target.host, sent = up, received = down, "connection done");
}

/// Copies both ways until both sides closed (a read EOF or read error on
/// one side shuts down writing to the other: half-close), a write fails, or
/// nothing moved for `idle`. Returns the bytes written client→upstream and
/// upstream→client.
///
/// One task and one hand-written future: each wake-up polls both
/// directions once, with no stream splitting (no lock per read), no
/// per-iteration futures or random branch order, and a direction blocked on
/// a slow writer never stops the other. The idle timer is re-armed only
/// when it fires early, not on every read.
pub async fn splice<A, B>(mut a: A, mut b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    let mut last = tokio::time::Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| {
        let u = up.poll(cx, Pin::new(&mut a), Pin::new(&mut b));
        let d = down.poll(cx, Pin::new(&mut b), Pin::new(&mut a));
        if u == Flow::Failed || d == Flow::Failed || (u == Flow::Done && d == Flow::Done) {
            return Poll::Ready(());
        }
        if up.moved || down.moved {
            up.moved = false;
            down.moved = false;
            last = tokio::time::Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = last + idle;
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    (up.bytes, down.bytes)
}

/// Where one direction of a splice stands after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Waiting on the reader or the writer, or out of budget for this
    /// wake-up (either way the task will be woken).
    Pending,
    /// The reader ended and the writer was shut down: nothing more to do.
    Done,
    /// Writing failed: the whole splice ends.
    Failed,
}

/// One direction of a splice. A chunk is read into a buffer that every
/// splice on the thread shares and written on in the same poll; only what
/// the writer does not take at once (backpressure) is kept, in a buffer of
/// the pipe's own that is freed once written out. So an idle connection
/// holds no buffer: with one 32 KiB buffer per direction, each connection
/// kept 64 KiB resident for its whole life (68 kB per idle connection
/// measured, against next to nothing for Envoy).
struct Pipe {
    /// Read but not yet written (no capacity unless the writer pushed
    /// back).
    held: Vec<u8>,
    /// `held[start..]` is still to be written.
    start: usize,
    /// Written bytes not flushed yet.
    unflushed: bool,
    /// The reader returned EOF or an error: no more reads.
    eof: bool,
    /// The writer was shut down after `eof`.
    done: bool,
    /// Bytes moved since the caller last cleared it (for the idle timer).
    moved: bool,
    /// Bytes written in total.
    bytes: u64,
}

/// The shared read buffer: a TLS record is at most ~16 KiB, so one read
/// usually takes whatever the peer has sent.
const PIPE_BUFFER: usize = 32 * 1024;

thread_local! {
    /// The read buffer of the splices on this thread (see [`Pipe`]).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; PIPE_BUFFER].into_boxed_slice());
}

/// Chunks one direction moves per wake-up before it yields. Tokio's own
/// sockets already yield through the runtime's cooperative budget, but a
/// stream outside it (a QUIC stream, say) that is always ready would
/// otherwise keep the loop going and, on a one-thread runtime, starve every
/// other connection.
const CHUNKS_PER_POLL: usize = 16;

/// What one read-and-write step did.
enum Step {
    /// A chunk went on whole: keep going.
    Moved,
    /// The reader ended (EOF or error).
    Eof,
    Pending,
    Failed,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            held: Vec::new(),
            start: 0,
            unflushed: false,
            eof: false,
            done: false,
            moved: false,
            bytes: 0,
        }
    }

    /// Moves what it can from `r` to `w` without blocking, at most
    /// [`CHUNKS_PER_POLL`] reads' worth.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Flow
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        for _ in 0..CHUNKS_PER_POLL {
            // Drain what the writer pushed back last time.
            while self.start < self.held.len() {
                match w.as_mut().poll_write(cx, &self.held[self.start..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Flow::Failed,
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.wrote(n);
                    }
                    Poll::Pending => return Flow::Pending,
                }
            }
            if self.held.capacity() > 0 {
                self.held = Vec::new();
                self.start = 0;
            }
            if self.unflushed {
                match w.as_mut().poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(_)) => return Flow::Failed,
                    Poll::Pending => return Flow::Pending,
                }
            }
            if self.eof {
                if !self.done {
                    // Half-close: the far side sees EOF; an error here (the
                    // peer already gone) changes nothing for the other
                    // direction.
                    match w.as_mut().poll_shutdown(cx) {
                        Poll::Ready(_) => self.done = true,
                        Poll::Pending => return Flow::Pending,
                    }
                }
                return Flow::Done;
            }
            // The next chunk, through the thread's buffer (a buffer of its
            // own should a stream's poll ever run another splice's).
            let step = SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => self.pass_on(cx, r.as_mut(), w.as_mut(), &mut scratch),
                Err(_) => {
                    let mut own = vec![0u8; PIPE_BUFFER];
                    self.pass_on(cx, r.as_mut(), w.as_mut(), &mut own)
                }
            });
            match step {
                Step::Moved => {}
                Step::Eof => self.eof = true,
                Step::Pending => return Flow::Pending,
                Step::Failed => return Flow::Failed,
            }
        }
        // Budget spent with work left: be polled again after the others.
        cx.waker().wake_by_ref();
        Flow::Pending
    }

    /// Reads a chunk into `scratch` and writes it on; what the writer does
    /// not take is kept in `held`.
    fn pass_on<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        scratch: &mut [u8],
    ) -> Step
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut rb = ReadBuf::new(scratch);
        let n = match r.as_mut().poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => rb.filled().len(),
            Poll::Ready(Err(_)) => return Step::Eof,
            Poll::Pending => return Step::Pending,
        };
        if n == 0 {
            return Step::Eof;
        }
        self.moved = true;
        let mut off = 0;
        while off < n {
            match w.as_mut().poll_write(cx, &scratch[off..n]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Step::Failed,
                Poll::Ready(Ok(k)) => {
                    off += k;
                    self.wrote(k);
                }
                Poll::Pending => {
                    self.held.extend_from_slice(&scratch[off..n]);
                    self.start = 0;
                    return Step::Pending;
                }
            }
        }
        Step::Moved
    }

    fn wrote(&mut self, n: usize) {
        self.bytes += n as u64;
        self.moved = true;
        self.unflushed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splice_half_closes_and_counts() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(client, server, Duration::from_secs(5)));
        client_far.write_all(b"ping").await.unwrap();
        client_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "EOF reached the server: half-close");
        // The other direction still works after the client's half-close.
        server_far.write_all(b"pong!").await.unwrap();
        server_far.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(task.await.unwrap(), (4, 5));
    }

    #[tokio::test]
    async fn splice_half_closes_from_the_server_side_first() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(client, server, Duration::from_secs(5)));
        server_far.write_all(b"hello").await.unwrap();
        server_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "EOF reached the client: half-close");
        // The client can still send after the server's half-close.
        client_far.write_all(b"late request").await.unwrap();
        client_far.shutdown().await.unwrap();
        let mut back = Vec::new();
        server_far.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"late request");
        assert_eq!(task.await.unwrap(), (12, 5));
    }

    /// Real sockets: a half-close is a FIN the peer reads as EOF while its
    /// own direction stays open.
    #[tokio::test]
    async fn splice_half_closes_tcp_sockets() {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
            (a.unwrap(), b.unwrap().0)
        }
        let (mut client_far, client) = pair().await;
        let (server, mut server_far) = pair().await;
        let task = tokio::spawn(splice(client, server, Duration::from_secs(3600)));
        client_far.write_all(b"GET").await.unwrap();
        client_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET");
        let reply = vec![42u8; 1 << 20];
        server_far.write_all(&reply).await.unwrap();
        server_far.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_far.read_to_end(&mut back).await.unwrap();
        assert!(
            back == reply,
            "the reply arrives whole after the client's FIN"
        );
        assert_eq!(task.await.unwrap(), (3, 1 << 20));
    }

    #[tokio::test]
    async fn splice_moves_large_transfers_both_ways_at_once() {
        // Small pipes on both sides and more than one buffer each way: both
        // directions must progress together, bytes intact and counted.
        let (client, client_far) = tokio::io::duplex(1024);
        let (server, server_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(client, server, Duration::from_secs(5)));
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (mut cr, mut cw) = tokio::io::split(client_far);
        let (mut sr, mut sw) = tokio::io::split(server_far);
        let (up2, down2) = (up.clone(), down.clone());
        let (_, _, got_up, got_down) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(
                async move {
                    cw.write_all(&up2).await.unwrap();
                    cw.shutdown().await.unwrap();
                },
                async move {
                    sw.write_all(&down2).await.unwrap();
                    sw.shutdown().await.unwrap();
                },
                async move {
                    let mut v = Vec::new();
                    sr.read_to_end(&mut v).await.unwrap();
                    v
                },
                async move {
                    let mut v = Vec::new();
                    cr.read_to_end(&mut v).await.unwrap();
                    v
                },
            )
        })
        .await
        .expect("transfers finish");
        assert!(got_up == up, "client→server bytes intact");
        assert!(got_down == down, "server→client bytes intact");
        assert_eq!(task.await.unwrap(), (200_000, 300_000));
    }

    #[tokio::test]
    async fn splice_keeps_one_direction_moving_while_the_other_is_stuck() {
        // The server does not read: client→server stalls once its pipe is
        // full, yet server→client still flows.
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let _task = tokio::spawn(splice(client, server, Duration::from_secs(5)));
        client_far.write_all(&[7u8; 60]).await.unwrap();
        client_far.write_all(&[7u8; 60]).await.unwrap();
        server_far.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client_far.read_exact(&mut back))
            .await
            .expect("server→client not blocked by the stalled direction")
            .unwrap();
        assert_eq!(&back, b"pong");
    }

    #[tokio::test]
    async fn splice_ends_when_a_write_fails() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, server_far) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(client, server, Duration::from_secs(3600)));
        drop(server_far);
        // The server's EOF half-closes the client side...
        let mut rest = Vec::new();
        client_far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        // ...and the client's next bytes cannot be delivered: the end.
        client_far.write_all(b"lost").await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("splice ends on a failed write")
            .unwrap();
        assert_eq!(r, (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn splice_idle_timer_restarts_on_traffic() {
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(splice(client, server, Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(20)).await;
        client_far.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        server_far.read_exact(&mut got).await.unwrap();
        let r = task.await.unwrap();
        let closed_after = start.elapsed();
        assert_eq!(r, (2, 0));
        assert!(
            (Duration::from_secs(50)..Duration::from_secs(51)).contains(&closed_after),
            "closed 30 s after the last bytes (at 20 s), not {closed_after:?}"
        );
    }

    #[test]
    fn one_worker_is_a_current_thread_runtime() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |n| runtime(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(Some(1)), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(Some(2)), RuntimeFlavor::MultiThread);
        assert_eq!(flavor(None), RuntimeFlavor::MultiThread);
        let e = runtime(Some(0)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }

    /// Always ready and outside tokio's cooperative budget: an endless
    /// source and a bottomless sink.
    struct Endless;

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = buf.remaining().min(1000);
            buf.put_slice(&[1u8; 1000][..n]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Endless {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_pipe_holds_a_buffer_only_while_the_writer_pushes_back() {
        let (mut reader_far, reader) = tokio::io::duplex(64);
        // A writer that takes 4 bytes before it pushes back.
        let (writer, mut writer_far) = tokio::io::duplex(4);
        tokio::pin!(reader);
        tokio::pin!(writer);
        let mut pipe = Pipe::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        reader_far.write_all(b"0123456789").await.unwrap();
        let flow = pipe.poll(&mut cx, reader.as_mut(), writer.as_mut());
        assert_eq!(flow, Flow::Pending);
        assert_eq!(&pipe.held[pipe.start..], b"456789", "the rest is kept");
        let mut got = Vec::new();
        while got.len() < 10 {
            let mut buf = [0u8; 4];
            let n = writer_far.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            let _ = pipe.poll(&mut cx, reader.as_mut(), writer.as_mut());
        }
        assert_eq!(got, b"0123456789");
        assert_eq!(pipe.bytes, 10);
        assert_eq!(pipe.held.capacity(), 0, "written out: the buffer is freed");
        // A chunk the writer takes whole is never kept.
        reader_far.write_all(b"ab").await.unwrap();
        let _ = pipe.poll(&mut cx, reader.as_mut(), writer.as_mut());
        assert_eq!(pipe.held.capacity(), 0);
        let mut buf = [0u8; 2];
        writer_far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ab");
    }

    #[tokio::test]
    async fn splice_yields_between_bounded_bursts() {
        // Streams that never say "pending" must not keep the (possibly only)
        // thread: each poll moves a bounded amount and asks to be woken.
        let spliced = splice(Endless, Endless, Duration::from_secs(5));
        tokio::pin!(spliced);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..3 {
            assert!(spliced.as_mut().poll(&mut cx).is_pending());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn splice_closes_idle_connections() {
        let (client, _client_far) = tokio::io::duplex(64);
        let (server, _server_far) = tokio::io::duplex(64);
        let r = splice(client, server, Duration::from_secs(30)).await;
        assert_eq!(r, (0, 0));
    }
}
