//! The master's event loop: one thread, one `mio::Poll`, around the [`Coordinator`].
//!
//! Each connection has a bounded read buffer (one maximal message) and a bounded write buffer;
//! a peer that stops reading until its write buffer passes [`MAX_WRITE_BUFFER_BYTES`] is
//! disconnected rather than allowed to grow the master's memory. The loop sleeps in `poll` until
//! a socket is ready or the coordinator's next deadline, so an idle master uses no CPU.
//!
//! A connection ends in one place, `Shell::drop_conn`: it is deregistered, its socket closed
//! and its buffers freed, and the coordinator is told once. Reading a connection reports whether
//! it ended, and every caller that sees it end drops it. The limits on connections are the
//! coordinator's; when the process runs out of descriptors anyway, the listener rests for
//! [`ACCEPT_BACKOFF`] instead of failing `accept` in a loop, and the peers it has are served on.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::coordinator::{ConnId, Coordinator, CoordinatorConfig, Output};
use crate::proto::{decode_peer, encode_master, split_frame, ProtoError};

const LISTENER: Token = Token(0);
/// A peer whose unsent control bytes exceed this is disconnected.
pub const MAX_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Most bytes read from one connection before the others get their turn.
const READ_BUDGET_BYTES: usize = 4 << 20;
/// Buffer capacity a connection keeps between messages; beyond it, a buffer shrinks back.
const KEEP_BUFFER_BYTES: usize = 64 << 10;
/// Most connections accepted before the peers get their turn.
const ACCEPT_BATCH: usize = 256;
/// How long the listener rests after `accept` failed (out of descriptors, for example).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a failing `accept` is logged.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    /// Asked to listen beyond loopback without a run token.
    #[error(
        "refusing to listen on {addr} without a run token: anyone who reaches it could join the \
         run and read its data. Give the master and every peer the same token (--token-file \
         PATH or CONCORD_TOKEN; `openssl rand -hex 32 > token` makes one), listen on \
         127.0.0.1, or pass --insecure on a network you trust"
    )]
    Insecure {
        /// The address asked for.
        addr: SocketAddr,
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
    /// The coordinator asked to close it: nothing more it sends is read.
    closing: bool,
    writable_interest: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

/// How a read of a connection ended.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// Everything available was read.
    Drained,
    /// The read budget ran out with bytes left: read again before sleeping.
    Unfinished,
    /// The peer closed the connection, or it broke: drop it.
    Closed,
}

/// The master: a bound listener plus the coordinator, run by [`Server::run`] on the calling thread.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: CoordinatorConfig,
    spin: Duration,
}

impl Server {
    /// Binds the listener (`SO_REUSEADDR`). Port 0 picks a free port; see [`Server::local_addr`].
    /// Beyond loopback the master needs a run token (`config.token`): without one it refuses to
    /// start ([`ServerError::Insecure`]); see [`Server::bind_insecure`].
    pub fn bind(addr: SocketAddr, config: CoordinatorConfig) -> Result<Self, ServerError> {
        if config.token.is_none() && !addr.ip().is_loopback() {
            return Err(ServerError::Insecure { addr });
        }
        Self::bind_insecure(addr, config)
    }

    /// [`Server::bind`] on any address, with or without a run token: without one, anyone who
    /// reaches the master joins. For networks where every host is trusted.
    pub fn bind_insecure(
        addr: SocketAddr,
        mut config: CoordinatorConfig,
    ) -> Result<Self, ServerError> {
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
        // Salts and challenges must differ between masters and be unpredictable: seed both from
        // the operating system's generator.
        let seed = concord_transport::auth::nonce().map_err(|e| ServerError::Io {
            context: "seeding the master's challenges".into(),
            source: io::Error::other(e.to_string()),
        })?;
        config.nonce_seed = seed;
        let salt = concord_transport::auth::derive_nonce(&seed, 0);
        config.secret_seed ^= u64::from_le_bytes(salt[..8].try_into().expect("8 bytes"));
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
        let poll = Poll::new().map_err(io_err("creating the event loop"))?;
        poll.registry()
            .register(&mut self.listener, LISTENER, Interest::READABLE)
            .map_err(io_err("registering the listener"))?;
        let mut events = Events::with_capacity(1024);
        let mut shell = Shell {
            poll,
            listener: self.listener,
            coord: Coordinator::new(self.config.clone()),
            conns: HashMap::new(),
            next_conn: 1,
            unread: Vec::new(),
            accept: Accept::Ready,
            accept_logged_at: None,
        };
        tracing::info!(
            addr = %self.local_addr,
            token = if self.config.token.is_some() { "required" } else { "none" },
            "master listening"
        );
        // When the last message arrived: the polling window's start.
        let mut last_message = Instant::now();
        loop {
            if stop() {
                return Ok(());
            }
            let now = Instant::now();
            let polling = now.saturating_duration_since(last_message) < self.spin;
            let timeout = if polling || shell.has_work() {
                Some(Duration::ZERO)
            } else {
                let deadline = shell.deadline().map(|d| d.saturating_duration_since(now));
                match (deadline, check_every) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            if let Err(e) = shell.poll.poll(&mut events, timeout) {
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
                    shell.accept_all(now);
                    continue;
                }
                let id = event.token().0 as ConnId;
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                shell.on_event(id, readable, event.is_writable(), now);
            }
            shell.continue_work(now);
            if shell.coord.poll_timeout().is_some_and(|d| d <= now) {
                shell.coord.handle_timeout(now);
            }
            shell.apply_outputs(now);
        }
    }
}

