//! The communicator: a peer's handle on its group.
//!
//! Threads (a bound that does not grow with the operations in flight): the owner's thread runs
//! the API; `concord-master-rx` blocks on the master connection and feeds each message to the
//! [`crate::protocol::PeerProto`] under a mutex; `concord-watchdog` sleeps until the next
//! deadline; the data plane of the ring in force runs one TX and one RX thread per connection to
//! each neighbour. Nothing polls: an idle communicator is blocked syscalls only.

use std::cell::Cell;
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::{encode_peer, PeerId, PeerMsg, RingMember};
use concord_transport::socket::{connect_with_retry, listen, resolve, SocketOptions};
use concord_transport::{resolve_backend, BackendChoice, BackendKind};

use crate::collective::Traffic;
use crate::core::{flush, read_master, watchdog, Inner};
use crate::dataplane::{DataPlane, RawBuf};
use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::{self, DeviceElement, DeviceOp};
use crate::links::{establish, RingSetup};
use crate::protocol::{PeerProto, SyncPhase, TopoPhase};
use crate::shared_state::{self, SharedState, SyncInfo, SyncStrategy};
use crate::{Element, Error};
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Most collectives in flight at once; launching one more blocks until one completes (with
    /// the new one's deadline running).
    pub max_in_flight: usize,
    /// Peer group: collectives and shared state run among the peers of one group, each group on
    /// its own ring (admission and topology updates are global).
    pub group: u32,
    /// Data-plane backend: `Auto` (io_uring where the kernel and sandbox allow it, else plain
    /// sockets, saying why once), `Uring` or `Socket`. `None`: `CONCORD_TRANSPORT`, else `Auto`.
    pub transport: Option<BackendChoice>,
    /// How long a thread polls before it blocks, on the waits whose answer should be
    /// microseconds away (a vote's answer, the frames of a small collective); zero: never poll.
    /// See [`concord_transport::spin`].
    pub spin: Duration,
}

impl Config {
    fn new(master: String) -> Self {
        Config {
            master,
            data_listen: "0.0.0.0:0".parse().expect("valid"),
            advertise_ip: None,
            conns_per_neighbour: 2,
            sub_chunk_bytes: 512 * 1024,
            socket: SocketOptions::default(),
            connect_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(600),
            topology_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_secs(120),
            max_in_flight: 256,
            transport: None,
            group: 0,
            spin: concord_transport::spin::spin_from_env(),
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
    /// Connections per ring neighbour (default 2, at least 1, at most 64). Sub-chunks go to
    /// whichever connection is free; collectives with fewer than four sub-chunks per ring step
    /// use only the first. The default is measured: on a 2-core host, two connections gave
    /// 15-40 % more busbw than one at 64-256 MiB (three or four no more than two).
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
    /// Deadline of each collective (default 120 s); a call may give its own.
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.config.op_timeout = d;
        self
    }
    /// Peer group (default 0): collectives and shared state run per group.
    pub fn group(mut self, group: u32) -> Self {
        self.config.group = group;
        self
    }
    /// Data-plane backend (default: `CONCORD_TRANSPORT`, else auto).
    pub fn transport(mut self, choice: BackendChoice) -> Self {
        self.config.transport = Some(choice);
        self
    }
    /// How long a thread polls before it blocks where an answer is microseconds away: the
    /// master's answer to a vote, the frames of collectives of at most
    /// [`SPIN_MAX_COLLECTIVE_BYTES`](crate::SPIN_MAX_COLLECTIVE_BYTES) (default
    /// `CONCORD_SPIN_US`, else 100 us; zero never polls). Polling trades a little CPU for
    /// latency: blocking wake-ups cost tens of microseconds each on virtual machines. An idle
    /// communicator never polls. While polling, a caller blocked in a collective of at most
    /// 64 KiB in host memory runs it on its own thread (reads the master and the first ring
    /// connection itself); zero turns that off too.
    pub fn spin(mut self, window: Duration) -> Self {
        self.config.spin = window;
        self
    }
    /// Most collectives in flight at once (default 256, at most 65536).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
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
    /// Ring epoch it ran on ([`Communicator::ring_members`] lists who took part).
    pub epoch: u64,
    /// Bytes this peer sent and received on the ring.
    pub traffic: Traffic,
    /// For device buffers: where this peer's time went, stage by stage.
    pub device: Option<crate::gpu::DeviceStages>,
}

/// Out-of-place buffers must have as many elements (`unit`s) each.
pub(crate) fn check_same_len(src: usize, dst: usize, unit: &str) -> Result<(), Error> {
    if src == dst {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "src has {src} {unit} and dst {dst}: they must match"
    )))
}

