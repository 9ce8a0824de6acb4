//! TCP through socket2: options, bounded connect retry, vectored frame writes.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::frame::{DataHeader, HEADER_BYTES};
use crate::{Result, TransportError};

/// Options applied to every data and control socket.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct SocketOptions {
    /// Disable Nagle's algorithm (always wanted for frames; costs nothing on bulk transfers).
    pub nodelay: bool,
    /// `SO_SNDBUF` in bytes; `None` keeps the kernel's autotuning. Larger buffers let a sender
    /// run ahead of its receiver at the price of kernel memory per connection.
    pub send_buffer_bytes: Option<usize>,
    /// `SO_RCVBUF` in bytes; `None` keeps the kernel's autotuning.
    pub recv_buffer_bytes: Option<usize>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            send_buffer_bytes: None,
            recv_buffer_bytes: None,
        }
    }
}

impl SocketOptions {
    /// Applies the options to a connected or listening socket.
    pub fn apply(&self, stream: &TcpStream) -> Result<()> {
        let sock = SockRef::from(stream);
        sock.set_nodelay(self.nodelay)
            .map_err(|e| TransportError::io("setting TCP_NODELAY", e))?;
        if let Some(bytes) = self.send_buffer_bytes {
            sock.set_send_buffer_size(bytes)
                .map_err(|e| TransportError::io("setting SO_SNDBUF", e))?;
        }
        if let Some(bytes) = self.recv_buffer_bytes {
            sock.set_recv_buffer_size(bytes)
                .map_err(|e| TransportError::io("setting SO_RCVBUF", e))?;
        }
        Ok(())
    }
}

/// Turns on TCP keepalive (first probe after `idle`, then every `idle`, 3 probes), so that a
/// peer or master that vanished without closing its connection is noticed within about
/// `4 * idle` even when nothing else is sent.
pub fn set_keepalive(socket: &impl std::os::fd::AsFd, idle: std::time::Duration) -> Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle)
        .with_retries(3);
    SockRef::from(socket)
        .set_tcp_keepalive(&keepalive)
        .map_err(|e| TransportError::io("setting TCP keepalive", e))
}

/// Resolves `addr` ("host:port") to its first socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| TransportError::io(format!("resolving {addr:?}"), e))?
        .next()
        .ok_or_else(|| {
            TransportError::Protocol(format!("{addr:?} resolved to no address; give host:port"))
        })
}

/// Binds a listening socket with `SO_REUSEADDR` and the given backlog.
pub fn listen(addr: SocketAddr, backlog: i32) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| TransportError::io("creating a listening socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| TransportError::io("setting SO_REUSEADDR", e))?;
    socket.bind(&addr.into()).map_err(|e| {
        TransportError::io(
            format!("binding {addr} (is the port in use? choose another one)"),
            e,
        )
    })?;
    socket
        .listen(backlog)
        .map_err(|e| TransportError::io(format!("listening on {addr}"), e))?;
    Ok(socket.into())
}

/// Connects to `addr`, retrying refused or unreachable attempts with a capped backoff until
/// `timeout` has passed. Returns a clear timeout error naming `what` when it gives up.
pub fn connect_with_retry(
    addr: SocketAddr,
    options: &SocketOptions,
    timeout: Duration,
    what: &str,
) -> Result<TcpStream> {
    connect_until(addr, options, timeout, what, &|| false)
}

/// As [`connect_with_retry`], also giving up as soon as `stop()` returns true (checked between
/// attempts, at least every 100 ms).
pub fn connect_until(
    addr: SocketAddr,
    options: &SocketOptions,
    timeout: Duration,
    what: &str,
    stop: &dyn Fn() -> bool,
) -> Result<TcpStream> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(5);
    let mut last_error: Option<io::Error> = None;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if stop() {
            return Err(TransportError::Protocol(format!(
                "connecting to {what} at {addr}: cancelled"
            )));
        }
        if left.is_zero() {
            let cause = last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Err(TransportError::Timeout {
                what: format!("connecting to {what} at {addr}{cause}"),
                waited_ms: start.elapsed().as_millis() as u64,
            });
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_millis(500))) {
            Ok(stream) => {
                options.apply(&stream)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(backoff.min(timeout.saturating_sub(start.elapsed())));
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

/// Writes a header and its payload with as few syscalls as the kernel allows (vectored writes).
pub fn write_frame(stream: &mut impl Write, header: &DataHeader, payload: &[u8]) -> io::Result<()> {
    debug_assert_eq!(header.len as usize, payload.len());
    let head = header.encode();
    let mut head_done = 0usize;
    let mut body_done = 0usize;
    while head_done < HEADER_BYTES || body_done < payload.len() {
        let written = if head_done < HEADER_BYTES {
            let bufs = [
                IoSlice::new(&head[head_done..]),
                IoSlice::new(&payload[body_done..]),
            ];
            stream.write_vectored(&bufs)?
        } else {
            stream.write(&payload[body_done..])?
        };
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "peer stopped reading",
            ));
        }
        let to_head = written.min(HEADER_BYTES - head_done);
        head_done += to_head;
        body_done += written - to_head;
    }
    Ok(())
}

/// Reads and decodes one frame header.
pub fn read_header(stream: &mut impl Read) -> Result<DataHeader> {
    let mut head = [0u8; HEADER_BYTES];
    stream
        .read_exact(&mut head)
        .map_err(|e| TransportError::io("reading a data frame header", e))?;
    DataHeader::decode(&head)
}

/// Reads and throws away `len` payload bytes (leftovers of an aborted attempt).
pub fn discard(stream: &mut impl Read, len: usize) -> io::Result<()> {
    let mut scratch = [0u8; 16 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(scratch.len());
        stream.read_exact(&mut scratch[..n])?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_over_loopback() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = connect_with_retry(
                addr,
                &SocketOptions::default(),
                Duration::from_secs(5),
                "test",
            )
            .unwrap();
            let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            let h = DataHeader {
                len: payload.len() as u32,
                tag: 1,
                seq: 2,
                step: 0,
                sub: 0,
            };
            write_frame(&mut s, &h, &payload).unwrap();
        });
        let (mut r, _) = listener.accept().unwrap();
        let h = read_header(&mut r).unwrap();
        let mut body = vec![0u8; h.len as usize];
        r.read_exact(&mut body).unwrap();
        assert!(body.iter().enumerate().all(|(i, &b)| b == i as u8));
        sender.join().unwrap();
    }

    #[test]
    fn connect_gives_up_with_a_clear_error() {
        // Bind then drop to find a port nobody listens on.
        let port = listen("127.0.0.1:0".parse().unwrap(), 1)
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let err = connect_with_retry(
            addr,
            &SocketOptions::default(),
            Duration::from_millis(200),
            "the master",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("timed out") && err.contains("the master"),
            "{err}"
        );
    }
}
