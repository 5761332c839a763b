//! Bodies as the sidecar passes them on: streamed as they arrive and
//! counted ([`Counted`], [`Observed`] with the gRPC status of a response),
//! or held whole: a small request body so that a retry can send it again
//! (see [`MAX_REPLAYABLE_BODY`]), a response under a route timeout
//! ([`read_whole`], trailers kept).

use std::sync::Arc;

/// The most bytes of one response the sidecar buffers: responses on a
/// route with a timeout are read whole (the timeout covers the whole
/// response, as in Envoy), data and trailers. Other responses stream.
pub const MAX_BUFFERED_BODY: usize = 16 << 20;

/// The largest request body held whole so that a retry can send it again
/// (Envoy's default buffer limit): a body that declares its length up to
/// this is read before it is sent. Longer bodies, and bodies of unknown
/// length (HTTP/2 and gRPC streams, chunked uploads), stream as they
/// arrive; such a request is retried only while none of it was sent.
pub const MAX_REPLAYABLE_BODY: usize = 1 << 20;

/// A response body as the sidecar relays it.
pub enum ProxyBody {
    /// The upstream's, streamed.
    Stream(hyper::body::Incoming),
    /// One the sidecar made itself.
    Own(http_body_util::Full<bytes::Bytes>),
    /// The upstream's, read whole (data and trailers).
    Buffered(http_body_util::Collected<bytes::Bytes>),
}

impl From<http_body_util::Full<bytes::Bytes>> for ProxyBody {
    fn from(b: http_body_util::Full<bytes::Bytes>) -> Self {
        ProxyBody::Own(b)
    }
}

impl hyper::body::Body for ProxyBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::pin::Pin;
        use std::task::Poll;
        let infallible = |p: Poll<Option<Result<_, std::convert::Infallible>>>| {
            p.map(|f| f.map(|r| r.map_err(|e| match e {})))
        };
        match self.get_mut() {
            ProxyBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Own(b) => infallible(Pin::new(b).poll_frame(cx)),
            ProxyBody::Buffered(b) => infallible(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(b) => b.is_end_stream(),
            ProxyBody::Own(b) => b.is_end_stream(),
            ProxyBody::Buffered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Own(b) => b.size_hint(),
            ProxyBody::Buffered(b) => b.size_hint(),
        }
    }
}

/// A request body passed on as it arrives, its data bytes counted into a
/// shared counter (read for `istio_request_bytes` when the exchange ends).
pub struct Counted<B> {
    inner: B,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl<B> Counted<B> {
    /// `inner`, counted into `bytes`.
    pub fn new(inner: B, bytes: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Counted { inner, bytes }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.bytes
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose end is observed: `on_end` gets the bytes that went
/// through, once, when the last frame is handed on, the stream fails, or
/// the body is dropped unfinished (the client went away). Metrics and the
/// access log of a streamed response are written there, when its size
/// and duration are known.
pub struct Observed<B> {
    inner: B,
    ended: Ended,
    on_end: Option<OnEnd>,
}

/// What went through an [`Observed`] body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ended {
    /// Data bytes.
    pub bytes: u64,
    /// The `grpc-status` of a gRPC response: from its trailers, or from
    /// its head when it had no body (trailers-only).
    pub grpc_status: Option<String>,
}

/// `grpc-status` in `headers`, if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl<B> Observed<B> {
    /// `inner`, the body of a response with headers `head`, with
    /// `on_end` called once at its end.
    pub fn new(
        inner: B,
        head: &http::HeaderMap,
        on_end: impl FnOnce(Ended) + Send + 'static,
    ) -> Self {
        Observed {
            inner,
            ended: Ended {
                bytes: 0,
                grpc_status: grpc_status(head),
            },
            on_end: Some(Box::new(on_end)),
        }
    }

    /// `inner`, with nothing to report.
    pub fn plain(inner: B) -> Self {
        Observed {
            inner,
            ended: Ended::default(),
            on_end: None,
        }
    }

    /// Reports the end, off the response's path: on a runtime the report
    /// (metrics, access log line) runs as a task of its own, after the
    /// connection's task has written the response's last bytes in the same
    /// poll, so the caller does not wait for the telemetry. The task runs
    /// before anything that I/O wakes later (a metrics scrape included):
    /// it is queued first. Outside a runtime, or if the runtime drops the
    /// task unrun (it is shutting down), the report runs there and then:
    /// it is made exactly once either way.
    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            let report = Report(Some((f, std::mem::take(&mut self.ended))));
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(async move { drop(report) })),
                Err(_) => drop(report),
            }
        }
    }
}

