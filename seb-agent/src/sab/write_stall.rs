//! A connection whose peer stops reading is closed. hyper's header timeout covers
//! reading a request; nothing covers writing answers to a client that pipelines
//! requests and never reads them, which would hold its connection slots for good.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a write may wait for the peer to read.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(10);

/// `S`, whose writes fail with `TimedOut` once one has waited [`WRITE_STALL_LIMIT`].
pub struct WriteStallLimit<S> {
    inner: S,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStallLimit<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, stalled_since: None }
    }

    /// `polled`, or `TimedOut` once writes have waited past the limit.
    fn watch<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let timer = self.stalled_since.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_LIMIT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {} s", WRITE_STALL_LIMIT.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStallLimit<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStallLimit<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_limit_and_one_it_reads_does_not() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut limited = WriteStallLimit::new(near);
        let started = tokio::time::Instant::now();
        let error = limited.write_all(&[0; 4096]).await.expect_err("nobody reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), WRITE_STALL_LIMIT);

        let (near, mut far_reader) = tokio::io::duplex(1024);
        let mut limited = WriteStallLimit::new(near);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let mut buffer = [0u8; 512];
            while sink.len() < 4096 {
                tokio::time::sleep(WRITE_STALL_LIMIT / 4).await;
                let n = tokio::io::AsyncReadExt::read(&mut far_reader, &mut buffer).await.unwrap();
                sink.extend_from_slice(&buffer[..n]);
            }
        });
        limited.write_all(&[0; 4096]).await.expect("read slowly, but read");
        reader.await.unwrap();
        far.shutdown().await.unwrap();
    }
}