/// Whether the listener may accept.
#[derive(Debug, Clone, Copy)]
enum Accept {
    Ready,
    /// The last batch was full: accept again before sleeping.
    More,
    /// `accept` failed: rest until then.
    Resting(Instant),
}

/// The loop's state: the sockets and the coordinator they feed.
struct Shell {
    poll: Poll,
    listener: TcpListener,
    coord: Coordinator,
    conns: HashMap<ConnId, Connection>,
    next_conn: ConnId,
    /// Connections whose read budget ran out with bytes left (edge-triggered: no new event
    /// comes for them).
    unread: Vec<ConnId>,
    accept: Accept,
    /// When a failing `accept` was last logged.
    accept_logged_at: Option<Instant>,
}

impl Shell {
    /// Whether the loop must come back without sleeping.
    fn has_work(&self) -> bool {
        !self.unread.is_empty() || matches!(self.accept, Accept::More)
    }

    /// The next instant something is due: the coordinator's deadline, the listener's rest.
    fn deadline(&self) -> Option<Instant> {
        let rest = match self.accept {
            Accept::Resting(until) => Some(until),
            _ => None,
        };
        self.coord.poll_timeout().into_iter().chain(rest).min()
    }

    /// Work left from the previous turn: connections with unread bytes, the listener.
    fn continue_work(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.unread) {
            self.on_event(id, true, false, now);
        }
        match self.accept {
            Accept::More => self.accept_all(now),
            Accept::Resting(until) if until <= now => self.accept_all(now),
            _ => {}
        }
    }

    /// A connection is ready: read it, write it, and drop it if either found it ended.
    fn on_event(&mut self, id: ConnId, readable: bool, writable: bool, now: Instant) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut ended = false;
        if readable {
            match read_ready(id, c, &mut self.coord, now) {
                ReadEnd::Drained => {}
                ReadEnd::Unfinished => self.unread.push(id),
                ReadEnd::Closed => ended = true,
            }
        }
        if writable && !ended {
            ended = flush(c).is_err();
            if !ended {
                set_interest(&self.poll, id, c);
            }
        }
        if ended {
            self.drop_conn(id, now);
        }
    }

    /// Accepts up to a batch of connections, resting the listener if `accept` fails.
    fn accept_all(&mut self, now: Instant) {
        if matches!(self.accept, Accept::Resting(until) if now < until) {
            return; // Whatever waits is accepted when the rest ends.
        }
        self.accept = Accept::Ready;
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, remote)) => self.admit(stream, remote, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // That connection is gone before it was accepted; the next may be fine.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of descriptors, for example: keep serving those we have, try again
                    // after a rest (connections wait in the backlog meanwhile).
                    self.accept = Accept::Resting(now + ACCEPT_BACKOFF);
                    let due = self
                        .accept_logged_at
                        .is_none_or(|at| now.saturating_duration_since(at) >= ACCEPT_LOG_INTERVAL);
                    if due {
                        self.accept_logged_at = Some(now);
                        tracing::warn!(
                            "accept failed: {e}; accepting again every {} ms meanwhile (with {} connections open; logged once a minute)",
                            ACCEPT_BACKOFF.as_millis(),
                            self.conns.len()
                        );
                    }
                    return;
                }
            }
        }
        self.accept = Accept::More;
    }

    /// Registers an accepted connection and hands it to the coordinator, which may refuse it
    /// at once (the refusal is sent and the connection dropped before the next accept).
    fn admit(&mut self, mut stream: TcpStream, remote: SocketAddr, now: Instant) {
        let id = self.next_conn;
        self.next_conn += 1;
        let _ = stream.set_nodelay(true);
        // A peer host that vanishes without a FIN is noticed even while idle.
        let _ = concord_transport::socket::set_keepalive(&stream, Duration::from_secs(2));
        let registered =
            self.poll
                .registry()
                .register(&mut stream, Token(id as usize), Interest::READABLE);
        if registered.is_err() {
            return; // Dropping the stream closes it; the coordinator never saw it.
        }
        self.conns.insert(
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
        self.coord.handle_connect(id, remote.ip(), now);
        self.apply_outputs(now);
    }

    /// Applies the coordinator's outputs until none is left (dropping a connection may cause
    /// more), flushing each connection written to.
    fn apply_outputs(&mut self, now: Instant) {
        let mut written: Vec<ConnId> = Vec::new();
        loop {
            let Some(out) = self.coord.poll_output() else {
                if written.is_empty() {
                    return;
                }
                written.sort_unstable();
                written.dedup();
                for id in std::mem::take(&mut written) {
                    self.flush_conn(id, now);
                }
                continue;
            };
            match out {
                Output::Send { conn, msg } => {
                    let Some(c) = self.conns.get_mut(&conn) else {
                        continue;
                    };
                    c.write_buf.extend_from_slice(&encode_master(&msg));
                    if c.write_buf.len() - c.write_pos > MAX_WRITE_BUFFER_BYTES {
                        tracing::warn!(
                            "connection {conn} is not reading its messages; disconnecting it"
                        );
                        self.drop_conn(conn, now);
                    } else {
                        written.push(conn);
                    }
                }
                Output::Close { conn } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.closing = true;
                        let _ = flush(c);
                        self.drop_conn(conn, now);
                    }
                }
            }
        }
    }

    /// Writes what the connection can take now; asks for writability while bytes wait.
    fn flush_conn(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if flush(c).is_err() {
            self.drop_conn(id, now);
        } else {
            set_interest(&self.poll, id, c);
        }
    }

    /// The one way a connection ends: deregistered, closed, its buffers freed, the
    /// coordinator told (once: the connection is gone from `conns` after).
    fn drop_conn(&mut self, id: ConnId, now: Instant) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            drop(c); // Closing the socket sends the FIN: the peer sees the end once it is gone.
            self.coord.handle_disconnect(id, now);
        }
    }
}

