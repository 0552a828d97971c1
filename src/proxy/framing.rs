//! Read-side HTTP/1.x framing guard: watches the request byte stream *before* hyper parses it
//! and marks every request head that carries both `Content-Length` and `Transfer-Encoding`
//! (brief §4.4 "Framing is strict"; RFC 9112 §6.3 item 3 calls that message a likely
//! smuggling attempt and lets a server reject it).
//!
//! Owns: [`FramingIo`] (the IO wrapper), [`Scanner`] (the sans-IO byte-stream state machine)
//! and the marker header name [`CL_TE_MARKER`]. Must not import the handler, routing, model
//! or upstream: it knows bytes, not requests. Never used for HTTP/2 (ALPN h2 is not wrapped;
//! the h2c preface on the plain port fails the h1 head parse and switches to pass-through).
//!
//! Why it exists: hyper 1.x accepts CL+TE, drops Content-Length and decodes chunked (RFC 9112
//! §6.3 allows that), so the handler never sees the Content-Length it must refuse. The
//! scanner renames every `Content-Length` header *name* of such a head, in place, to
//! [`CL_TE_MARKER`] (same 14 bytes, so nothing shifts). hyper then sees a plain chunked
//! request and the handler answers 400 + `Connection: close` when the marker is present.
//! A client that sends the marker itself gets the same 400: it only hurts itself.
//!
//! To find the next head on a keep-alive connection the scanner follows each body exactly as
//! hyper 1.12 does (`proto/h1/role.rs` chooses the length, `proto/h1/decode.rs` the chunked
//! state machine, mirrored byte for byte here, trailers included). Bodies are never buffered:
//! only an incomplete head is held, up to the h1 buffer cap. Whatever it cannot follow safely
//! (CONNECT, an `Upgrade` request, a head hyper would refuse, an oversize head, the h2c
//! preface) switches the rest of the connection to pass-through: hyper's own (non-smuggleable)
//! handling stays the safety net. The wrapper raises a flag when it stops following; the
//! listener then ends the connection after any answer that does not switch protocols, so no
//! request follows a CONNECT or Upgrade head unchecked.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header name a `Content-Length` of a CL+TE head is renamed to. Exactly as long as
/// `content-length`, so the rewrite is in place.
pub const CL_TE_MARKER: &str = "x-portico-clte";

const CONTENT_LENGTH: &[u8] = b"content-length";

/// Held buffers above this capacity are released once empty, so an idle keep-alive
/// connection does not keep a large head's allocation.
const KEEP_CAPACITY: usize = 8 * 1024;

/// Header slots parsed on the stack; a larger `max_headers` uses the heap.
const STACK_HEADERS: usize = 128;

/// hyper's chunked decoder states (`proto/h1/decode.rs` `ChunkedState`), one for one, so the
/// scanner and hyper agree on where a chunked body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting the first hex digit of a chunk size.
    Start,
    /// Inside the hex digits.
    Size,
    /// Whitespace after the size.
    SizeLws,
    /// A chunk extension, up to CR (RFC 9112 §7.1.1).
    Extension,
    /// CR of the size line seen; LF must follow.
    SizeLf,
    /// Chunk data, this many bytes left.
    Data(u64),
    /// CRLF after the chunk data.
    DataCr,
    DataLf,
    /// After the last chunk: CR of the empty line, or the first byte of a trailer field.
    EndCr,
    /// CR of the final empty line seen; LF ends the message.
    EndLf,
    /// Inside a trailer field line (RFC 9112 §7.1.2).
    Trailer,
    TrailerLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: bytes accumulate in `head` until a complete request head.
    Head,
    /// A Content-Length body, this many bytes left.
    Length(u64),
    /// A chunked body; `size` is the chunk size being read.
    Chunked { chunk: Chunk, size: u64 },
    /// Not following any more: every byte is released as it is.
    Passthrough,
    /// Framing hyper would accept but must not (see `chunk_step`): nothing from here on is
    /// released, and the reader gets an error, so no byte after it is read as a request.
    Rejected,
}

