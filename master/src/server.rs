//! The master's event loop: one thread, one `mio::Poll`, around the [`Coordinator`].
//!
//! Each connection has a bounded read buffer (one maximal message) and a bounded write buffer;
//! a peer that stops reading until its write buffer passes [`MAX_WRITE_BUFFER_BYTES`] is
//! disconnected rather than allowed to grow the master's memory. The loop sleeps in `poll` until
//! a socket is ready or the coordinator's next deadline, so an idle master uses no CPU.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::coordinator::{ConnId, Coordinator, CoordinatorConfig, Output};
use crate::proto::{decode_peer, encode_master, split_frame, ProtoError, MAX_MESSAGE_BYTES};

const LISTENER: Token = Token(0);
/// A peer whose unsent control bytes exceed this is disconnected.
pub const MAX_WRITE_BUFFER_BYTES: usize = 16 << 20;

/// Errors that stop the master.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Could not bind or poll.
    #[error("{context}: {source}")]
    Io {
        /// What failed.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

struct Connection {
    stream: TcpStream,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    write_pos: usize,
    closing: bool,
    writable_interest: bool,
}

/// The master: a bound listener plus the coordinator, run by [`Server::run`] on the calling thread.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: CoordinatorConfig,
    spin: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listener (`SO_REUSEADDR`). Port 0 picks a free port; see [`Server::local_addr`].
    pub fn bind(addr: SocketAddr, mut config: CoordinatorConfig) -> Result<Self, ServerError> {
        let std_listener =
            concord_transport::socket::listen(addr, 1024).map_err(|e| ServerError::Io {
                context: format!("starting the master on {addr}"),
                source: io::Error::other(e.to_string()),
            })?;
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("making the listener non-blocking"))?;
        let local_addr = std_listener
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        // Secrets only need to differ between masters and epochs; the OS seeds RandomState.
        config.secret_seed ^= {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(local_addr.port() as u64);
            h.finish()
        };
        Ok(Server {
            listener: TcpListener::from_std(std_listener),
            local_addr,
            config,
            spin: concord_transport::spin::spin_from_env(),
        })
    }

    /// How long the loop polls for the next message after one arrived, before it sleeps (default `CONCORD_SPIN_US`, else 100 us; zero never polls).
    /// A vote completes when the last peer's message arrives, usually microseconds after the
    /// others, and a sleeping thread's wake-up costs tens of microseconds on a virtual machine
    /// (see [`concord_transport::spin`]). An idle master never polls.
    pub fn with_spin(mut self, window: Duration) -> Self {
        self.spin = window;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Runs the event loop until `stop()` returns true (checked at least every `check_every`),
    /// or forever when `check_every` is `None`.
    pub fn run(
        mut self,
        check_every: Option<Duration>,
        stop: impl Fn() -> bool,
    ) -> Result<(), ServerError> {
        let mut poll = Poll::new().map_err(io_err("creating the event loop"))?;
        poll.registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)
            .map_err(io_err("registering the listener"))?;
        let mut events = Events::with_capacity(1024);
        let mut coord = Coordinator::new(self.config.clone());
        let mut conns: HashMap<ConnId, Connection> = HashMap::new();
        let mut next_conn: ConnId = 1;
        tracing::info!(addr = %self.local_addr, "master listening");
        // When the last message arrived: the polling window's start.
        let mut last_message = Instant::now();
        loop {
            if stop() {
                return Ok(());
            }
            let now = Instant::now();
            let deadline = coord
                .poll_timeout()
                .map(|d| d.saturating_duration_since(now));
            let polling = now.saturating_duration_since(last_message) < self.spin;
            let timeout = match (deadline, check_every) {
                _ if polling => Some(Duration::ZERO),
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("waiting for events")(e));
            }
            let now = Instant::now();
            if events.is_empty() {
                if polling {
                    std::thread::yield_now();
                }
            } else {
                last_message = now;
            }
            for event in events.iter() {
                if event.token() == LISTENER {
                    accept_all(
                        &self.listener,
                        &poll,
                        &mut conns,
                        &mut next_conn,
                        &mut coord,
                        now,
                    );
                    continue;
                }
                let id = event.token().0 as ConnId;
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    read_ready(id, &mut conns, &mut coord, now);
                }
                if event.is_writable() {
                    if let Some(c) = conns.get_mut(&id) {
                        if flush(c).is_err() {
                            drop_conn(id, &poll, &mut conns, &mut coord, now);
                        }
                    }
                }
            }
            if coord.poll_timeout().is_some_and(|d| d <= now) {
                coord.handle_timeout(now);
            }
            apply_outputs(&poll, &mut conns, &mut coord, now);
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut HashMap<ConnId, Connection>,
    next_conn: &mut ConnId,
    coord: &mut Coordinator,
    now: Instant,
) {
    loop {
        match listener.accept() {
            Ok((mut stream, remote)) => {
                let id = *next_conn;
                *next_conn += 1;
                let _ = stream.set_nodelay(true);
                // A peer host that vanishes without a FIN is noticed even while idle.
                let _ = concord_transport::socket::set_keepalive(&stream, Duration::from_secs(2));
                let token = Token(id as usize);
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
                    .is_err()
                {
                    continue;
                }
                conns.insert(
                    id,
                    Connection {
                        stream,
                        read_buf: Vec::new(),
                        write_buf: Vec::new(),
                        write_pos: 0,
                        closing: false,
                        writable_interest: false,
                    },
                );
                coord.handle_connect(id, remote.ip(), now);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, for example: keep serving those we have.
                tracing::warn!("accept failed: {e}");
                return;
            }
        }
    }
}

