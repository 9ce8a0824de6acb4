//! The communicator: a peer's handle on its group.
//!
//! Threads: the caller's thread runs the API; one reader thread per communicator
//! (`concord-master-rx`) blocks on the master connection and feeds each message to the
//! [`PeerProto`] under a mutex, then wakes waiters through a condition variable. A collective in
//! flight adds one scoped sender thread (`concord-ring-tx`) for its duration. Nothing polls: an
//! idle communicator is three blocked syscalls (master read, nothing else).

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::{
    decode_master, encode_peer, CollectiveDesc, PeerId, PeerMsg, ProtoError, RingMember,
    MAX_MESSAGE_BYTES,
};
use concord_transport::socket::{connect_with_retry, listen, resolve, SocketOptions};

use crate::collective::ring::RingPlan;
use crate::collective::run::{self, Attempt};
use crate::collective::Traffic;
use crate::links::{establish, Links, RingSetup};
use crate::protocol::{CollPhase, Effect, PeerProto, TopoPhase};
use crate::{Element, Error};

/// How a communicator connects and moves data. Every field has a default; see the builder.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The master's address ("host:port").
    pub master: String,
    /// Where this peer accepts data connections (port 0: any free port).
    pub data_listen: SocketAddr,
    /// IP to advertise to the ring instead of the one the master sees.
    pub advertise_ip: Option<String>,
    /// Connections per ring neighbour (sub-chunks are striped over them).
    pub conns_per_neighbour: usize,
    /// Sub-chunk size: the unit of pipelining and of one frame. Smaller overlaps better,
    /// larger costs fewer syscalls.
    pub sub_chunk_bytes: usize,
    /// Socket options of data connections.
    pub socket: SocketOptions,
    /// How long to keep retrying an unreachable master.
    pub connect_timeout: Duration,
    /// How long `connect` waits to be admitted by the group.
    pub join_timeout: Duration,
    /// How long a topology update may take.
    pub topology_timeout: Duration,
    /// How long one collective may take, votes included; also how long a ring neighbour may stay
    /// silent.
    pub op_timeout: Duration,
}

impl Config {
    fn new(master: String) -> Self {
        Config {
            master,
            data_listen: "0.0.0.0:0".parse().expect("valid"),
            advertise_ip: None,
            conns_per_neighbour: 1,
            sub_chunk_bytes: 512 * 1024,
            socket: SocketOptions::default(),
            connect_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(600),
            topology_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_secs(120),
        }
    }
}

/// Builds a [`Communicator`].
#[derive(Debug)]
pub struct CommunicatorBuilder {
    config: Config,
}

impl CommunicatorBuilder {
    /// Where this peer listens for data connections (default `0.0.0.0:0`).
    pub fn data_listen(mut self, addr: SocketAddr) -> Self {
        self.config.data_listen = addr;
        self
    }
    /// IP the ring should dial (default: the address the master sees).
    pub fn advertise_ip(mut self, ip: impl Into<String>) -> Self {
        self.config.advertise_ip = Some(ip.into());
        self
    }
    /// Connections per ring neighbour (default 1, at least 1, at most 64).
    pub fn conns_per_neighbour(mut self, n: usize) -> Self {
        self.config.conns_per_neighbour = n;
        self
    }
    /// Sub-chunk size in bytes (default 512 KiB; 4 KiB to 64 MiB).
    pub fn sub_chunk_bytes(mut self, bytes: usize) -> Self {
        self.config.sub_chunk_bytes = bytes;
        self
    }
    /// `SO_SNDBUF`/`SO_RCVBUF` of data sockets (default: kernel autotuning).
    pub fn socket_buffer_bytes(mut self, bytes: Option<usize>) -> Self {
        self.config.socket.send_buffer_bytes = bytes;
        self.config.socket.recv_buffer_bytes = bytes;
        self
    }
    /// How long to retry an unreachable master (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }
    /// How long `connect` waits for the group to admit this peer (default 600 s).
    pub fn join_timeout(mut self, d: Duration) -> Self {
        self.config.join_timeout = d;
        self
    }
    /// Deadline of each collective (default 120 s).
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.config.op_timeout = d;
        self
    }

    /// Connects to the master, registers, and blocks until the group admits this peer (the first
    /// peer is admitted at once; later ones when the members call
    /// [`Communicator::update_topology`]).
    pub fn connect(self) -> Result<Communicator, Error> {
        Communicator::connect(self.config)
    }
}

