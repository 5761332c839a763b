//! Byte relays shared by strait's gateway and sidecar.
//!
//! [`splice`] copies both ways between two streams with half-close and an
//! idle timeout, on one task and without a buffer of its own while idle
//! (one read buffer per thread, shared by its splices); [`relay`] also tells why it
//! ended, for access logs.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let s = relay(a, b, idle).await;
    (s.up, s.down)
}

/// How a [`relay`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes written from the first stream to the second.
    pub up: u64,
    /// Bytes written from the second stream to the first.
    pub down: u64,
    /// Why it ended, unless both sides simply closed: the first read or
    /// write error (a read error also ends that direction as an EOF
    /// would), or the idle timeout.
    pub error: Option<String>,
}

/// [`splice`], telling also why it ended.
pub async fn relay<A, B>(mut a: A, mut b: B, idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    let mut last = tokio::time::Instant::now();
    let mut idled = false;
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
                idled = true;
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    let error = up
        .error
        .take()
        .or_else(|| down.error.take())
        .or_else(|| idled.then(|| format!("idle for {idle:?}")));
    Spliced {
        up: up.bytes,
        down: down.bytes,
        error,
    }
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
    /// The first read or write error.
    error: Option<String>,
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
            error: None,
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
                    Poll::Ready(Ok(0)) => {
                        return self.failed("write: the peer took no bytes".into());
                    }
                    Poll::Ready(Err(e)) => return self.failed(format!("write: {e}")),
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
                    Poll::Ready(Err(e)) => return self.failed(format!("flush: {e}")),
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
            Poll::Ready(Err(e)) => {
                self.error.get_or_insert_with(|| format!("read: {e}"));
                return Step::Eof;
            }
            Poll::Pending => return Step::Pending,
        };
        if n == 0 {
            return Step::Eof;
        }
        self.moved = true;
        let mut off = 0;
        while off < n {
            match w.as_mut().poll_write(cx, &scratch[off..n]) {
                Poll::Ready(Ok(0)) => {
                    self.error
                        .get_or_insert_with(|| "write: the peer took no bytes".into());
                    return Step::Failed;
                }
                Poll::Ready(Err(e)) => {
                    self.error.get_or_insert_with(|| format!("write: {e}"));
                    return Step::Failed;
                }
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

    /// Records the first error and ends the splice.
    fn failed(&mut self, why: String) -> Flow {
        self.error.get_or_insert(why);
        Flow::Failed
    }

    fn wrote(&mut self, n: usize) {
        self.bytes += n as u64;
        self.moved = true;
        self.unflushed = true;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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

#[cfg(test)]
mod relay_tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_clean_close_is_no_error() {
        let (a, mut a_far) = tokio::io::duplex(64);
        let (b, mut b_far) = tokio::io::duplex(64);
        let task = tokio::spawn(relay(a, b, Duration::from_secs(5)));
        a_far.write_all(b"hi").await.unwrap();
        a_far.shutdown().await.unwrap();
        b_far.shutdown().await.unwrap();
        let mut sink = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b_far, &mut sink)
            .await
            .unwrap();
        let s = task.await.unwrap();
        assert_eq!((s.up, s.down, s.error), (2, 0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_is_the_reason() {
        let (a, _a_far) = tokio::io::duplex(64);
        let (b, _b_far) = tokio::io::duplex(64);
        let s = relay(a, b, Duration::from_secs(30)).await;
        assert_eq!(s.error.as_deref(), Some("idle for 30s"));
    }

    #[tokio::test]
    async fn a_failed_write_is_the_reason() {
        let (a, mut a_far) = tokio::io::duplex(64);
        let (b, b_far) = tokio::io::duplex(64);
        drop(b_far);
        let task = tokio::spawn(relay(a, b, Duration::from_secs(5)));
        a_far.write_all(b"to nowhere").await.unwrap();
        let s = task.await.unwrap();
        let why = s.error.expect("an error");
        assert!(why.starts_with("write: "), "{why}");
    }
}