/// The sans-IO byte-stream scanner. Feed it what the client sent, in any split; it appends
/// to `out` what may be released to hyper (the same bytes, except the renamed header names
/// of CL+TE heads).
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// The incomplete head being held (only in [`State::Head`]).
    head: Vec<u8>,
    /// The request line of the held head has been checked once (garbage and the h2c preface
    /// are recognised at the first line end, not only at the end of the head).
    line_checked: bool,
    /// How far the method token of the held head has been checked, and whether its end (SP)
    /// was seen: bytes that cannot start a request (a TLS ClientHello on the plain port) are
    /// passed through at once, so hyper answers them as promptly as it would alone.
    method_scanned: usize,
    method_done: bool,
    /// Largest head held before giving up (hyper answers 431 beyond its buffer).
    max_head: usize,
    /// Header count hyper accepts; more is hyper's 431 (`httparse::Error::TooManyHeaders`).
    max_headers: usize,
    /// Heads marked so far.
    marked: u64,
}

impl Scanner {
    /// `max_head`: the listener's h1 buffer size; `max_headers`: hyper's header count limit.
    pub fn new(max_head: usize, max_headers: usize) -> Scanner {
        Scanner {
            state: State::Head,
            head: Vec::new(),
            line_checked: false,
            method_scanned: 0,
            method_done: false,
            max_head,
            max_headers: max_headers.max(1),
            marked: 0,
        }
    }

    /// True once the scanner stopped following the stream.
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// True once the scanner refused the stream ([`State::Rejected`]).
    pub fn is_rejected(&self) -> bool {
        self.state == State::Rejected
    }

    /// How many CL+TE heads were marked.
    pub fn marked(&self) -> u64 {
        self.marked
    }

    /// If the next `n` bytes can be released untouched without looking at them (pass-through,
    /// or all inside a Content-Length body), account for them and return true.
    pub fn skip(&mut self, n: usize) -> bool {
        match self.state {
            State::Passthrough => true,
            State::Length(rem) if rem > n as u64 => {
                self.state = State::Length(rem - n as u64);
                true
            }
            _ => false,
        }
    }