/// What one all-reduce did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReduceInfo {
    /// Peers that took part.
    pub world: usize,
    /// Sequence number the master gave the attempt.
    pub seq: u64,
    /// Bytes this peer sent and received on the ring.
    pub traffic: Traffic,
}

struct Shared {
    proto: PeerProto,
    links: Option<Arc<Links>>,
    master: TcpStream,
}

struct Inner {
    state: Mutex<Shared>,
    cond: Condvar,
}

/// A peer's membership in a Concord group.
///
/// ```no_run
/// use concord::{Communicator, ReduceOp};
/// let comm = Communicator::builder("127.0.0.1:48148").connect()?;
/// let grads = vec![1.0f32; 1024];
/// let mut out = vec![0.0f32; 1024];
/// let info = comm.all_reduce(&grads, &mut out, ReduceOp::Sum, 0)?;
/// println!("reduced across {} peers", info.world);
/// # Ok::<(), concord::Error>(())
/// ```
pub struct Communicator {
    inner: Arc<Inner>,
    listener: TcpListener,
    config: Config,
    reader: Option<JoinHandle<()>>,
    scratch: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("master", &self.config.master)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    /// Starts building a communicator for the master at `master` ("host:port").
    pub fn builder(master: impl Into<String>) -> CommunicatorBuilder {
        CommunicatorBuilder {
            config: Config::new(master.into()),
        }
    }

