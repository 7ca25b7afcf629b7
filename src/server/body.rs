//! A body wrapper that watches data go by.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// Calls `on_data` with the size of each data frame. Whatever the closure
/// owns (a permit, a gauge guard) lives exactly as long as the body. The size
/// hint is kept, so `Content-Length` survives.
pub struct ObservedBody<F> {
    inner: Body,
    on_data: F,
}

impl<F: FnMut(usize) + Unpin + Send + 'static> ObservedBody<F> {
    pub fn new(inner: Body, on_data: F) -> Self {
        Self { inner, on_data }
    }
}

impl<F: FnMut(usize) + Unpin + Send + 'static> http_body::Body for ObservedBody<F> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            (self.on_data)(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
