//! The byte stream a native WebSocket connection runs on, with readiness-based reads and
//! writes ([`super::conn`] waits for readiness, then reads into a stack buffer and writes
//! every queued frame in one vectored call).
//!
//! - [`Socket::Plain`]: the TCP stream of an HTTP/1.1 upgrade, used directly: no buffer of
//!   its own, one syscall per read or vectored write.
//! - [`Socket::Stream`]: any other upgraded stream — TLS (rustls over TCP), or a stream of an
//!   HTTP/2 connection (RFC 8441 extended CONNECT) — which only offers `poll_read` and
//!   `poll_write`. Readiness is polled with the task's waker: a read lands in a small buffer
//!   that `try_read` hands out, and `try_write_vectored` stages bytes (at most
//!   [`STAGE_BYTES`]) that go out at once when the stream takes them, or when
//!   [`Socket::writable`] is awaited. [`Socket::has_pending_output`] tells the connection
//!   task to keep waiting for writability while staged bytes (or TLS records) remain. Both
//!   buffers are released once empty, so an idle connection holds none.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes staged for a [`Socket::Stream`] before `try_write_vectored` pushes back.
pub const STAGE_BYTES: usize = 64 * 1024;
/// Size of one read from a [`Socket::Stream`].
const READ_CHUNK: usize = 8 * 1024;

/// An upgraded stream that only polls.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A WebSocket connection's stream.
pub enum Socket {
    Plain(TcpStream),
    Stream(Mutex<Buffered>),
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Socket::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            Socket::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// A polled stream with its read and staging buffers.
pub struct Buffered {
    io: Box<dyn Stream>,
    read: Vec<u8>,
    /// Bytes of `read` already handed out.
    read_pos: usize,
    eof: bool,
    staged: Vec<u8>,
    /// Bytes of `staged` already written.
    staged_pos: usize,
    /// Written since the last completed flush (TLS may hold records back until flushed).
    unflushed: bool,
}

impl Socket {
    pub fn stream(io: impl Stream) -> Self {
        Socket::Stream(Mutex::new(Buffered {
            io: Box::new(io),
            read: Vec::new(),
            read_pos: 0,
            eof: false,
            staged: Vec::new(),
            staged_pos: 0,
            unflushed: false,
        }))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Plain(s) => s.set_nodelay(on),
            // Set on the TCP stream when it was accepted.
            Socket::Stream(_) => Ok(()),
        }
    }

    /// Waits until a read may return data (or the end of the stream).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Socket::Plain(s) => s.readable().await,
            Socket::Stream(b) => poll_fn(|cx| b.lock().poll_fill(cx)).await,
        }
    }

    /// Reads what is available; `WouldBlock` when nothing is.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(s) => s.try_read(buf),
            Socket::Stream(b) => b.lock().take_read(buf),
        }
    }

    /// Waits until a write may make progress (for a [`Socket::Stream`]: until everything
    /// staged is written and flushed).
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Socket::Plain(s) => s.writable().await,
            Socket::Stream(b) => poll_fn(|cx| b.lock().poll_drain(cx)).await,
        }
    }

    /// Writes (or stages) as much of `bufs` as possible without waiting.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Plain(s) => s.try_write_vectored(bufs),
            Socket::Stream(b) => b.lock().stage(bufs),
        }
    }

    /// Whether written bytes still wait to reach the network (never for a plain socket).
    pub fn has_pending_output(&self) -> bool {
        match self {
            Socket::Plain(_) => false,
            Socket::Stream(b) => {
                let b = b.lock();
                b.staged_pos < b.staged.len() || b.unflushed
            }
        }
    }

    /// Sends everything staged, then ends our side (FIN; for TLS a close_notify first; for
    /// an HTTP/2 stream its END_STREAM).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Socket::Plain(s) => tokio::io::AsyncWriteExt::shutdown(s).await,
            Socket::Stream(b) => {
                poll_fn(|cx| b.get_mut().poll_drain(cx)).await?;
                poll_fn(|cx| Pin::new(&mut b.get_mut().io).poll_shutdown(cx)).await
            }
        }
    }
}

impl Buffered {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.read_pos < self.read.len() || self.eof {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                if filled.is_empty() {
                    self.eof = true;
                } else {
                    self.read.clear();
                    self.read.extend_from_slice(filled);
                    self.read_pos = 0;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn take_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_pos < self.read.len() {
            let n = buf.len().min(self.read.len() - self.read_pos);
            buf[..n].copy_from_slice(&self.read[self.read_pos..self.read_pos + n]);
            self.read_pos += n;
            if self.read_pos == self.read.len() {
                self.read = Vec::new();
                self.read_pos = 0;
            }
            return Ok(n);
        }
        if self.eof {
            return Ok(0);
        }
        // Look once more without waiting, so a client's pipelined frames are read in one go.
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_fill(&mut cx) {
            Poll::Ready(Ok(())) if self.read_pos < self.read.len() => self.take_read(buf),
            Poll::Ready(Ok(())) => Ok(0),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn stage(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Make room first with whatever the stream takes now.
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(Err(e)) = self.poll_drain(&mut cx) {
            return Err(e);
        }
        if self.staged_pos > 0 {
            self.staged.drain(..self.staged_pos);
            self.staged_pos = 0;
        }
        let mut room = STAGE_BYTES.saturating_sub(self.staged.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for buf in bufs {
            let take = buf.len().min(room);
            self.staged.extend_from_slice(&buf[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        if let Poll::Ready(Err(e)) = self.poll_drain(&mut cx) {
            return Err(e);
        }
        Ok(n)
    }

    /// Writes what is staged and flushes; ready once everything is out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.staged_pos < self.staged.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.staged[self.staged_pos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.staged_pos += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.staged.is_empty() {
            self.staged = Vec::new();
            self.staged_pos = 0;
        }
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_polled_stream_reads_and_writes_through_its_buffers() {
        // A pipe whose far end reads slowly: the staging buffer holds what it cannot take.
        let (near, mut far) = tokio::io::duplex(1024);
        let socket = Socket::stream(near);
        assert_eq!(socket.try_read(&mut [0u8; 16]).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let big = vec![7u8; 10_000];
        let n = socket.try_write_vectored(&[IoSlice::new(&big)]).unwrap();
        assert_eq!(n, 10_000, "staged whole");
        assert!(socket.has_pending_output(), "1 KiB went out, the rest is staged");
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 10_000];
            tokio::io::AsyncReadExt::read_exact(&mut far, &mut got).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut far, b"hello").await.unwrap();
            drop(far);
            got
        });
        socket.writable().await.unwrap();
        assert!(!socket.has_pending_output());
        assert_eq!(reader.await.unwrap(), big);
        socket.readable().await.unwrap();
        let mut buf = [0u8; 3];
        assert_eq!(socket.try_read(&mut buf).unwrap(), 3);
        assert_eq!(&buf, b"hel");
        assert_eq!(socket.try_read(&mut buf).unwrap(), 2);
        socket.readable().await.unwrap();
        assert_eq!(socket.try_read(&mut buf).unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn staging_pushes_back_when_full() {
        let (near, _far) = tokio::io::duplex(16);
        let socket = Socket::stream(near);
        let big = vec![1u8; STAGE_BYTES + 100];
        assert_eq!(socket.try_write_vectored(&[IoSlice::new(&big)]).unwrap(), STAGE_BYTES);
        // The pipe took 16 bytes: room for 16 more, then nothing.
        assert_eq!(socket.try_write_vectored(&[IoSlice::new(&big)]).unwrap(), 16);
        assert_eq!(
            socket.try_write_vectored(&[IoSlice::new(&big)]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
