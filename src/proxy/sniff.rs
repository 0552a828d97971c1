//! Plain-port protocol detection: reads the first bytes of a connection until they either are
//! the HTTP/2 connection preface (h2c with prior knowledge, RFC 9113 §3.3) or cannot be, and
//! [`Prefixed`], the IO that hands those bytes to the protocol's reader before the socket's.
//!
//! Owns only bytes and the preface; must not import hyper, the handler or routing. Why not
//! hyper-util's `auto` builder: it sniffs 24 bytes at a time and replays them as one 24-byte
//! read, so hyper's first read of a new connection gets 24 bytes of the head and its buffer
//! is reallocated (8 KiB copied) on the second; here one read of up to [`SNIFF_BUF`] takes
//! what the client sent, and hyper's first read gets all of it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes read at once while sniffing: a typical request head fits, and hyper's first read
/// (8 KiB) takes all of them.
pub const SNIFF_BUF: usize = 4 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Anything that is not the h2 preface, including a connection closed before the
    /// preface completed (the h1 parser then sees those bytes and the end).
    H1,
    H2,
}

/// Read from `io` until the bytes read are the h2 preface, differ from it, or the client
/// closed. Returns the version and the bytes read (to be replayed with [`Prefixed`]).
/// Bounded: each read adds at least one byte or ends, and the preface decides within 24.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<(Version, Vec<u8>)> {
    // Read into the spare capacity (no zeroing): the decision comes within 24 bytes, so the
    // capacity is never outgrown.
    let mut buf = Vec::with_capacity(SNIFF_BUF);
    loop {
        let n = io.read_buf(&mut buf).await?;
        let seen = buf.len().min(H2_PREFACE.len());
        if n == 0 || buf[..seen] != H2_PREFACE[..seen] {
            return Ok((Version::H1, buf));
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok((Version::H2, buf));
        }
    }
}

/// `inner` with `prefix` read first. Writes go straight to `inner`.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // Replayed: the buffer is not needed for the life of the connection.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    write_through_to_inner!();
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncWriteExt;

    /// Sniff what `chunks` deliver (one write each, the client side then closed), then read
    /// the rest through [`Prefixed`].
    async fn sniff_and_replay(chunks: &[&[u8]]) -> (Version, Vec<u8>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        for c in chunks {
            client.write_all(c).await.expect("write");
        }
        drop(client);
        let (v, prefix) = sniff(&mut server).await.expect("sniff");
        let seen = prefix.clone();
        let mut all = Vec::new();
        Prefixed::new(prefix, server)
            .read_to_end(&mut all)
            .await
            .expect("read");
        (v, seen, all)
    }

    #[tokio::test]
    async fn an_h1_head_is_h1_after_one_read_and_replayed_whole() {
        let head: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (v, seen, all) = sniff_and_replay(&[head]).await;
        assert_eq!(v, Version::H1);
        assert_eq!(seen, head, "the whole head in one read");
        assert_eq!(all, head);
    }

    #[tokio::test]
    async fn the_preface_is_h2_even_split_across_reads() {
        let (a, b) = H2_PREFACE.split_at(5);
        let settings: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
        let mut expected = H2_PREFACE.to_vec();
        expected.extend_from_slice(settings);
        let (v, _, all) = sniff_and_replay(&[a, b, settings]).await;
        assert_eq!(v, Version::H2);
        assert_eq!(all, expected, "nothing lost or repeated");
    }

    #[tokio::test]
    async fn a_partial_preface_then_other_bytes_or_the_end_is_h1() {
        for chunks in [
            &[&b"PRI * HTTP/1.1\r\n"[..]][..],
            &[&b"PRI"[..]][..],
            &[][..],
        ] {
            let (v, _, all) = sniff_and_replay(chunks).await;
            assert_eq!(v, Version::H1, "{chunks:?}");
            assert_eq!(all, chunks.concat());
        }
    }

    #[tokio::test]
    async fn small_reads_drain_the_prefix_in_order() {
        let mut p = Prefixed::new(b"abcdef".to_vec(), tokio::io::empty());
        let mut two = [0u8; 2];
        let mut got = Vec::new();
        // Bounded: three reads of two, then the end.
        for _ in 0..4 {
            let n = p.read(&mut two).await.expect("read");
            got.extend_from_slice(&two[..n]);
        }
        assert_eq!(got, b"abcdef");
        assert!(p.prefix.is_empty(), "released once replayed");
    }
}