/// What an [`Observed`] body calls at its end.
type OnEnd = Box<dyn FnOnce(Ended) + Send>;

/// A report to make once: when dropped, wherever that happens.
struct Report(Option<(OnEnd, Ended)>);

impl Drop for Report {
    fn drop(&mut self) {
        if let Some((f, ended)) = self.0.take() {
            f(ended);
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> hyper::body::Body for Observed<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.ended.bytes += data.len() as u64;
                } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                    this.ended.grpc_status = Some(status);
                }
                // The last frame: hyper may not ask again.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Longer than the limit.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// The stream failed.
    #[error("the body could not be read: {0}")]
    Broken(String),
}

/// Reads `body` whole (data and trailers), refusing more than `limit`
/// bytes.
pub async fn read_whole<B>(
    body: B,
    limit: usize,
) -> Result<http_body_util::Collected<bytes::Bytes>, BodyError>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Broken(e.to_string())),
    }
}

/// Reads `body`'s data whole, refusing more than `limit` bytes.
pub async fn read_body<B>(body: B, limit: usize) -> Result<bytes::Bytes, BodyError>
where
    B: hyper::body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_whole(body, limit).await.map(|c| c.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the reports of one [`Observed`] body.
    fn observed(
        reports: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Observed<http_body_util::Full<bytes::Bytes>> {
        let reports = reports.clone();
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"four"));
        Observed::new(body, &http::HeaderMap::new(), move |end| {
            assert_eq!(end.bytes, 4);
            reports.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    }

    #[tokio::test]
    async fn the_end_is_reported_after_the_task_that_sent_the_body_yields() {
        use http_body_util::BodyExt;
        use std::sync::atomic::Ordering::SeqCst;
        let reports = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut body = observed(&reports);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "four");
        // The last frame ended the body: the report is queued, not run on
        // the path that sends the bytes on.
        assert_eq!(reports.load(SeqCst), 0);
        tokio::task::yield_now().await;
        assert_eq!(reports.load(SeqCst), 1);
        // Once only, dropping included.
        drop(body);
        tokio::task::yield_now().await;
        assert_eq!(reports.load(SeqCst), 1);
    }

    #[test]
    fn a_runtime_shutting_down_still_reports_the_end() {
        use std::sync::atomic::Ordering::SeqCst;
        let reports = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut body = observed(&reports);
        body.ended.bytes = 4;
        // Ended inside the runtime: queued as a task that never gets to run.
        rt.block_on(async move { drop(body) });
        assert_eq!(reports.load(SeqCst), 0);
        drop(rt);
        assert_eq!(reports.load(SeqCst), 1);
    }

    #[test]
    fn without_a_runtime_the_end_is_reported_at_once() {
        let reports = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut body = observed(&reports);
        // Dropped half read: the report still comes, here and now.
        body.ended.bytes = 4;
        drop(body);
        assert_eq!(reports.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = |n: usize| http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; n]));
        assert_eq!(read_body(body(10), 10).await.unwrap().len(), 10);
        assert_eq!(read_body(body(0), 10).await.unwrap().len(), 0);
        assert!(matches!(
            read_body(body(11), 10).await,
            Err(BodyError::TooLarge(10))
        ));
    }
}
