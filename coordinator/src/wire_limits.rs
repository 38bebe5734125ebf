//! Bounds on gRPC messages that are begun and never finished. tonic buffers a request message
//! until its last byte arrives, and anyone who can open a connection can begin one: many
//! never-completed messages once held 73 → 199 MiB of the coordinator until their sockets
//! closed. Every request body passes through [`LimitedBody`], which reads the gRPC framing
//! (a 5-byte prefix: flag, big-endian length) and
//!
//! - refuses a message longer than its method allows (a `SubmitUpdate` header, every message
//!   of the small unary calls) before any of it is buffered;
//! - charges the bytes of every incomplete message to one budget shared by all requests, and
//!   refuses a request whose message would take the total past it (RESOURCE_EXHAUSTED): what
//!   unauthenticated peers can make the coordinator hold is bounded by
//!   `[server] max_pending_message_bytes`, whatever their number;
//! - cuts off a message that is not complete within `[server] message_timeout_secs` of its
//!   first byte (of the request's start, for the first message), so trickling a byte at a time
//!   holds nothing for long.
//!
//! An upload whose header named a valid session is then exempt from the shared budget (its
//! chunks are bounded by the session's one upload in flight and the decoding slots), so peers
//! without credentials cannot make honest uploads fail by filling it; what they can still
//! delay is the first message of a call, until their own messages are cut off. Mutual TLS
//! (`[server.tls] client_ca`) takes even that away: without a certificate no HTTP/2 frame is
//! read at all.
//!
//! A refusal ends the request's stream; the connection and every other stream on it go on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, Service, http};

/// The largest message of a call that is not an upload chunk (Join, GetTask, Status, Watch,
/// downloads' requests): they are a few hundred bytes.
pub const MAX_SMALL_MESSAGE: usize = 64 << 10;
/// The largest upload header (tensor specs and metrics: about 10 KiB for deit-s-224).
pub const MAX_UPLOAD_HEADER: usize = 256 << 10;
/// Messages of at most this many bytes are never charged to the budget: every honest call but
/// an upload's chunks (Join, GetTask, Status, Watch, the header of a small model's upload) fits,
/// so peers filling the budget cannot lock honest clients out of the protocol. What they cost
/// is bounded by streams x this (64 MiB at the default connection and stream caps).
pub const FREE_MESSAGE: usize = 8 << 10;
/// The upload method, whose later messages are tensor chunks.
const SUBMIT_UPDATE: &str = "/mjpfl.v1.Federation/SubmitUpdate";

/// The shared budget of bytes held in incomplete messages.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_charge(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Put in every request's extensions: the service marks a request whose caller it has
/// authenticated, and the request's later messages are no longer charged to the budget.
#[derive(Clone, Debug, Default)]
pub struct Authenticated(Arc<AtomicBool>);

impl Authenticated {
    /// Marks the request as coming from an authenticated session.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The limits of every request (a tower layer for tonic's server).
#[derive(Clone, Debug)]
pub struct WireLimits {
    budget: Arc<Budget>,
    timeout: Duration,
    max_message: usize,
}

impl WireLimits {
    /// Limits charging `budget`, with messages cut off after `timeout`; `max_message` is the
    /// largest message any method accepts (an upload chunk).
    pub fn new(budget: Arc<Budget>, timeout: Duration, max_message: usize) -> Self {
        Self {
            budget,
            timeout,
            max_message,
        }
    }
}

impl<S> tower_layer::Layer<S> for WireLimits {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: self.clone(),
        }
    }
}

/// A service whose request bodies are limited.
#[derive(Clone, Debug)]
pub struct Limited<S> {
    inner: S,
    limits: WireLimits,
}

impl<S> Service<http::Request<Body>> for Limited<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let upload = request.uri().path() == SUBMIT_UPDATE;
        let limits = self.limits.clone();
        let authenticated = Authenticated::default();
        request.extensions_mut().insert(authenticated.clone());
        let request =
            request.map(|body| Body::new(LimitedBody::new(body, limits, upload, authenticated)));
        self.inner.call(request)
    }
}