/// Reads everything available, then hands each whole message to the coordinator.
fn read_ready(
    id: ConnId,
    conns: &mut HashMap<ConnId, Connection>,
    coord: &mut Coordinator,
    now: Instant,
) {
    let Some(c) = conns.get_mut(&id) else { return };
    let mut closed = false;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                c.read_buf.extend_from_slice(&chunk[..n]);
                if c.read_buf.len() > 4 * MAX_MESSAGE_BYTES {
                    break; // Parse what we have before reading more; bounds the buffer.
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let mut consumed = 0;
    loop {
        if c.closing {
            break;
        }
        match split_frame(&c.read_buf[consumed..]) {
            Ok(Some((body, used))) => {
                consumed += used;
                match decode_peer(body) {
                    Ok(msg) => coord.handle_message(id, msg, now),
                    Err(ProtoError::Version { theirs, .. }) => {
                        coord.handle_version_mismatch(id, theirs, now);
                        c.closing = true;
                    }
                    Err(e) => {
                        coord.handle_malformed(id, &e.to_string(), now);
                        c.closing = true;
                    }
                }
                // The coordinator may have asked to close this connection.
            }
            Ok(None) => break,
            Err(e) => {
                coord.handle_malformed(id, &e.to_string(), now);
                c.closing = true;
            }
        }
    }
    c.read_buf.drain(..consumed);
    if closed && !c.closing {
        c.closing = true;
        coord.handle_disconnect(id, now);
    }
}

fn apply_outputs(
    poll: &Poll,
    conns: &mut HashMap<ConnId, Connection>,
    coord: &mut Coordinator,
    now: Instant,
) {
    let mut to_drop = Vec::new();
    while let Some(out) = coord.poll_output() {
        match out {
            Output::Send { conn, msg } => {
                let Some(c) = conns.get_mut(&conn) else {
                    continue;
                };
                c.write_buf.extend_from_slice(&encode_master(&msg));
                if c.write_buf.len() - c.write_pos > MAX_WRITE_BUFFER_BYTES {
                    tracing::warn!(
                        "connection {conn} is not reading its messages; disconnecting it"
                    );
                    to_drop.push(conn);
                }
            }
            Output::Close { conn } => {
                if let Some(c) = conns.get_mut(&conn) {
                    c.closing = true;
                    let _ = flush(c);
                    to_drop.push(conn);
                }
            }
        }
    }
    for (id, c) in conns.iter_mut() {
        if c.write_pos < c.write_buf.len() && flush(c).is_err() {
            to_drop.push(*id);
        }
    }
    for id in to_drop {
        drop_conn(id, poll, conns, coord, now);
    }
    // Ask for writability only while bytes wait; otherwise an idle socket would wake us.
    for (id, c) in conns.iter_mut() {
        let want = c.write_pos < c.write_buf.len();
        if want != c.writable_interest {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let _ = poll
                .registry()
                .reregister(&mut c.stream, Token(*id as usize), interest);
            c.writable_interest = want;
        }
    }
}

fn flush(c: &mut Connection) -> io::Result<()> {
    while c.write_pos < c.write_buf.len() {
        match c.stream.write(&c.write_buf[c.write_pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => c.write_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    c.write_buf.clear();
    c.write_pos = 0;
    Ok(())
}

fn drop_conn(
    id: ConnId,
    poll: &Poll,
    conns: &mut HashMap<ConnId, Connection>,
    coord: &mut Coordinator,
    now: Instant,
) {
    if let Some(mut c) = conns.remove(&id) {
        let _ = poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        coord.handle_disconnect(id, now);
    }
}
