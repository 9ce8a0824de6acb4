//! Off Linux there is no io_uring: the same API, where probing says so and no stream can be built.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use crate::buffers::{PinnedBuf, PinnedPool};
use crate::frame::DataHeader;
use crate::Result;

/// Zero-copy sends are off unless asked for.
pub const DEFAULT_ZERO_COPY: bool = false;

const WHY: &str = "io_uring exists on Linux only";

/// What the io_uring probe found (never built off Linux).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringInfo {
    /// `uname -r` of the running kernel.
    pub kernel_release: String,
    /// `kernel.io_uring_disabled`.
    pub io_uring_disabled: Option<u8>,
    /// `IORING_OP_SENDMSG_ZC` is available.
    pub send_zc: bool,
    /// `IORING_OP_READ_FIXED` is available.
    pub read_fixed: bool,
    /// `IORING_SETUP_COOP_TASKRUN` is available.
    pub coop_taskrun: bool,
}

/// Always fails off Linux.
pub fn probe() -> std::result::Result<UringInfo, String> {
    Err(WHY.into())
}

#[derive(Clone, Copy, Debug)]
enum Never {}

/// Cannot be built off Linux; every method is unreachable.
#[derive(Debug)]
pub struct UringStream {
    never: Never,
}

/// Cannot be built off Linux.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    never: Never,
}

impl ShutdownHandle {
    /// Unreachable.
    pub fn shutdown(&self) {
        match self.never {}
    }

    /// Unreachable.
    pub fn is_shut_down(&self) -> bool {
        match self.never {}
    }
}

#[allow(missing_docs)]
impl UringStream {
    /// Fails with [`io::ErrorKind::Unsupported`].
    pub fn new(_stream: TcpStream) -> io::Result<UringStream> {
        Err(io::Error::new(io::ErrorKind::Unsupported, WHY))
    }
    pub fn as_tcp(&self) -> &TcpStream {
        match self.never {}
    }
    pub fn set_io_timeout(&mut self, _timeout: Option<Duration>) {
        match self.never {}
    }
    pub fn io_timeout(&self) -> Option<Duration> {
        match self.never {}
    }
    pub fn set_zero_copy(&mut self, _on: bool) -> io::Result<()> {
        match self.never {}
    }
    pub fn zero_copy(&self) -> bool {
        match self.never {}
    }
    #[doc(hidden)]
    pub fn set_send_waitall(&mut self, _on: bool) {
        match self.never {}
    }
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        match self.never {}
    }
    pub fn register_pool(&mut self, _pool: &PinnedPool) -> bool {
        match self.never {}
    }
    pub fn fixed_buffers_reason(&self) -> Option<&str> {
        match self.never {}
    }
    pub fn has_fixed_buffers(&self) -> bool {
        match self.never {}
    }
    pub fn write_frame(&mut self, _header: &DataHeader, _payload: &[u8]) -> io::Result<()> {
        match self.never {}
    }
    pub fn read_exact(&mut self, _buf: &mut [u8]) -> io::Result<()> {
        match self.never {}
    }
    pub fn read_exact_fixed(&mut self, _buf: &mut PinnedBuf, _len: usize) -> io::Result<()> {
        match self.never {}
    }
    pub fn read_header(&mut self) -> Result<DataHeader> {
        match self.never {}
    }
    pub fn discard(&mut self, _len: usize) -> io::Result<()> {
        match self.never {}
    }
}