/// The untyped entry points' check: `dst_len` bytes (and `src_len`, when out of place) hold
/// whole, equal numbers of `dtype` elements.
fn check_raw(src_len: Option<usize>, dst_len: usize, dtype: DType) -> Result<(), Error> {
    if dst_len.is_multiple_of(dtype.size_bytes()) && src_len.is_none_or(|s| s == dst_len) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "buffers of {} and {dst_len} bytes do not hold whole, equal numbers of {dtype} elements",
        src_len.unwrap_or(dst_len)
    )))
}

/// Tagged buffers, as [`Communicator::all_reduce_many_with_retry`] takes and gives back.
pub type Batch<T> = Vec<(u64, Vec<T>)>;

/// What [`Communicator::all_reduce_many_with_retry`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryReport<T> {
    /// Every collective of the batch, in batch order: tag, reduced buffer, what its successful
    /// attempt did.
    pub results: Vec<(u64, Vec<T>, ReduceInfo)>,
    /// How many times failed collectives were re-run after rebuilding the ring.
    pub retries: usize,
    /// When and how the first attempt failed, if one did.
    pub first_failure: Option<(Instant, Error)>,
}

/// A peer's membership in a Concord group.
///
/// The communicator is `Send` but not `Sync`: one thread owns it. Blocking collectives and
/// topology updates are methods on it; async collectives go through [`Communicator::split`],
/// whose borrow keeps `update_topology` away while any are in flight.
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
    pub(crate) inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("master", &self.inner.config.master)
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
        let backend = resolve_transport(config.transport)?;
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
        concord_transport::socket::set_keepalive(&stream, Duration::from_secs(1))?;
        let read_half = stream.try_clone().map_err(|e| Error::Io(e.to_string()))?;
        let proto = PeerProto::with_group(
            data_port,
            config.advertise_ip.clone().unwrap_or_default(),
            config.group,
        );
        let inner = Arc::new(Inner::new(
            proto, stream, read_half, listener, config, backend,
        ));
        let mut threads = Vec::new();
        let reader_inner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("concord-master-rx".into())
                .spawn(move || read_master(reader_inner))
                .map_err(|e| Error::Io(format!("spawning the master reader: {e}")))?,
        );
        let weak = Arc::downgrade(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("concord-watchdog".into())
                .spawn(move || watchdog(weak))
                .map_err(|e| Error::Io(format!("spawning the watchdog: {e}")))?,
        );
        let comm = Communicator {
            inner,
            threads,
            _not_sync: PhantomData,
        };
        flush(&mut comm.inner.lock());
        // Registered: wait for the group to admit us, then build the ring like any member.
        let deadline = Instant::now() + comm.inner.config.join_timeout;
        comm.finish_topology(deadline, "waiting to be admitted by the group")?;
        Ok(comm)
    }

    /// The data-plane backend this communicator runs on.
    pub fn transport(&self) -> BackendKind {
        self.inner.backend
    }

    /// This peer's id in the group.
    pub fn peer_id(&self) -> PeerId {
        self.inner
            .lock()
            .proto
            .peer_id()
            .expect("connected communicators are registered")
    }

    /// This peer's group.
    pub fn group(&self) -> u32 {
        self.inner.config.group
    }

    /// Accepted peers across all groups.
    pub fn global_world_size(&self) -> usize {
        self.inner.lock().proto.group_info().global_world as usize
    }

    /// Number of peer groups.
    pub fn num_groups(&self) -> usize {
        self.inner.lock().proto.group_info().groups as usize
    }

    /// Size of the largest peer group.
    pub fn largest_group_size(&self) -> usize {
        self.inner.lock().proto.group_info().largest_group as usize
    }

    /// Number of peers in this peer's group (its ring), as of the last topology update.
    pub fn world_size(&self) -> usize {
        self.inner.lock().proto.ring().map_or(0, |r| r.1.len())
    }

    /// This peer's position in the ring in force.
    pub fn rank(&self) -> usize {
        let g = self.inner.lock();
        let me = g.proto.peer_id();
        g.proto
            .ring()
            .and_then(|r| r.1.iter().position(|m| Some(m.peer_id) == me))
            .unwrap_or(0)
    }

    /// Whether peers are waiting to join: a cheap unanimous vote, so that every member gets the
    /// same answer and calls [`Communicator::update_topology`] together. It may run while async
    /// collectives are in flight (see [`PeerProbe`](crate::PeerProbe)).
    pub fn are_new_peers_pending(&self) -> Result<bool, Error> {
        pending_vote(&self.inner)
    }

    /// Startup: admits pending peers (voting with every member) until the group has at least
    /// `min_world` peers, or fails with [`Error::Timeout`] after `timeout`. Returns the world
    /// size reached. Every member that is already in must call it too (the votes are unanimous).
    pub fn wait_for_world(&mut self, min_world: usize, timeout: Duration) -> Result<usize, Error> {
        let deadline = Instant::now() + timeout;
        while self.world_size() < min_world {
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "only {} of {min_world} peers joined within {} ms",
                    self.world_size(),
                    timeout.as_millis()
                )));
            }
            if self.are_new_peers_pending()? {
                self.update_topology()?;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(self.world_size())
    }

    /// Admits pending peers and (re)builds the ring; retries a connection round that a dropped
    /// peer spoiled. Every member must call it (the vote is unanimous). Takes `&mut self`: it
    /// cannot run while async collectives borrow the communicator.
    pub fn update_topology(&mut self) -> Result<(), Error> {
        self.topology_vote(true)
    }

    /// Rebuilds the ring around lost peers without admitting pending ones: what a retry after a
    /// failure needs (a peer admitted in the middle of a re-run would start elsewhere). Every
    /// member must call it. [`Communicator::all_reduce_many_with_retry`] uses it.
    pub fn repair_topology(&mut self) -> Result<(), Error> {
        self.topology_vote(false)
    }

    fn topology_vote(&mut self, admit: bool) -> Result<(), Error> {
        let deadline = Instant::now()
            + self
                .inner
                .config
                .topology_timeout
                .max(self.inner.config.op_timeout);
        {
            let mut g = self.inner.lock();
            g.proto.reset_topology();
            if admit {
                g.proto.start_update_topology()?;
            } else {
                g.proto.start_repair_topology()?;
            }
            flush(&mut g);
        }
        self.finish_topology(deadline, "update_topology: not every member voted")
    }

    /// Drives a topology vote to its end, re-voting after failed connection rounds.
    fn finish_topology(&self, deadline: Instant, what: &str) -> Result<(), Error> {
        const MAX_ROUNDS: usize = 16;
        for _ in 0..MAX_ROUNDS {
            let phase = self
                .inner
                .wait(deadline, what, |s| match s.proto.topology() {
                    TopoPhase::Connect { .. }
                    | TopoPhase::Done { .. }
                    | TopoPhase::Failed { .. } => Some(Ok(s.proto.topology().clone())),
                    _ => None,
                })?;
            tracing::info!(peer = ?self.inner.lock().proto.peer_id(), ?phase, "topology phase");
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
                    let result = self.build_plane(epoch, secret, &ring);
                    tracing::info!(epoch, ok = result.is_ok(), error = ?result.as_ref().err(), "ring connections built");
                    {
                        let mut g = self.inner.lock();
                        match result {
                            Ok(plane) => {
                                g.plane = Some(plane);
                                g.proto.install_ring(epoch, ring);
                                g.proto.connect_finished(epoch, Ok(()));
                            }
                            Err(e) => g.proto.connect_finished(epoch, Err(e)),
                        }
                        flush(&mut g);
                    }
                    let confirmed =
                        self.inner
                            .wait(
                                deadline,
                                "waiting for the ring to be confirmed",
                                |s| match s.proto.topology() {
                                    TopoPhase::Done { .. } => Some(Ok(true)),
                                    TopoPhase::Failed { .. } => Some(Ok(false)),
                                    _ => None,
                                },
                            )?;
                    if confirmed {
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
        let old = {
            let mut g = self.inner.lock();
            g.proto.reset_topology();
            g.proto.start_update_topology()?;
            flush(&mut g);
            g.plane.take()
        };
        drop(old); // Outside the lock: its threads may report to it while stopping.
        Ok(())
    }

    fn build_plane(
        &self,
        epoch: u64,
        secret: u64,
        ring: &[RingMember],
    ) -> Result<DataPlane, String> {
        // Old connections go first: a neighbour must never see two epochs' streams at once.
        let old = self.inner.lock().plane.take();
        drop(old);
        let config = &self.inner.config;
        let inner: &Inner = &self.inner;
        let setup = RingSetup {
            me: self.peer_id(),
            epoch,
            secret,
            ring,
            conns: config.conns_per_neighbour,
            options: config.socket,
            timeout: config.topology_timeout,
            io_timeout: Some(config.op_timeout),
            cancelled: &|| {
                let g = inner.lock();
                g.proto.fatal().is_some()
                    || !matches!(g.proto.topology(), TopoPhase::Connect { epoch: e, .. } if *e == epoch)
            },
        };
        crate::fault::kill_point("connect", None);
        let links = establish(&self.inner.listener, &setup)?;
        let weak = Arc::downgrade(&self.inner);
        let events = Arc::new(move |event| {
            if let Some(inner) = weak.upgrade() {
                inner.on_plane_event(event);
            }
        });
        DataPlane::start(
            links,
            self.inner.backend,
            config.sub_chunk_bytes,
            config.op_timeout,
            Arc::clone(&self.inner.pace),
            events,
        )
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
        check_same_len(src.len(), dst.len(), "elements")?;
        self.blocking(
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            T::DTYPE,
            op,
            tag,
            None,
        )
    }

    /// In-place all-reduce. On failure `buf` holds its original contents again.
    pub fn all_reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        self.blocking(None, bytemuck::cast_slice_mut(buf), T::DTYPE, op, tag, None)
    }

    /// The untyped form, with an optional deadline of its own: `src == None` means in place.
    /// Lengths in bytes.
    pub fn all_reduce_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(<[u8]>::len), dst.len(), dtype)?;
        self.blocking(src, dst, dtype, op, tag, timeout)
    }

    /// Out-of-place all-reduce of GPU memory: `dst = op over all peers of their src`, reduced
    /// on the GPU (see [`crate::gpu`]). Blocks until every peer is done; work the buffers'
    /// owners queued on their streams is waited for on the GPU, not on the host. Needs CUDA:
    /// without it no `CudaSlice` can exist, and [`crate::cuda_status`] says why.
    pub fn all_reduce_device<T: DeviceElement>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_same_len(src.len(), dst.len(), "elements")?;
        let gpu = self.inner.gpu(dst.context())?;
        let s = gpu::device_ptr(&gpu, src).map_err(Error::Cuda)?;
        let d = gpu::device_ptr_mut(&gpu, dst).map_err(Error::Cuda)?;
        let len = std::mem::size_of::<T>() * dst.len();
        self.blocking_device(gpu, Some(s), d, len, T::DTYPE, op, tag)
    }

    /// In-place all-reduce of GPU memory. On failure `buf` holds its original contents again
    /// (restored from a device-side backup).
    pub fn all_reduce_device_in_place<T: DeviceElement>(
        &self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let gpu = self.inner.gpu(buf.context())?;
        let d = gpu::device_ptr_mut(&gpu, buf).map_err(Error::Cuda)?;
        let len = std::mem::size_of::<T>() * buf.len();
        self.blocking_device(gpu, None, d, len, T::DTYPE, op, tag)
    }

    /// The untyped form: `dst` holds `dtype` elements; `src == None` means in place.
    pub fn all_reduce_device_raw(
        &self,
        src: Option<&CudaSlice<u8>>,
        dst: &mut CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(CudaSlice::len), dst.len(), dtype)?;
        let gpu = self.inner.gpu(dst.context())?;
        let s = src
            .map(|s| gpu::device_ptr(&gpu, s))
            .transpose()
            .map_err(Error::Cuda)?;
        let d = gpu::device_ptr_mut(&gpu, dst).map_err(Error::Cuda)?;
        let len = dst.len();
        self.blocking_device(gpu, s, d, len, dtype, op, tag)
    }

    /// **For tests, not for users.** Runs the device-buffer pipeline (mirror, lanes, staging,
    /// backup and restore) against an *emulated* device whose memory is host memory: `dst` (and
    /// `src`; `None` means in place) stand in for device buffers. It lets machines without a
    /// GPU test everything of the device path but the CUDA calls themselves.
    #[doc(hidden)]
    pub fn all_reduce_emulated_device(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(<[u8]>::len), dst.len(), dtype)?;
        let gpu = self.inner.emulated_gpu();
        let s = src.map(|s| s.as_ptr() as u64);
        let len = dst.len();
        self.blocking_device(gpu, s, dst.as_mut_ptr() as u64, len, dtype, op, tag)
    }

    #[allow(clippy::too_many_arguments)]
    fn blocking_device(
        &self,
        gpu: Arc<gpu::Gpu>,
        src: Option<u64>,
        dst: u64,
        len: usize,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let timeout = self.inner.config.op_timeout;
        let device = Arc::new(DeviceOp::new(gpu, src, dst, len, dtype, op).map_err(Error::Cuda)?);
        let mirror = device.mirror();
        // SAFETY: the device buffers are borrowed for this whole call, and the mirror belongs to
        // `device`; the call returns only through `complete`, after the data plane let go.
        unsafe {
            self.inner.launch(
                mirror,
                mirror,
                None,
                Some(Arc::clone(&device)),
                dtype,
                op,
                tag,
                timeout,
            )?
        };
        gpu::conclude(&device, self.inner.complete(tag))
    }

    fn blocking(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let timeout = timeout.unwrap_or(self.inner.config.op_timeout);
        // In place: each range's original is saved to a pooled backup just before the data
        // plane first writes it, and put back if the collective fails.
        let mut backup: Option<Vec<u8>> = src.is_none().then(|| self.inner.take_backup(dst.len()));
        let dst_raw = RawBuf {
            ptr: dst.as_mut_ptr(),
            len: dst.len(),
        };
        let src_raw = src.map_or(dst_raw, |s| RawBuf {
            ptr: s.as_ptr() as *mut u8,
            len: s.len(),
        });
        let backup_raw = backup.as_mut().map(|b| RawBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        });
        // SAFETY: `src`, `dst` and `backup` outlive this call, which returns only through
        // `complete`, after the data plane released them (and restored `dst` on failure).
        unsafe {
            self.inner
                .launch(src_raw, dst_raw, backup_raw, None, dtype, op, tag, timeout)?
        };
        let result = self.inner.complete(tag);
        if let Some(b) = backup {
            self.inner.give_backup(b);
        }
        result
    }

    /// Brings every peer's shared state to the elected content and revision (see
    /// [`crate::SharedState`]): a unanimous vote, then outdated peers pull only their differing
    /// entries, from several up-to-date peers at once, and verify them. Every member must call
    /// it. On success `state.revision` is the elected revision.
    ///
    /// On failure revisions are unchanged; an entry this peer was pulling may hold a mix of old
    /// and new bytes, which the next sync repairs (it is still out of date).
    pub fn sync_shared_state(
        &mut self,
        state: &mut SharedState<'_>,
        strategy: SyncStrategy,
    ) -> Result<SyncInfo, Error> {
        let timeout = self.inner.config.op_timeout;
        let deadline = Instant::now() + timeout;
        let entries = state.describe()?;
        {
            let mut g = self.inner.lock();
            g.proto
                .start_sync(state.revision, strategy.wire(), entries)?;
            flush(&mut g);
        }
        let (revision, secret, pulls) = self.inner.wait(
            deadline,
            "sync_shared_state: not every member voted",
            |s| match s.proto.sync_phase() {
                SyncPhase::Plan {
                    revision,
                    secret,
                    pulls,
                } => Some(Ok((*revision, *secret, pulls.clone()))),
                SyncPhase::Failed(e) => Some(Err(e.clone())),
                _ => None,
            },
        )?;
        // Entries to fetch are written; the others are served, read-only.
        let mut dirty = Vec::new();
        let mut clean = std::collections::HashMap::new();
        for e in state.entries.iter_mut() {
            let crate::shared_state::Entry {
                key,
                data,
                allow_content_inequality,
                ..
            } = e;
            match pulls.iter().find(|p| p.key == *key) {
                Some(pull) => dirty.push((pull, data.get_mut())),
                None if !*allow_content_inequality => {
                    clean.insert(key.as_str(), data.get());
                }
                None => {}
            }
        }
        let entries_pulled = dirty.len();
        let stop = AtomicBool::new(false);
        let inner = &*self.inner;
        let (outcome, bytes_received, bytes_sent) = std::thread::scope(|s| {
            let server =
                s.spawn(|| shared_state::serve(&inner.listener, &clean, secret, revision, &stop));
            let pulled = if dirty.is_empty() {
                Ok(0)
            } else {
                shared_state::pull_all(dirty, secret, revision, timeout)
            };
            let received = *pulled.as_ref().unwrap_or(&0);
            {
                let mut g = inner.lock();
                g.proto.sync_pulled(pulled.map(drop));
                flush(&mut g);
            }
            let outcome = inner.wait(
                deadline,
                "sync_shared_state: waiting for every peer's pulls",
                |s| match s.proto.sync_phase() {
                    SyncPhase::Complete { revision } => Some(Ok(*revision)),
                    SyncPhase::Failed(e) => Some(Err(e.clone())),
                    _ => None,
                },
            );
            stop.store(true, Ordering::Release);
            let sent = server.join().unwrap_or(0);
            (outcome, received, sent)
        });
        let revision = outcome?;
        let pulled: Vec<&str> = pulls.iter().map(|p| p.key.as_str()).collect();
        state.upload(&pulled)?;
        state.revision = revision;
        Ok(SyncInfo {
            revision: state.revision,
            entries_pulled,
            bytes_sent,
            bytes_received,
        })
    }

    /// Ids of the members of the ring of `epoch`, for one of the last 64 rings this peer was in.
    pub fn ring_members(&self, epoch: u64) -> Option<Vec<PeerId>> {
        self.inner.lock().proto.ring_history(epoch)
    }

    /// Ids of the ring's members, in ring order.
    pub fn peer_ids(&self) -> Vec<PeerId> {
        self.inner
            .lock()
            .proto
            .ring()
            .map_or_else(Vec::new, |r| r.1.iter().map(|m| m.peer_id).collect())
    }

    /// Runs a batch of tagged in-place all-reduces with at most `max_in_flight` in flight; when
    /// some fail because the group lost a peer (or hit a deadline), rebuilds the ring with the
    /// survivors and re-runs only those, until all succeed or fewer than two peers remain.
    /// Every survivor must call it with the same batch (the retries are collective too).
    ///
    /// On success every buffer holds the reduction over the peers of its successful attempt; on
    /// failure the buffers come back with their original contents.
    pub fn all_reduce_many_with_retry<T: Element>(
        &mut self,
        batch: Vec<(u64, Vec<T>)>,
        op: ReduceOp,
        max_in_flight: usize,
    ) -> Result<RetryReport<T>, (Batch<T>, Error)> {
        const MAX_ATTEMPTS: usize = 16;
        let order: Vec<u64> = batch.iter().map(|(t, _)| *t).collect();
        let mut todo = batch;
        let mut done = Vec::with_capacity(todo.len());
        let mut report = RetryReport {
            results: Vec::new(),
            retries: 0,
            first_failure: None,
        };
        for _ in 0..MAX_ATTEMPTS {
            let results = {
                let (collectives, _probe) = self.split();
                collectives.all_reduce_many(std::mem::take(&mut todo), op, max_in_flight)
            };
            let mut fatal = None;
            for (tag, (buf, r)) in results {
                match r {
                    Ok(info) => done.push((tag, buf, info)),
                    Err(e) => {
                        report
                            .first_failure
                            .get_or_insert_with(|| (Instant::now(), e.clone()));
                        if !(e.is_retryable() || matches!(e, Error::Timeout(_))) {
                            fatal.get_or_insert(e);
                        }
                        todo.push((tag, buf));
                    }
                }
            }
            if let Some(e) = fatal {
                return Err((give_back(&order, done, todo), e));
            }
            if todo.is_empty() {
                done.sort_by_key(|(t, _, _)| order.iter().position(|o| o == t));
                report.results = done;
                return Ok(report);
            }
            report.retries += 1;
            if let Err(e) = self.repair_topology() {
                return Err((give_back(&order, done, todo), e));
            }
            if self.world_size() < 2 {
                let e = Error::Aborted {
                    tag: todo[0].0,
                    reason: "fewer than two peers remain".into(),
                    lost: Vec::new(),
                };
                return Err((give_back(&order, done, todo), e));
            }
        }
        let e = Error::Timeout(format!(
            "{} collectives still failing after {MAX_ATTEMPTS} attempts",
            todo.len()
        ));
        Err((give_back(&order, done, todo), e))
    }

    /// Splits the communicator for async collectives: a [`Collectives`](crate::Collectives) that may move to
    /// another thread to launch and await them, and a [`PeerProbe`](crate::PeerProbe) that stays on this thread and
    /// may only ask [`PeerProbe::are_new_peers_pending`](crate::PeerProbe::are_new_peers_pending). Both borrow the communicator, so
    /// `update_topology` (which takes `&mut self`) waits until they, and every handle, are gone.
    ///
    /// ```compile_fail
    /// # fn f(comm: &mut concord::Communicator) {
    /// let (collectives, _probe) = comm.split();
    /// comm.update_topology(); // error: the communicator is borrowed while async work is possible
    /// drop(collectives);
    /// # }
    /// ```
    ///
    /// The probe stays on the owner's thread:
    ///
    /// ```compile_fail
    /// # fn f(comm: &mut concord::Communicator) {
    /// let (_collectives, probe) = comm.split();
    /// std::thread::scope(|s| { s.spawn(move || probe.are_new_peers_pending()); });
    /// # }
    /// ```
    ///
    /// and the communicator itself is not shared between threads (it is `Send`, not `Sync`):
    ///
    /// ```compile_fail
    /// # fn f(comm: &concord::Communicator) {
    /// std::thread::scope(|s| { s.spawn(|| comm.world_size()); });
    /// # }
    /// ```
    pub fn split(&mut self) -> (crate::Collectives<'_>, crate::PeerProbe<'_>) {
        (
            crate::Collectives::new(Arc::clone(&self.inner)),
            crate::PeerProbe::new(Arc::clone(&self.inner)),
        )
    }
}