/// A request body under the limits.
pub struct LimitedBody {
    inner: Body,
    limits: WireLimits,
    upload: bool,
    authenticated: Authenticated,
    /// Messages completed so far.
    messages: u64,
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message's body still to come (after its prefix).
    remaining: usize,
    /// Bytes of the current incomplete message charged to the budget.
    charged: usize,
    /// The current message is small enough to be free of the budget.
    free: bool,
    /// Bytes read from the connection but not yet handed on (see [`LimitedBody::pass`]).
    held: Option<Bytes>,
    /// When the current message must be complete (`None` between messages).
    deadline: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl LimitedBody {
    fn new(inner: Body, limits: WireLimits, upload: bool, authenticated: Authenticated) -> Self {
        // The first message is due from the request's start.
        let deadline = Some(Box::pin(tokio::time::sleep(limits.timeout)));
        Self {
            inner,
            limits,
            upload,
            authenticated,
            messages: 0,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            charged: 0,
            free: false,
            held: None,
            deadline,
            failed: false,
        }
    }

    /// The largest body the next message may have.
    fn cap(&self) -> usize {
        match (self.upload, self.messages) {
            (true, 0) => MAX_UPLOAD_HEADER,
            (true, _) => self.limits.max_message,
            (false, _) => MAX_SMALL_MESSAGE,
        }
    }

    fn in_message(&self) -> bool {
        self.prefix_len > 0 || self.remaining > 0
    }

    fn start_deadline(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.limits.timeout)));
        }
    }

    fn finish_message(&mut self) {
        self.limits.budget.release(self.charged);
        self.charged = 0;
        self.messages += 1;
        self.prefix_len = 0;
        self.deadline = None;
    }

    /// Walks the framing of `data`; an error refuses the request, with the bytes of `data`
    /// accounted before it (the state stands as it was after them, so the rest may be tried
    /// again).
    fn account(&mut self, data: &[u8]) -> Result<(), (usize, Status)> {
        let total = data.len();
        let mut data = data;
        while !data.is_empty() {
            let consumed = total - data.len();
            if self.remaining == 0 {
                // In the prefix.
                if self.prefix_len == 0 {
                    self.start_deadline();
                }
                let take = (5 - self.prefix_len).min(data.len());
                // The prefix itself (5 bytes a stream) is not charged: a full budget must not
                // refuse a message before its length says whether it is free.
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                data = &data[take..];
                if self.prefix_len == 5 {
                    let len = u32::from_be_bytes([
                        self.prefix[1],
                        self.prefix[2],
                        self.prefix[3],
                        self.prefix[4],
                    ]) as usize;
                    let cap = self.cap();
                    if len > cap {
                        return Err((
                            consumed,
                            Status::resource_exhausted(format!(
                                "message of {len} bytes announced; this call accepts at most {cap}"
                            )),
                        ));
                    }
                    self.free = len <= FREE_MESSAGE;
                    if len == 0 {
                        self.finish_message();
                    } else {
                        self.remaining = len;
                    }
                }
            } else {
                let take = self.remaining.min(data.len());
                self.charge(take).map_err(|s| (consumed, s))?;
                self.remaining -= take;
                data = &data[take..];
                if self.remaining == 0 {
                    self.finish_message();
                }
            }
        }
        Ok(())
    }

    /// Hands `data` on, or as much of it as the budget takes. An upload's first chunk often
    /// arrives in the frame that ends its header, before the service has read the header and
    /// authenticated the session: the bytes up to the refusal go on, the rest waits (held
    /// here, no more read from the connection) until the service asks again, by when an
    /// authenticated upload is no longer charged. Anything else over the budget is refused.
    fn pass(&mut self, data: Bytes) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        match self.account(&data) {
            Ok(()) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            Err((consumed, status)) => {
                let early_chunk = self.upload
                    && self.messages >= 1
                    && consumed > 0
                    && status.code() == tonic::Code::ResourceExhausted;
                if early_chunk {
                    self.held = Some(data.slice(consumed..));
                    Poll::Ready(Some(Ok(http_body::Frame::data(data.slice(..consumed)))))
                } else {
                    self.fail(status)
                }
            }
        }
    }

    fn charge(&mut self, n: usize) -> Result<(), Status> {
        if self.free || self.authenticated.get() {
            return Ok(());
        }
        if self.limits.budget.try_charge(n) {
            self.charged += n;
            Ok(())
        } else {
            Err(Status::resource_exhausted(
                "the coordinator holds too many unfinished messages; retry later",
            ))
        }
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        self.failed = true;
        self.limits.budget.release(self.charged);
        self.charged = 0;
        self.deadline = None;
        Poll::Ready(Some(Err(status)))
    }
}

