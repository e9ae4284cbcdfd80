//! The one response body type: either the backend's body, streamed through
//! (and giving its connection back to the pool when it ends), or a body the
//! load balancer made itself. An enum rather than a boxed trait object: no
//! allocation per response.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::upstream::Returner;

pub enum LbBody {
    Full(Full<Bytes>),
    Upstream {
        body: Incoming,
        returner: Option<Returner>,
    },
}

impl LbBody {
    pub fn full(bytes: Bytes) -> Self {
        LbBody::Full(Full::new(bytes))
    }

    pub fn empty() -> Self {
        LbBody::Full(Full::new(Bytes::new()))
    }

    pub fn upstream(body: Incoming, returner: Returner) -> Self {
        let mut body = LbBody::Upstream {
            body,
            returner: Some(returner),
        };
        body.give_back_if_done();
        body
    }

    /// Once the backend's body has ended, its connection can serve the next
    /// request.
    fn give_back_if_done(&mut self) {
        if let LbBody::Upstream { body, returner } = self {
            if body.is_end_stream() {
                if let Some(r) = returner.take() {
                    r.give_back();
                }
            }
        }
    }
}

impl Body for LbBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match this {
            LbBody::Full(full) => match Pin::new(full).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            LbBody::Upstream { body, .. } => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let LbBody::Upstream { returner, .. } = this {
                            if let Some(r) = returner.take() {
                                r.give_back();
                            }
                        }
                    }
                    Poll::Ready(Some(Ok(_))) => this.give_back_if_done(),
                    // A failed body: the connection is dropped with the returner.
                    Poll::Ready(Some(Err(_))) | Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LbBody::Full(full) => full.is_end_stream(),
            LbBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LbBody::Full(full) => full.size_hint(),
            LbBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