    /// End of the client's stream: release whatever head is held, unchanged (hyper sees the
    /// truncated head and the EOF, as without the scanner).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Rejected {
            return;
        }
        out.extend_from_slice(&self.head);
        self.clear_head();
        self.state = State::Passthrough;
    }

    /// The common read, without copies: the scanner is between messages and `data` is one
    /// whole head plus at most the Content-Length body bytes of that request (or anything
    /// after a head that switches to pass-through). Then `data` is processed in place
    /// (CL+TE marking included) and stays where it is; returns true. Otherwise nothing is
    /// touched, false is returned and the caller uses [`Scanner::feed`] (leading empty lines,
    /// partial or pipelined heads, chunked bodies, invalid heads).
    pub fn feed_in_place(&mut self, data: &mut [u8]) -> bool {
        if self.state != State::Head || !self.head.is_empty() {
            return false;
        }
        if matches!(data.first(), None | Some(b'\r' | b'\n')) {
            return false;
        }
        let Parsed::Complete(len, next, cl_names) = analyze(data, self.max_headers) else {
            return false;
        };
        let rest = (data.len() - len) as u64;
        let state = match next {
            State::Head if rest == 0 => State::Head,
            State::Length(n) if rest < n => State::Length(n - rest),
            State::Length(n) if rest == n => State::Head,
            State::Passthrough => State::Passthrough,
            _ => return false,
        };
        if let Some(names) = cl_names {
            mark(data, &names);
            self.marked += 1;
        }
        self.state = state;
        true
    }

    /// Process `input`, appending releasable bytes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let Some(mut rest) = self.step(input, out) else {
            return;
        };
        // Each turn starts after one complete, non-empty head, so `rest` shrinks every turn:
        // the loop ends within `input.len()` turns.
        while let Some(next) = self.step(&rest, out) {
            rest = next;
        }
    }

    /// Process `data` until it is used up (None) or a held head completed and the bytes
    /// after it, already taken from `data` into the head buffer, must be processed again.
    fn step(&mut self, data: &[u8], out: &mut Vec<u8>) -> Option<Vec<u8>> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(&data[i..]);
                    return None;
                }
                State::Length(rem) => {
                    let n = usize::try_from(rem)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    out.extend_from_slice(&data[i..i + n]);
                    i += n;
                    let left = rem - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunked {
                    chunk: Chunk::Data(rem),
                    size,
                } => {
                    let n = usize::try_from(rem)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    out.extend_from_slice(&data[i..i + n]);
                    i += n;
                    let left = rem - n as u64;
                    let chunk = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    self.state = State::Chunked { chunk, size };
                }
                State::Chunked { chunk, size } => {
                    self.state = chunk_step(chunk, size, data[i]);
                    if self.state == State::Rejected {
                        return None;
                    }
                    out.push(data[i]);
                    i += 1;
                }
                State::Rejected => return None,
                State::Head => {
                    if self.head.is_empty() || self.head == b"\r" {
                        // RFC 9112 §2.2: empty lines before a request line are ignored
                        // (httparse skips them too); release them at once so they neither
                        // count against the head cap nor cost a parse.
                        match (self.head.is_empty(), data[i]) {
                            (true, b'\n') => {
                                out.push(b'\n');
                                i += 1;
                                continue;
                            }
                            (false, b'\n') => {
                                out.extend_from_slice(b"\r\n");
                                self.head.clear();
                                i += 1;
                                continue;
                            }
                            (true, b'\r') => {
                                self.head.push(b'\r');
                                i += 1;
                                continue;
                            }
                            _ => {}
                        }
                    }
                    let start = self.head.len();
                    self.head.extend_from_slice(&data[i..]);
                    return self.check_head(start, out);
                }
            }
        }
        None
    }

    /// New bytes were appended to the held head from `start` on: parse when a line end or a
    /// head end arrived, release and switch state as needed.
    fn check_head(&mut self, start: usize, out: &mut Vec<u8>) -> Option<Vec<u8>> {
        if self.method_invalid() {
            self.give_up(out);
            return None;
        }
        let new = &self.head[start..];
        let first_line = !self.line_checked && new.contains(&b'\n');
        // An empty line (`\n\n` or `\n\r\n`, httparse accepts bare LF) may end the head; look
        // two bytes back so one split across reads is not missed.
        let window = &self.head[start.saturating_sub(2)..];
        let head_end =
            window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n");
        if first_line || head_end {
            match analyze(&self.head, self.max_headers) {
                Parsed::Complete(len, next, cl_names) => {
                    if let Some(names) = cl_names {
                        mark(&mut self.head, &names);
                        self.marked += 1;
                    }
                    let rest = self.head.split_off(len);
                    out.extend_from_slice(&self.head);
                    self.clear_head();
                    self.state = next;
                    return if rest.is_empty() { None } else { Some(rest) };
                }
                Parsed::Partial => self.line_checked = true,
                Parsed::Invalid => {
                    self.give_up(out);
                    return None;
                }
            }
        }
        if self.head.len() > self.max_head {
            // hyper answers 431 when its buffer fills without a complete head.
            self.give_up(out);
        }
        None
    }

    fn give_up(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        self.clear_head();
        self.state = State::Passthrough;
    }

    fn clear_head(&mut self) {
        self.head.clear();
        if self.head.capacity() > KEEP_CAPACITY {
            self.head = Vec::new();
        }
        self.line_checked = false;
        self.method_scanned = 0;
        self.method_done = false;
    }

    /// Check the method token incrementally (RFC 9110 §9.1: a token, then SP).
    fn method_invalid(&mut self) -> bool {
        while !self.method_done {
            let Some(&b) = self.head.get(self.method_scanned) else {
                return false;
            };
            self.method_scanned += 1;
            if b == b' ' {
                self.method_done = true;
            } else if !is_tchar(b) {
                return true;
            }
        }
        false
    }
}

/// Parse a head with hyper's own parser (httparse, default config as hyper's h1 server uses
/// it) and decide the body framing the way hyper 1.12 `role.rs` does. When Transfer-Encoding
/// and Content-Length are both present, also returns the offsets of the Content-Length names
/// to mark.
fn analyze(head: &[u8], max_headers: usize) -> Parsed {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(head, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Whatever httparse refuses, hyper refuses (400/431) and closes.
        Err(_) => return Parsed::Invalid,
    };
    let base = head.as_ptr() as usize;
    let http11 = req.version == Some(1);
    let connect = req.method == Some("CONNECT");
    let mut upgrade = false;
    let mut te = false;
    let mut te_chunked = false;
    let mut cl_names: Vec<usize> = Vec::new();
    let mut cl_value: Option<Option<u64>> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            // hyper: the last Transfer-Encoding line decides (`headers::is_chunked_`).
            te_chunked = is_chunked(h.value);
        } else if name.eq_ignore_ascii_case(CONTENT_LENGTH) {
            // Offset of the name inside the head buffer: `name` is a sub-slice of it.
            cl_names.push(h.name.as_ptr() as usize - base);
            let v = from_digits(h.value);
            cl_value = Some(match cl_value {
                None => v,
                Some(prev) if prev == v => prev,
                // Differing values: hyper refuses the head.
                Some(_) => None,
            });
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            // hyper only honours Upgrade on HTTP/1.1. Any protocol: the service behind the
            // listener decides what it switches (portico's handler only WebSocket, but the
            // listener serves any `ServeRequest`); an answer that does not switch ends the
            // connection instead (the `stopped` flag).
            upgrade |= http11;
        }
    }
    let marks = (te && !cl_names.is_empty()).then_some(cl_names);
    let next = if connect || upgrade {
        // After a 101 / 2xx the bytes are no longer HTTP: stop following.
        State::Passthrough
    } else if te {
        if te_chunked && http11 {
            State::Chunked {
                chunk: Chunk::Start,
                size: 0,
            }
        } else {
            // hyper: not-chunked-last → 400; TE on HTTP/1.0 → 400.
            State::Passthrough
        }
    } else {
        match cl_value {
            None | Some(Some(0)) => State::Head,
            Some(Some(n)) => State::Length(n),
            Some(None) => State::Passthrough,
        }
    };
    Parsed::Complete(len, next, marks)
}

