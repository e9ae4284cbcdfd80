//! The one response body type: the backend's body, streamed through from
//! its connection ([`UpstreamBody`]), or a body the load balancer made
//! itself. An enum rather than a boxed trait object: no allocation per
//! response.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use http::{HeaderValue, Response};

use crate::error::ErrorAnswer;
use crate::limits::IpSlot;
use crate::upstream::UpstreamBody;

pub enum LbBody {
    Full(Full<Bytes>),
    Upstream(UpstreamBody),
    /// A backend's body, and the client's in-flight slot it holds.
    Held(UpstreamBody, IpSlot),
}

impl LbBody {
    pub fn full(bytes: Bytes) -> Self {
        LbBody::Full(Full::new(bytes))
    }

    pub fn empty() -> Self {
        LbBody::Full(Full::new(Bytes::new()))
    }

    /// The load balancer's own answer, as the hyper path sends it.
    pub fn answer(answer: &ErrorAnswer) -> Response<Self> {
        let mut resp = Response::new(LbBody::full(answer.body()));
        *resp.status_mut() = answer.status;
        for (name, value) in answer.headers() {
            resp.headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        resp
    }

    /// The body, keeping `slot` until a backend's body is done.
    pub fn holding(self, slot: Option<IpSlot>) -> Self {
        match (self, slot) {
            (LbBody::Upstream(body), Some(slot)) => LbBody::Held(body, slot),
            (other, _) => other,
        }
    }
}

impl Body for LbBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            LbBody::Full(full) => match Pin::new(full).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            LbBody::Upstream(body) | LbBody::Held(body, _) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LbBody::Full(full) => full.is_end_stream(),
            LbBody::Upstream(body) | LbBody::Held(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LbBody::Full(full) => full.size_hint(),
            LbBody::Upstream(body) | LbBody::Held(body, _) => body.size_hint(),
        }
    }
}
