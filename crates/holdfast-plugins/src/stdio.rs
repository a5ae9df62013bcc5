//! A plugin's standard streams and WASI I/O that never blocks the host.
//!
//! Plugins run on the gateway's tokio worker threads. wasmtime-wasi's
//! synchronous bindings implement every blocking WASI call (a
//! `blocking-write-and-flush` to stderr, `pollable.block`, a resource drop
//! that awaits) by entering a tokio runtime, which panics on a thread that
//! already runs one. A guest's panic message alone — Rust prints it to
//! stderr before it traps — was enough to take down the calling task.
//!
//! Here the guest's stdout and stderr are captured into a small buffer per
//! instance ([`Captured`]), which the slot moves into the log after each call,
//! and the `wasi:io/poll` and `wasi:io/streams` functions are redefined to
//! poll their operation once instead of blocking: what is ready (writes to
//! the capture buffer, reads of the closed stdin) completes; what would
//! block (a timer, a sleep) traps the call, which the slot counts and
//! answers with its failure policy. A plugin computes; it does not wait.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::bindings::io::{poll as async_poll, streams as async_streams};
use wasmtime_wasi::p2::bindings::sync::io::{poll as sync_poll, streams as sync_streams};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, OutputStream, Pollable, StreamError, StreamResult,
};

/// Longest log message kept, bytes (also what a plugin's captured output keeps
/// between two reads).
pub const LOG_MESSAGE_MAX: usize = 4096;

/// What a plugin instance wrote to stdout and stderr, at most
/// [`LOG_MESSAGE_MAX`] bytes between two reads; the rest is counted.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<CapturedInner>);

#[derive(Debug, Default)]
struct CapturedInner {
    /// Set by a write: [`Captured::take`] on the call path locks nothing
    /// while a plugin writes nothing, which is the usual case.
    written: AtomicBool,
    buf: Mutex<CapturedBuf>,
}

#[derive(Debug, Default)]
struct CapturedBuf {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Captured {
    fn push(&self, data: &[u8]) {
        let mut b = holdfast_model::lock(&self.0.buf);
        let room = LOG_MESSAGE_MAX.saturating_sub(b.bytes.len());
        let keep = data.len().min(room);
        b.bytes.extend_from_slice(&data[..keep]);
        b.dropped += data.len() - keep;
        self.0.written.store(true, Ordering::Release);
    }

    /// Takes what was written since the last call, as text; `None` if nothing was.
    pub fn take(&self) -> Option<String> {
        if !self.0.written.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut b = holdfast_model::lock(&self.0.buf);
        if b.bytes.is_empty() && b.dropped == 0 {
            return None;
        }
        let mut text = String::from_utf8_lossy(&b.bytes).trim_end().to_string();
        if b.dropped > 0 {
            text.push_str(&format!(" …[{} more bytes]", b.dropped));
        }
        b.bytes.clear();
        b.dropped = 0;
        Some(text)
    }
}

impl OutputStream for Captured {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: what does not fit is counted and dropped.
        Ok(64 * 1024)
    }
}

impl Pollable for Captured {
    fn ready<'a, 'b>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(std::future::ready(()))
    }
}

impl tokio::io::AsyncWrite for Captured {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// Polls `f` once. Ready: its output. Pending: the call would block the
/// host thread, so it traps instead.
fn once<T>(what: &str, f: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(wasmtime::format_err!(
            "the plugin called {what}, which would block: plugins may not wait on I/O or timers"
        )),
    }
}

/// [`once`] for stream operations, whose errors are stream errors.
fn once_stream<T>(what: &str, f: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(StreamError::Trap(wasmtime::format_err!(
            "the plugin called {what}, which would block: plugins may not wait on I/O"
        ))),
    }
}

/// The resource table, seen through the non-blocking bindings.
pub struct NonBlocking<'a>(&'a mut ResourceTable);

struct NonBlockingIo;

impl HasData for NonBlockingIo {
    type Data<'a> = NonBlocking<'a>;
}

/// A store's data that holds the WASI resource table.
pub trait HasTable {
    /// The resource table.
    fn table(&mut self) -> &mut ResourceTable;
}

/// Redefines `wasi:io/poll` and `wasi:io/streams` in `linker` (which already
/// has wasmtime-wasi's synchronous WASI) with the non-blocking versions.
///
/// # Errors
/// The linker refuses the definitions.
pub fn link_non_blocking_io<T: HasTable + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    sync_poll::add_to_linker::<T, NonBlockingIo>(linker, |s| NonBlocking(s.table()))?;
    sync_streams::add_to_linker::<T, NonBlockingIo>(linker, |s| NonBlocking(s.table()))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl sync_poll::Host for NonBlocking<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        once("poll", async_poll::Host::poll(self.0, pollables))
    }
}

impl sync_poll::HostPollable for NonBlocking<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // `ready` never blocks: not ready yet is an answer.
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(async_poll::HostPollable::ready(self.0, pollable)).poll(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(false),
        }
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        once("pollable.block", async_poll::HostPollable::block(self.0, pollable))
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl sync_streams::Host for NonBlocking<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<sync_streams::StreamError> {
        Ok(async_streams::Host::convert_stream_error(self.0, err)?.into())
    }
}

impl sync_streams::HostOutputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        once(
            "output-stream.drop",
            async_streams::HostOutputStream::drop(self.0, stream),
        )
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        async_streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        async_streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        once_stream(
            "blocking-write-and-flush",
            async_streams::HostOutputStream::blocking_write_and_flush(self.0, stream, bytes),
        )
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        async_streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        once_stream(
            "blocking-flush",
            async_streams::HostOutputStream::blocking_flush(self.0, stream),
        )
    }

    fn subscribe(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        async_streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        once_stream(
            "blocking-write-zeroes-and-flush",
            async_streams::HostOutputStream::blocking_write_zeroes_and_flush(self.0, stream, len),
        )
    }

    fn splice(&mut self, dst: Resource<DynOutputStream>, src: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        async_streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        once_stream(
            "blocking-splice",
            async_streams::HostOutputStream::blocking_splice(self.0, dst, src, len),
        )
    }
}

impl sync_streams::HostInputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        once(
            "input-stream.drop",
            async_streams::HostInputStream::drop(self.0, stream),
        )
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        async_streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        once_stream(
            "blocking-read",
            async_streams::HostInputStream::blocking_read(self.0, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        async_streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        once_stream(
            "blocking-skip",
            async_streams::HostInputStream::blocking_skip(self.0, stream, len),
        )
    }

    fn subscribe(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostInputStream::subscribe(self.0, stream)
    }
}