/// Reads what is available (up to [`READ_BUDGET_BYTES`]) and hands each whole message to the
/// coordinator as it arrives, so the buffer never holds more than one message and a chunk.
fn read_ready(id: ConnId, c: &mut Connection, coord: &mut Coordinator, now: Instant) -> ReadEnd {
    let mut chunk = [0u8; 16 * 1024];
    let mut budget = READ_BUDGET_BYTES;
    loop {
        if c.closing {
            return ReadEnd::Drained; // The coordinator's close drops it.
        }
        let n = match c.stream.read(&mut chunk) {
            Ok(0) => return ReadEnd::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return ReadEnd::Closed,
        };
        c.read_buf.extend_from_slice(&chunk[..n]);
        deliver(id, c, coord, now);
        budget = budget.saturating_sub(n);
        if budget == 0 {
            return ReadEnd::Unfinished;
        }
    }
}

/// Hands each whole message in the read buffer to the coordinator; bytes that cannot be a
/// message get the connection kicked.
fn deliver(id: ConnId, c: &mut Connection, coord: &mut Coordinator, now: Instant) {
    let mut consumed = 0;
    while !c.closing {
        // Before it is registered a connection may send only small messages (a hello, a
        // proof): a stranger cannot make the master buffer a megabyte per connection.
        let rest = &c.read_buf[consumed..];
        let limit = coord.message_limit(id);
        if let Some(len) = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
        {
            if len as usize + 4 > limit {
                let why = format!(
                    "a message of {} bytes; at most {limit} until the peer is registered",
                    len as usize + 4
                );
                coord.handle_malformed(id, &why, now);
                c.closing = true;
                break;
            }
        }
        match split_frame(rest) {
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
            }
            Ok(None) => break,
            Err(e) => {
                coord.handle_malformed(id, &e.to_string(), now);
                c.closing = true;
            }
        }
    }
    c.read_buf.drain(..consumed);
    // A peer that once sent a large message (a shared-state vote) does not keep its buffer.
    if c.read_buf.capacity() > KEEP_BUFFER_BYTES && c.read_buf.len() <= KEEP_BUFFER_BYTES / 2 {
        c.read_buf.shrink_to(KEEP_BUFFER_BYTES);
    }
}

/// Asks for writability only while bytes wait; otherwise an idle socket would wake us.
fn set_interest(poll: &Poll, id: ConnId, c: &mut Connection) {
    let want = c.write_pos < c.write_buf.len();
    if want != c.writable_interest {
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ = poll
            .registry()
            .reregister(&mut c.stream, Token(id as usize), interest);
        c.writable_interest = want;
    }
}

fn flush(c: &mut Connection) -> io::Result<()> {
    while c.write_pos < c.write_buf.len() {
        match c.stream.write(&c.write_buf[c.write_pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => c.write_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A peer that reads slowly but never catches up must not make the sent prefix
                // accumulate: drop it once it is most of the buffer.
                if c.write_pos > KEEP_BUFFER_BYTES && c.write_pos * 2 > c.write_buf.len() {
                    c.write_buf.drain(..c.write_pos);
                    c.write_pos = 0;
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    c.write_buf.clear();
    c.write_pos = 0;
    if c.write_buf.capacity() > KEEP_BUFFER_BYTES {
        c.write_buf.shrink_to(KEEP_BUFFER_BYTES);
    }
    Ok(())
}