    fn connect(config: Config) -> Result<Self, Error> {
        validate(&config)?;
        let listener =
            listen(config.data_listen, 128).map_err(|e| Error::Io(format!("data port: {e}")))?;
        let data_port = listener
            .local_addr()
            .map_err(|e| Error::Io(e.to_string()))?
            .port();
        let master_addr = resolve(&config.master).map_err(|e| Error::MasterLost(e.to_string()))?;
        let stream = connect_with_retry(
            master_addr,
            &SocketOptions::default(),
            config.connect_timeout,
            "the master",
        )
        .map_err(|e| Error::MasterLost(format!("{e}; is `concord master` running there?")))?;
        let read_half = stream.try_clone().map_err(|e| Error::Io(e.to_string()))?;
        let proto = PeerProto::new(data_port, config.advertise_ip.clone().unwrap_or_default());
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared {
                proto,
                links: None,
                master: stream,
            }),
            cond: Condvar::new(),
        });
        let reader_inner = Arc::clone(&inner);
        let reader = std::thread::Builder::new()
            .name("concord-master-rx".into())
            .spawn(move || read_master(read_half, reader_inner))
            .map_err(|e| Error::Io(format!("spawning the master reader: {e}")))?;
        let comm = Communicator {
            inner,
            listener,
            config,
            reader: Some(reader),
            scratch: Mutex::new(Vec::new()),
        };
        flush(&mut comm.lock());
        // Registered: wait for the group to admit us, then build the ring like any member.
        let deadline = Instant::now() + comm.config.join_timeout;
        comm.finish_topology(deadline, "waiting to be admitted by the group")?;
        Ok(comm)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `f` yields, the master goes away, or `deadline` passes.
    fn wait<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut(&mut Shared) -> Option<Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut guard = self.lock();
        loop {
            if let Some(r) = f(&mut guard) {
                return r;
            }
            if let Some(e) = guard.proto.fatal() {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(what.to_string()));
            }
            guard = self
                .inner
                .cond
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// This peer's id in the group.
    pub fn peer_id(&self) -> PeerId {
        self.lock()
            .proto
            .peer_id()
            .expect("connected communicators are registered")
    }

    /// Number of peers in the ring in force.
    pub fn world_size(&self) -> usize {
        self.lock().proto.ring().map_or(0, |r| r.1.len())
    }

    /// This peer's position in the ring in force.
    pub fn rank(&self) -> usize {
        let g = self.lock();
        let me = g.proto.peer_id();
        g.proto
            .ring()
            .and_then(|r| r.1.iter().position(|m| Some(m.peer_id) == me))
            .unwrap_or(0)
    }

    /// Whether peers are waiting to join: a cheap unanimous vote, so that every member gets the
    /// same answer and calls [`Communicator::update_topology`] together.
    pub fn are_new_peers_pending(&self) -> Result<bool, Error> {
        {
            let mut g = self.lock();
            g.proto.start_pending_query()?;
            flush(&mut g);
        }
        let deadline = Instant::now() + self.config.op_timeout;
        self.wait(
            deadline,
            "are_new_peers_pending: not every member asked",
            |s| s.proto.take_pending_answer().map(Ok),
        )
    }

    /// Admits pending peers and (re)builds the ring; retries a connection round that a dropped
    /// peer spoiled. Every member must call it (the vote is unanimous).
    pub fn update_topology(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.config.topology_timeout.max(self.config.op_timeout);
        {
            let mut g = self.lock();
            g.proto.reset_topology();
            g.proto.start_update_topology()?;
            flush(&mut g);
        }
        self.finish_topology(deadline, "update_topology: not every member voted")
    }

    /// Drives a topology vote to its end, re-voting after failed connection rounds.
    fn finish_topology(&self, deadline: Instant, what: &str) -> Result<(), Error> {
        const MAX_ROUNDS: usize = 16;
        for _ in 0..MAX_ROUNDS {
            let phase = self.wait(deadline, what, |s| match s.proto.topology() {
                TopoPhase::Connect { .. } | TopoPhase::Done { .. } | TopoPhase::Failed { .. } => {
                    Some(Ok(s.proto.topology().clone()))
                }
                _ => None,
            })?;
            match phase {
                TopoPhase::Done { .. } => return Ok(()),
                TopoPhase::Failed { reason } => {
                    tracing::info!("connection round failed ({reason}); voting again");
                    self.revote()?;
                }
                TopoPhase::Connect {
                    epoch,
                    secret,
                    ring,
                } => {
                    let result = self.build_links(epoch, secret, &ring);
                    {
                        let mut g = self.lock();
                        match result {
                            Ok(links) => {
                                g.links = Some(Arc::new(links));
                                g.proto.install_ring(epoch, ring);
                                g.proto.connect_finished(epoch, Ok(()));
                            }
                            Err(e) => {
                                g.links = None;
                                g.proto.connect_finished(epoch, Err(e));
                            }
                        }
                        flush(&mut g);
                    }
                    let outcome = self.wait(
                        deadline,
                        "waiting for the ring to be confirmed",
                        |s| match s.proto.topology() {
                            TopoPhase::Done { .. } => Some(Ok(true)),
                            TopoPhase::Failed { .. } => Some(Ok(false)),
                            _ => None,
                        },
                    )?;
                    if outcome {
                        return Ok(());
                    }
                    self.revote()?;
                }
                _ => unreachable!("filtered by the wait"),
            }
        }
        Err(Error::Timeout(format!(
            "the ring could not be built in {MAX_ROUNDS} rounds"
        )))
    }

    fn revote(&self) -> Result<(), Error> {
        let mut g = self.lock();
        g.links = None;
        g.proto.reset_topology();
        g.proto.start_update_topology()?;
        flush(&mut g);
        Ok(())
    }

    fn build_links(&self, epoch: u64, secret: u64, ring: &[RingMember]) -> Result<Links, String> {
        // Old connections go first: a neighbour must never see two epochs' streams at once.
        self.lock().links = None;
        let setup = RingSetup {
            me: self.peer_id(),
            epoch,
            secret,
            ring,
            conns: self.config.conns_per_neighbour,
            options: self.config.socket,
            timeout: self.config.topology_timeout,
            io_timeout: Some(self.config.op_timeout),
        };
        establish(&self.listener, &setup)
    }

    /// Out-of-place all-reduce: `dst = op over all peers of their src`. Blocks until every peer
    /// is done. `tag` tells concurrent collectives apart (unique among those in flight).
    pub fn all_reduce<T: Element>(
        &self,
        src: &[T],
        dst: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        if src.len() != dst.len() {
            return Err(Error::InvalidArgument(format!(
                "src has {} elements and dst {}: they must match",
                src.len(),
                dst.len()
            )));
        }
        self.reduce_bytes(
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            T::DTYPE,
            op,
            tag,
        )
    }

    /// In-place all-reduce. On failure `buf` holds its original contents again.
    pub fn all_reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        self.reduce_bytes(None, bytemuck::cast_slice_mut(buf), T::DTYPE, op, tag)
    }

    /// The untyped form: `src == None` means in place. Lengths in bytes.
    pub fn all_reduce_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        if dst.len() % dtype.size_bytes() != 0 || src.is_some_and(|s| s.len() != dst.len()) {
            return Err(Error::InvalidArgument(format!(
                "buffers of {} and {} bytes do not hold whole, equal numbers of {dtype} elements",
                src.map_or(dst.len(), <[u8]>::len),
                dst.len()
            )));
        }
        self.reduce_bytes(src, dst, dtype, op, tag)
    }

    fn reduce_bytes(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let deadline = Instant::now() + self.config.op_timeout;
        let count = dst.len() / dtype.size_bytes();
        let desc = CollectiveDesc {
            count: count as u64,
            dtype: dtype.name().into(),
            op: op.name().into(),
        };
        {
            let mut g = self.lock();
            g.proto.start_collective(tag, desc)?;
            flush(&mut g);
        }
        let what = format!("all_reduce(tag {tag}): not every peer started it");
        let started = self.wait(deadline, &what, |s| match s.proto.collective(tag) {
            Some(CollPhase::Run { seq }) => {
                let ring = s.proto.ring().expect("a collective runs on a ring");
                let me = s.proto.peer_id();
                let rank = ring
                    .1
                    .iter()
                    .position(|m| Some(m.peer_id) == me)
                    .expect("member");
                Some(Ok((*seq, ring.1.len(), rank, s.links.clone())))
            }
            Some(CollPhase::Failed(_)) => Some(Err(s
                .proto
                .take_collective(tag)
                .expect("failed")
                .unwrap_err())),
            _ => None,
        });
        let (seq, world, rank, links) = match started {
            Ok(x) => x,
            Err(e) => {
                self.forget(tag);
                return Err(e);
            }
        };
        let plan = RingPlan::new(
            world,
            rank,
            count,
            dtype.size_bytes(),
            self.config.sub_chunk_bytes,
        );
        let attempt = Attempt {
            tag,
            seq,
            dtype,
            op,
        };
        let mut backup = None;
        let result = {
            let mut staging = self.take_scratch(self.config.sub_chunk_bytes);
            let r = match (src, &links) {
                (_, None) if world > 1 => Err("this peer has no ring connections".to_string()),
                (Some(src), links) => {
                    run_on(links.as_deref(), &plan, attempt, src, dst, &mut staging)
                }
                (None, links) => {
                    // In place: keep the original to reduce from and to restore on failure.
                    let mut copy = self.take_scratch(dst.len());
                    copy[..dst.len()].copy_from_slice(dst);
                    let r = run_on(
                        links.as_deref(),
                        &plan,
                        attempt,
                        &copy[..dst.len()],
                        dst,
                        &mut staging,
                    );
                    backup = Some(copy);
                    r
                }
            };
            self.give_scratch(staging);
            r
        };
        {
            let mut g = self.lock();
            g.proto.collective_finished(
                tag,
                seq,
                result.as_ref().map(|_| ()).map_err(Clone::clone),
            );
            flush(&mut g);
        }
        let done = self.wait(
            deadline,
            &format!("all_reduce(tag {tag}): waiting for every peer to complete"),
            |s| s.proto.take_collective(tag),
        );
        if done.is_err() {
            self.forget(tag);
            if let Some(b) = &backup {
                dst.copy_from_slice(&b[..dst.len()]);
            }
        }
        if let Some(b) = backup {
            self.give_scratch(b);
        }
        done?;
        let traffic = result.map_err(|e| {
            Error::Protocol(format!(
                "the master completed a collective this peer failed: {e}"
            ))
        })?;
        Ok(ReduceInfo {
            world,
            seq,
            traffic,
        })
    }

    /// Drops a failed tag's state so the tag can be used again.
    fn forget(&self, tag: u64) {
        let mut g = self.lock();
        let _ = g.proto.take_collective(tag);
    }

    fn take_scratch(&self, bytes: usize) -> Vec<u8> {
        let mut pool = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = match pool.iter().position(|v| v.capacity() >= bytes) {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(bytes),
        };
        v.resize(bytes, 0);
        v
    }

    fn give_scratch(&self, v: Vec<u8>) {
        let mut pool = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 4 {
            pool.push(v);
        }
    }
}