impl Drop for LimitedBody {
    fn drop(&mut self) {
        self.limits.budget.release(self.charged);
    }
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        if let Some(held) = self.held.take() {
            return self.pass(held);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => self.pass(data),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                let timeout = self.limits.timeout;
                let in_message = self.in_message() || self.messages == 0;
                let expired = in_message
                    && self
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    self.fail(Status::deadline_exceeded(format!(
                        "a message was not complete within {timeout:?}: cut off"
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.held.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(len as u32).to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len));
        v
    }

    fn body(budget: &Arc<Budget>, upload: bool) -> LimitedBody {
        let limits = WireLimits::new(budget.clone(), Duration::from_secs(30), 1 << 20);
        LimitedBody::new(Body::empty(), limits, upload, Authenticated::default())
    }

    #[tokio::test]
    async fn complete_messages_are_free_and_partial_ones_are_charged_until_done() {
        let budget = Budget::new(1 << 20);
        let mut b = body(&budget, true);
        let two = [frame(100), frame(300)].concat();
        b.account(&two).unwrap();
        assert_eq!(budget.used(), 0);
        assert_eq!(b.messages, 2);
        let next = frame(10_000);
        b.account(&next[..400]).unwrap();
        assert_eq!(budget.used(), 395, "the body so far, not the prefix");
        b.account(&next[400..]).unwrap();
        assert_eq!(budget.used(), 0);
        b.account(&next[..3]).unwrap();
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped request gives its bytes back");
    }

    #[tokio::test]
    async fn oversized_announcements_and_an_exhausted_budget_are_refused() {
        let budget = Budget::new(10_000);
        let mut small = body(&budget, false);
        let (_, err) = small
            .account(&frame(MAX_SMALL_MESSAGE + 1)[..5])
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let mut header = body(&budget, true);
        assert!(header.account(&frame(MAX_UPLOAD_HEADER + 1)[..5]).is_err());
        let mut a = body(&budget, true);
        a.account(&frame(9_000)[..8_000]).unwrap();
        let mut b = body(&budget, true);
        let (consumed, err) = b.account(&frame(9_000)[..3_000]).unwrap_err();
        assert_eq!(consumed, 5, "the prefix was accounted, no byte of the body");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        // A full budget still lets small messages through (every honest call but chunks).
        let mut join = body(&budget, false);
        join.account(&frame(FREE_MESSAGE)).unwrap();
        join.account(&frame(300)[..100]).unwrap();
        drop((small, header, a, b));
        assert_eq!(budget.used(), 0);
        // Once the service has authenticated the caller, its messages cost the budget nothing.
        let mut full = body(&budget, true);
        full.account(&frame(9_000)[..9_000]).unwrap();
        let mut honest = body(&budget, true);
        honest.authenticated.set();
        honest.account(&frame(200_000)[..150_000]).unwrap();
        assert_eq!(budget.used(), 8_995);
    }
}