/// Every buffer of a batch that gave up, in batch order: the failed ones hold their inputs
/// again, the successful ones their results (all or nothing holds per collective).
fn give_back<T>(
    order: &[u64],
    done: Vec<(u64, Vec<T>, ReduceInfo)>,
    mut todo: Batch<T>,
) -> Batch<T> {
    todo.extend(done.into_iter().map(|(t, b, _)| (t, b)));
    todo.sort_by_key(|(t, _)| order.iter().position(|o| o == t));
    todo
}

/// The pending-peers vote (shared by the communicator and the probe).
pub(crate) fn pending_vote(inner: &Inner) -> Result<bool, Error> {
    {
        let mut g = inner.lock();
        g.proto.start_pending_query()?;
        flush(&mut g);
    }
    let deadline = Instant::now() + inner.config.op_timeout;
    inner.wait(
        deadline,
        "are_new_peers_pending: not every member asked",
        |s| s.proto.take_pending_answer().map(Ok),
    )
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.inner.begin_shutdown();
        let plane = {
            let mut g = self.inner.lock();
            let _ = std::io::Write::write_all(&mut g.master, &encode_peer(&PeerMsg::Goodbye));
            let _ = g.master.shutdown(Shutdown::Both);
            g.plane.take()
        };
        drop(plane);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Picks the backend once; a fall-back from io_uring is said once per process.
fn resolve_transport(choice: Option<BackendChoice>) -> Result<BackendKind, Error> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let choice = match choice {
        Some(c) => c,
        None => BackendChoice::from_env_or(BackendChoice::Auto).map_err(Error::InvalidArgument)?,
    };
    let (kind, why) = resolve_backend(choice).map_err(Error::InvalidArgument)?;
    if let Some(why) = why {
        SAID.call_once(|| tracing::warn!("io_uring unavailable ({why}); using plain sockets"));
    }
    Ok(kind)
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
    if !(1..=65536).contains(&c.max_in_flight) {
        return Err(Error::InvalidArgument(format!(
            "max_in_flight {} not in 1..=65536",
            c.max_in_flight
        )));
    }
    Ok(())
}