/// Rename the Content-Length names at `at` (offsets into `head`) to [`CL_TE_MARKER`].
fn mark(head: &mut [u8], at: &[usize]) {
    for &at in at {
        if let Some(name) = head.get_mut(at..at + CONTENT_LENGTH.len()) {
            name.copy_from_slice(CL_TE_MARKER.as_bytes());
        }
    }
}

/// Result of parsing the held head.
enum Parsed {
    /// Head of this many bytes; the body framing that follows it; the Content-Length names
    /// to mark (CL+TE).
    Complete(usize, State, Option<Vec<usize>>),
    Partial,
    Invalid,
}

/// hyper's `headers::is_chunked_`: the value is visible ASCII and its last coding is chunked.
fn is_chunked(value: &[u8]) -> bool {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    if !visible {
        return false;
    }
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// hyper's `headers::from_digits`: one or more DIGIT, no sign, no overflow.
fn from_digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// One byte of hyper's chunked decoder (RFC 9112 §7.1). Where hyper fails, the scanner stops
/// following (hyper closes the connection on that error anyway).
fn chunk_step(chunk: Chunk, size: u64, b: u8) -> State {
    let go = |chunk: Chunk, size: u64| State::Chunked { chunk, size };
    let digit = |size: u64| {
        hex(b)
            .and_then(|d| size.checked_mul(16)?.checked_add(d))
            .map_or(State::Passthrough, |s| go(Chunk::Size, s))
    };
    match (chunk, b) {
        (Chunk::Start, _) => digit(0),
        (Chunk::Size, b'\t' | b' ') => go(Chunk::SizeLws, size),
        (Chunk::Size, b';') | (Chunk::SizeLws, b';') => go(Chunk::Extension, size),
        (Chunk::Size, b'\r') | (Chunk::SizeLws, b'\r') | (Chunk::Extension, b'\r') => {
            go(Chunk::SizeLf, size)
        }
        (Chunk::Size, _) => digit(size),
        (Chunk::SizeLws, b'\t' | b' ') => go(Chunk::SizeLws, size),
        // hyper refuses a bare LF inside an extension.
        (Chunk::Extension, b'\n') => State::Passthrough,
        (Chunk::Extension, _) => go(Chunk::Extension, size),
        (Chunk::SizeLf, b'\n') if size == 0 => go(Chunk::EndCr, 0),
        (Chunk::SizeLf, b'\n') => go(Chunk::Data(size), 0),
        // Data is handled in bulk by the caller; a zero-length Data cannot be built.
        (Chunk::Data(_), _) => State::Passthrough,
        (Chunk::DataCr, b'\r') => go(Chunk::DataLf, 0),
        (Chunk::DataLf, b'\n') => go(Chunk::Start, 0),
        (Chunk::EndCr, b'\r') => go(Chunk::EndLf, 0),
        // Any other byte starts a trailer field line; it runs to CR, and LF must follow.
        (Chunk::EndCr, _) => go(Chunk::Trailer, 0),
        (Chunk::Trailer, b'\r') => go(Chunk::TrailerLf, 0),
        // A bare LF in a trailer line: hyper takes it as part of the line, so its idea of
        // where the trailers end (and the next request starts) differs from a peer that ends
        // lines at LF (RFC 9112 §2.2 lets it) — a way to hide a request. hyper would go on, so
        // the stream is cut here: the body fails and the connection closes, and nothing after
        // this byte is read as a request, whenever the response went out.
        (Chunk::Trailer, b'\n') => State::Rejected,
        (Chunk::Trailer, _) => go(Chunk::Trailer, 0),
        (Chunk::TrailerLf, b'\n') => go(Chunk::EndCr, 0),
        (Chunk::EndLf, b'\n') => State::Head,
        _ => State::Passthrough,
    }
}

/// Client IO with a [`Scanner`] on the read side; writes go straight through.
pub struct FramingIo<T> {
    inner: T,
    scanner: Scanner,
    /// Set once the scanner stops following the connection (pass-through): the listener
    /// then closes the connection after the current response unless it switched protocols,
    /// so no request follows unchecked.
    stopped: Arc<AtomicBool>,
    /// Bytes released by the scanner and not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    /// Copy of one read from `inner`, reused.
    scratch: Vec<u8>,
    eof: bool,
}

impl<T> FramingIo<T> {
    /// `max_head`: the h1 buffer size the listener gives hyper; `max_headers`: hyper's
    /// header count limit.
    pub fn new(inner: T, max_head: usize, max_headers: usize, stopped: Arc<AtomicBool>) -> Self {
        FramingIo {
            inner,
            scanner: Scanner::new(max_head, max_headers),
            stopped,
            out: Vec::new(),
            out_pos: 0,
            scratch: Vec::new(),
            eof: false,
        }
    }

    /// Copy released bytes into `buf`; true if any were pending.
    fn drain_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_pos >= self.out.len() {
            return false;
        }
        let n = buf.remaining().min(self.out.len() - self.out_pos);
        buf.put_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            }
        }
        true
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stopped = |s: &Scanner| s.is_passthrough() || s.is_rejected();
        let was = stopped(&this.scanner);
        let polled = this.poll_scanned(cx, buf);
        // (At the client's EOF the scanner passes through what is left too; nothing follows.)
        if !was && stopped(&this.scanner) && !this.eof {
            this.stopped.store(true, Ordering::Release);
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> FramingIo<T> {
    fn poll_scanned(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Each turn returns, or moves at least one byte from `inner` into the held head,
        // which is capped (the scanner passes through beyond `max_head`): bounded.
        loop {
            if this.drain_out(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.scanner.is_rejected() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request framing refused (bare LF in a chunked trailer)",
                )));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.scanner.is_passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let n = buf.filled().len() - before;
            if n == 0 {
                this.scanner.finish(&mut this.out);
                this.eof = true;
                continue;
            }
            if this.scanner.skip(n) {
                // Body bytes (or pass-through): already where the reader wants them.
                return Poll::Ready(Ok(()));
            }
            if this.scanner.feed_in_place(&mut buf.filled_mut()[before..]) {
                // One whole head (and its body bytes): checked and left in place.
                return Poll::Ready(Ok(()));
            }
            this.scratch.clear();
            this.scratch.extend_from_slice(&buf.filled()[before..]);
            buf.set_filled(before);
            this.scanner.feed(&this.scratch, &mut this.out);
            if this.scratch.capacity() > KEEP_CAPACITY {
                this.scratch = Vec::new();
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingIo<T> {
    write_through_to_inner!();
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;

    use tokio::io::AsyncReadExt;

    const CAP: usize = 8 * 1024;
    const MAX_HEADERS: usize = 100;

    /// What the scanner should end in.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum End {
        /// Between messages, nothing held.
        Idle,
        Passthrough,
        Rejected,
    }

    /// Feed the chunks the way [`FramingIo`] does: the in-place fast path first, the copying
    /// path when it declines. Every split test therefore checks both paths against each other.
    fn run(chunks: &[&[u8]], eof: bool) -> (Vec<u8>, Scanner) {
        let mut s = Scanner::new(CAP, MAX_HEADERS);
        let mut out = Vec::new();
        for c in chunks {
            let mut copy = c.to_vec();
            if s.skip(c.len()) || s.feed_in_place(&mut copy) {
                out.extend_from_slice(&copy);
            } else {
                assert_eq!(copy, *c, "a declined fast path must not touch the bytes");
                s.feed(c, &mut out);
            }
        }
        if eof {
            s.finish(&mut out);
        }
        (out, s)
    }

    #[test]
    fn in_place_path_takes_whole_heads_and_declines_the_rest() {
        let mut s = Scanner::new(CAP, MAX_HEADERS);
        let mut get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        assert!(s.feed_in_place(&mut get));
        let mut post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab".to_vec();
        assert!(s.feed_in_place(&mut post));
        assert_eq!(s.state, State::Length(3));
        let mut body = Vec::new();
        s.feed(b"cde", &mut body);
        assert_eq!((body.as_slice(), s.state), (&b"cde"[..], State::Head));
        let mut clte =
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        // Chunked follows: the copying path's business, untouched.
        let before = clte.clone();
        assert!(!s.feed_in_place(&mut clte));
        assert_eq!(clte, before);
        let mut partial = b"GET / HTTP/1.1\r\nHost".to_vec();
        assert!(!s.feed_in_place(&mut partial));
        let mut pipelined = b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_vec();
        assert!(!s.feed_in_place(&mut pipelined));
        let mut upgrade =
            b"GET / HTTP/1.0\r\nContent-Length: 2\r\nTransfer-Encoding: x\r\n\r\nzz".to_vec();
        assert!(
            s.feed_in_place(&mut upgrade),
            "TE on HTTP/1.0: pass-through"
        );
        assert!(String::from_utf8_lossy(&upgrade).contains(CL_TE_MARKER));
        assert!(s.is_passthrough());
        assert_eq!(s.marked(), 1);
    }

    /// Feed `input` whole, split in two at every boundary, split in three at pairs of
    /// boundaries (short inputs), and one byte at a time; every way must give `expected`,
    /// `marked` marked heads and the `end` state.
    fn check_all_splits(input: &[u8], expected: &[u8], marked: u64, end: End) {
        let verify = |how: &str, (out, s): (Vec<u8>, Scanner)| {
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(expected),
                "{how}"
            );
            assert_eq!(s.marked(), marked, "{how}");
            match end {
                End::Idle => {
                    assert_eq!(s.state, State::Head, "{how}");
                    assert!(s.head.is_empty(), "{how}");
                }
                End::Passthrough => assert!(s.is_passthrough(), "{how}"),
                End::Rejected => assert!(s.is_rejected(), "{how}"),
            }
        };
        verify("whole", run(&[input], false));
        for p in 0..=input.len() {
            let (a, b) = input.split_at(p);
            verify(&format!("split at {p}"), run(&[a, b], false));
        }
        if input.len() <= 200 {
            for p in 0..=input.len() {
                for q in p..=input.len() {
                    let parts = [&input[..p], &input[p..q], &input[q..]];
                    verify(&format!("split at {p},{q}"), run(&parts, false));
                }
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        verify("1-byte feeds", run(&bytes, false));
    }

    fn marked(input: &[u8]) -> Vec<u8> {
        // The test inputs spell the header in a few cases; the marker is lower-case.
        let text = String::from_utf8_lossy(input).into_owned();
        let mut out = text.clone().into_bytes();
        let lower = text.to_ascii_lowercase();
        for (at, _) in lower.match_indices("content-length") {
            out[at..at + 14].copy_from_slice(CL_TE_MARKER.as_bytes());
        }
        out
    }

    #[test]
    fn marker_is_as_long_as_content_length() {
        assert_eq!(CL_TE_MARKER.len(), CONTENT_LENGTH.len());
        assert!(http::HeaderName::from_static(CL_TE_MARKER).as_str() == CL_TE_MARKER);
    }

    #[test]
    fn single_request_without_body_is_unchanged() {
        let req = b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
        check_all_splits(req, req, 0, End::Idle);
    }

    #[test]
    fn pipelined_requests_and_leading_empty_lines_are_unchanged() {
        let reqs = b"\r\n\nGET / HTTP/1.1\r\nhost: x\r\n\r\nHEAD /h HTTP/1.1\r\nhost: x\r\n\r\n\
            \r\nDELETE /d HTTP/1.0\n\n";
        check_all_splits(reqs, reqs, 0, End::Idle);
    }

    #[test]
    fn content_length_bodies_are_followed() {
        // The first body looks like a CL+TE head: it is body, so it must not be touched.
        let body = b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut reqs = format!(
            "POST /p HTTP/1.1\r\nhost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        reqs.extend_from_slice(body);
        reqs.extend_from_slice(b"PUT /q HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
        reqs.extend_from_slice(
            b"POST /r HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        );
        reqs.extend_from_slice(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n");
        check_all_splits(&reqs, &reqs, 0, End::Idle);
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers_are_followed() {
        let reqs: &[u8] = b"POST /c HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
            5;name=value;x\r\nhello\r\nA \t;ext\r\n0123456789\r\n0\r\n\r\n\
            POST /t HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n\
            41\r\nGET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n\r\n0;last\r\nTrailer-One: 1\r\nContent-Length: 5\r\n\r\n\
            GET /after HTTP/1.1\r\nhost: x\r\n\r\n";
        check_all_splits(reqs, reqs, 0, End::Idle);
    }

    /// A bare LF inside a trailer line ends the following: no request hidden after it is ever
    /// read (the connection closes after the current response).
    #[test]
    fn a_bare_lf_in_a_trailer_stops_the_following() {
        let smuggle: &[u8] = b"POST /public/1 HTTP/1.1\r\nHost: t.local\r\n\
            Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: 1\n\r\n\
            GET /admin/victim HTTP/1.1\r\nHost: t.local\r\n\r\n\
            GET /admin/after HTTP/1.1\r\nHost: t.local\r\n\r\n";
        // Released up to the bare LF, nothing after it.
        let at = smuggle
            .windows(2)
            .position(|w| w == b"1\n")
            .expect("the bare LF");
        check_all_splits(smuggle, &smuggle[..=at], 0, End::Rejected);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_marked_in_either_order() {
        let cl_first: &[u8] = b"POST / HTTP/1.1\r\nhost: x\r\nContent-Length: 4\r\n\
            transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        check_all_splits(cl_first, &marked(cl_first), 1, End::Idle);
        let te_first: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nhost: x\r\n\
            CONTENT-LENGTH: 4\r\ncontent-length: 9\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let out = marked(te_first);
        assert!(!String::from_utf8_lossy(&out).contains("CONTENT-LENGTH"));
        check_all_splits(te_first, &out, 1, End::Idle);
        // Marked heads keep their exact length: nothing after them shifts.
        assert_eq!(out.len(), te_first.len());
    }

    #[test]
    fn cl_te_as_second_request_is_marked_after_chunked_and_after_cl_bodies() {
        let second: &[u8] = b"POST /2 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\
            transfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        let after_chunked = [
            &b"POST /1 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                4\r\ncont\r\n0\r\n\r\n"[..],
            second,
        ]
        .concat();
        let mut expected = after_chunked.clone();
        let first_len = after_chunked.len() - second.len();
        expected[first_len..].copy_from_slice(&marked(second));
        check_all_splits(&after_chunked, &expected, 1, End::Idle);

        let after_cl = [
            &b"POST /1 HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nbody"[..],
            second,
        ]
        .concat();
        let mut expected = after_cl.clone();
        let first_len = after_cl.len() - second.len();
        expected[first_len..].copy_from_slice(&marked(second));
        check_all_splits(&after_cl, &expected, 1, End::Idle);
    }

    #[test]
    fn upgrade_and_connect_switch_to_pass_through() {
        let later = b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let ws = [
            &b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"[..],
            b"\x81\x05hello",
            later,
        ]
        .concat();
        check_all_splits(&ws, &ws, 0, End::Passthrough);
        let connect = [&b"CONNECT x:443 HTTP/1.1\r\nhost: x:443\r\n\r\n"[..], later].concat();
        check_all_splits(&connect, &connect, 0, End::Passthrough);
        // HTTP/1.0 has no Upgrade (hyper ignores it there): still followed.
        let old = b"GET / HTTP/1.0\r\nupgrade: websocket\r\n\r\n";
        check_all_splits(old, old, 0, End::Idle);
    }

    /// The IO wrapper raises its flag when the scanner stops following, for the listener to
    /// end the connection after the current answer; plain requests leave it down.
    #[tokio::test]
    async fn io_wrapper_flags_when_it_stops_following() {
        let stopped = Arc::new(AtomicBool::new(false));
        let plain = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
        let mut io = FramingIo::new(
            Chunks(vec![plain].into()),
            CAP,
            MAX_HEADERS,
            stopped.clone(),
        );
        let mut buf = vec![0u8; 1024];
        while io.read(&mut buf).await.expect("read") > 0 {}
        assert!(!stopped.load(Ordering::Acquire));
        let ws = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: WebSocket\r\n\r\n";
        let mut io = FramingIo::new(
            Chunks(vec![ws.to_vec()].into()),
            CAP,
            MAX_HEADERS,
            stopped.clone(),
        );
        while io.read(&mut buf).await.expect("read") > 0 {}
        assert!(stopped.load(Ordering::Acquire));
    }

    #[test]
    fn h2c_preface_passes_through_at_its_first_line() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        check_all_splits(preface, preface, 0, End::Passthrough);
        // Nothing is held once the first line is there: hyper can sniff the preface.
        let (out, s) = run(&[b"PRI * HTTP/2.0\r\n"], false);
        assert_eq!(out, b"PRI * HTTP/2.0\r\n");
        assert!(s.is_passthrough());
    }

    #[test]
    fn garbage_passes_through_without_waiting() {
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        check_all_splits(tls_hello, tls_hello, 0, End::Passthrough);
        let bad_header = b"GET / HTTP/1.1\r\nbad header\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        check_all_splits(bad_header, bad_header, 0, End::Passthrough);
        let space_before_colon = b"GET / HTTP/1.1\r\ncontent-length : 1\r\n\r\nx";
        check_all_splits(space_before_colon, space_before_colon, 0, End::Passthrough);
        let bad_chunk = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
        check_all_splits(bad_chunk, bad_chunk, 0, End::Passthrough);
        let bad_cl = b"POST / HTTP/1.1\r\ncontent-length: +4\r\n\r\nabcd";
        check_all_splits(bad_cl, bad_cl, 0, End::Passthrough);
        let te_not_chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n";
        check_all_splits(te_not_chunked, te_not_chunked, 0, End::Passthrough);
    }

    #[test]
    fn oversize_head_passes_through() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() <= CAP {
            head.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        // The end of the head (with CL+TE) only arrives after the cap: never parsed.
        head.extend_from_slice(b"content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        let (out, s) = run(&[&head], false);
        assert_eq!(out, head);
        assert!(s.is_passthrough());
        assert_eq!(s.marked(), 0);
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        let (out, s) = run(&bytes, false);
        assert_eq!(out, head);
        assert!(s.is_passthrough());
        // Too many headers is hyper's 431 too.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        check_all_splits(&many, &many, 0, End::Passthrough);
    }

    #[test]
    fn incomplete_head_is_held_then_released_at_eof() {
        let partial = b"GET / HTTP/1.1\r\nhost: x\r\ncontent-le";
        let (out, s) = run(&[partial], false);
        assert_eq!(out, b"");
        assert_eq!(s.head, partial);
        let (out, _) = run(&[partial], true);
        assert_eq!(out, partial);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_keep_their_length() {
        // Deterministic xorshift stream mixing HTTP-ish fragments with noise.
        let pieces: [&[u8]; 10] = [
            b"GET / HTTP/1.1\r\n",
            b"content-length: 3\r\n",
            b"transfer-encoding: chunked\r\n",
            b"\r\n",
            b"\n",
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"upgrade: x\r\n",
            b"\x00\xff;\r",
            b"POST /p HTTP/1.1\r\n",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let mut input = Vec::new();
            for _ in 0..(next() % 40) {
                input.extend_from_slice(pieces[(next() % 10) as usize]);
            }
            let mut s = Scanner::new(256, 8);
            let mut out = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = ((next() % 17) as usize + 1).min(rest.len());
                s.feed(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            s.finish(&mut out);
            assert_eq!(out.len(), input.len());
        }
    }

    /// A reader that yields the given chunks, one per read, then EOF.
    struct Chunks(VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut c) = this.0.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    this.0.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn read_through(chunks: Vec<Vec<u8>>, read_size: usize) -> Vec<u8> {
        let mut io = FramingIo::new(Chunks(chunks.into()), CAP, MAX_HEADERS, Arc::default());
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        // Bounded: every read returns bytes until the EOF.
        for _ in 0..100_000 {
            let n = io.read(&mut buf).await.expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
        panic!("no EOF");
    }

    #[tokio::test]
    async fn io_wrapper_releases_marked_stream_in_small_and_large_reads() {
        let body = vec![b'z'; 20_000];
        let mut stream = format!(
            "POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(&body);
        let clte: &[u8] =
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        stream.extend_from_slice(clte);
        stream.extend_from_slice(b"GET /tail HTTP/1.1\r\nhost: x\r\n");
        let mut expected = stream.clone();
        let at = stream.len() - clte.len() - b"GET /tail HTTP/1.1\r\nhost: x\r\n".len();
        expected[at..at + clte.len()].copy_from_slice(&marked(clte));
        for (chunk, read) in [(1, 1), (7, 3), (4096, 1), (4096, 16 * 1024), (100_000, 5)] {
            let chunks: Vec<Vec<u8>> = stream.chunks(chunk).map(<[u8]>::to_vec).collect();
            let out = read_through(chunks, read).await;
            assert_eq!(out, expected, "chunks of {chunk}, reads of {read}");
        }
    }
}
