//! A byte stream that counts the bytes read from it: what the TCP
//! fallback's liveness check watches (see
//! [`crate::TunnelConn::arrivals`]), as QUIC's watches datagrams; and
//! the bytes written to it, which drain the streams' send budget (see
//! [`super::budget`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, counting into `read` every byte read and into `written`
/// every byte written.
pub(super) struct Counted<S> {
    pub(super) inner: S,
    pub(super) read: Arc<AtomicU64>,
    pub(super) written: Arc<super::budget::SendBudget>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let p = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = p {
            let n = buf.filled().len().saturating_sub(before);
            self.read.fetch_add(n as u64, Relaxed);
        }
        p
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = p {
            self.written.written(n);
        }
        p
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = p {
            self.written.written(n);
        }
        p
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_what_is_read_and_passes_writes() {
        let (a, mut b) = tokio::io::duplex(1024);
        let read = Arc::new(AtomicU64::new(0));
        let mut c = Counted {
            inner: a,
            read: read.clone(),
            written: Arc::default(),
        };
        b.write_all(b"hello world").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(read.load(Relaxed), 5);
        let mut rest = [0u8; 6];
        c.read_exact(&mut rest).await.unwrap();
        assert_eq!(read.load(Relaxed), 11);
        c.write_all(b"back").await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back");
        assert_eq!(read.load(Relaxed), 11, "writes are not counted");
    }
}