fn run_on(
    links: Option<&Links>,
    plan: &RingPlan,
    attempt: Attempt,
    src: &[u8],
    dst: &mut [u8],
    staging: &mut [u8],
) -> Result<Traffic, String> {
    match links {
        Some(l) => run::run(l, plan, attempt, src, dst, staging),
        None => {
            let empty = Links {
                next: Vec::new(),
                prev: Vec::new(),
                next_id: 0,
                prev_id: 0,
            };
            run::run(&empty, plan, attempt, src, dst, staging)
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        {
            let mut g = self.lock();
            let bye = encode_peer(&PeerMsg::Goodbye);
            let _ = g.master.write_all(&bye);
            let _ = g.master.shutdown(Shutdown::Both);
            g.links = None;
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn validate(c: &Config) -> Result<(), Error> {
    if !(1..=64).contains(&c.conns_per_neighbour) {
        return Err(Error::InvalidArgument(format!(
            "conns_per_neighbour {} not in 1..=64",
            c.conns_per_neighbour
        )));
    }
    if !(4096..=(64 << 20)).contains(&c.sub_chunk_bytes) {
        return Err(Error::InvalidArgument(format!(
            "sub_chunk_bytes {} not in 4 KiB..=64 MiB",
            c.sub_chunk_bytes
        )));
    }
    Ok(())
}

/// Sends what the protocol queued for the master. A write error means the master is gone.
fn flush(g: &mut Shared) {
    while let Some(msg) = g.proto.poll_transmit() {
        if let Err(e) = g.master.write_all(&encode_peer(&msg)) {
            let effects = g
                .proto
                .master_lost(Error::MasterLost(format!("writing to the master: {e}")));
            apply(g, effects);
            return;
        }
    }
}

fn apply(g: &mut Shared, effects: Vec<Effect>) {
    for Effect::AbortRing { .. } in effects {
        if let Some(l) = &g.links {
            l.shutdown();
        }
        g.links = None;
    }
}

/// The reader thread: master messages into the protocol, until the connection ends.
fn read_master(stream: TcpStream, inner: Arc<Inner>) {
    let mut reader = BufReader::new(stream);
    let error = loop {
        match read_message(&mut reader) {
            Ok(msg) => {
                let mut g = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                match g.proto.handle(msg) {
                    Ok(effects) => apply(&mut g, effects),
                    Err(e) => break e,
                }
                flush(&mut g);
                drop(g);
                inner.cond.notify_all();
            }
            Err(e) => break e,
        }
    };
    let mut g = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    let effects = g.proto.master_lost(error);
    apply(&mut g, effects);
    drop(g);
    inner.cond.notify_all();
}

fn read_message(r: &mut impl Read) -> Result<concord_master::proto::MasterMsg, Error> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::MasterLost("the master closed the connection".into())
        }
        _ => Error::MasterLost(format!("reading from the master: {e}")),
    })?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE_BYTES {
        return Err(Error::Protocol(format!(
            "the master sent a message of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| Error::MasterLost(format!("reading from the master: {e}")))?;
    decode_master(&body).map_err(|e| match e {
        ProtoError::Version { ours, theirs } => Error::VersionMismatch { ours, theirs },
        other => Error::Protocol(other.to_string()),
    })
}
