//! A communicator's core: its state under one lock, shared by the owner's thread, the master
//! reader, the watchdog and the data plane's reports.
//!
//! Rooms: this file (the state, waits and wake-ups, buffer pools), `launch` (a collective from
//! its vote to its outcome), `complete` (waiting for an outcome, driving small collectives on
//! the caller's thread).

mod complete;
mod launch;

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use concord_master::proto::encode_peer;

use crate::collective::{Spec, Traffic};
use crate::config::Config;
use crate::control::master_in::MasterIn;
use crate::gpu::{DeviceAttempt, Gpu};
use crate::pace::Pace;
use crate::plane::{Attempt, DataPlane, FirstSends};
use crate::protocol::{CollPhase, PeerProto};
use crate::raw_buf::RawBuf;
use crate::Error;

/// A collective launched by this peer, from its vote to its outcome.
#[derive(Debug)]
pub(crate) struct Launch {
    /// What the collective is (kind, root, dtype, op, count), as voted.
    pub(crate) spec: Spec,
    pub(crate) src: RawBuf,
    pub(crate) dst: RawBuf,
    /// In place: where each range's original goes before its first write.
    pub(crate) backup: Option<RawBuf>,
    /// Scratch for partial sums (see [`crate::raw_buf::Bufs::work`]).
    pub(crate) work: Option<RawBuf>,
    /// The peer at the root's ring position when the master let it go (broadcast and reduce).
    pub(crate) root_peer: Option<concord_master::proto::PeerId>,
    /// Device buffers: `src` and `dst` are the device side's pinned mirror.
    pub(crate) device: Option<Arc<DeviceAttempt>>,
    pub(crate) deadline: Instant,
    pub(crate) timeout: Duration,
    /// When this peer asked the master to abort it (deadline passed or user cancel).
    pub(crate) cancelled_at: Option<Instant>,
    /// A broken ring connection failed it here (when, the attempt, why): reported to the master
    /// after [`RING_FAILURE_GRACE`] unless the master's abort came first.
    pub(crate) ring_failure: Option<(Instant, u64, String)>,
    /// (seq, world, epoch, attempt) once the master let it go.
    pub(crate) running: Option<(u64, usize, u64, Arc<Attempt>)>,
    pub(crate) traffic: Traffic,
    /// When it was launched, let go by the master, and finished by the data plane here (for
    /// the debug log of where a collective's time went).
    pub(crate) launched_at: Instant,
    pub(crate) commenced_at: Option<Instant>,
    pub(crate) moved_at: Option<Instant>,
}

impl Launch {
    /// Bytes of the whole buffer (what sizes the collective: an all-gather's output, a
    /// reduce-scatter's input; `dst` alone may be one slot, or empty off a reduce's root).
    pub(crate) fn bytes(&self) -> usize {
        self.spec.count * self.spec.dtype.size_bytes()
    }
}

pub(crate) struct PeerState {
    pub(crate) proto: PeerProto,
    pub(crate) plane: Option<DataPlane>,
    pub(crate) master: TcpStream,
    pub(crate) launched: HashMap<u64, Launch>,
    pub(crate) wakers: Vec<(u64, Waker)>,
    /// When the watchdog wakes next (`None`: only when told): a launch whose deadline is later
    /// need not wake it (a thread wake-up per collective costs on small machines).
    pub(crate) watch_at: Option<Instant>,
    /// First frames of collectives registered under the lock, sent by whoever releases it
    /// (see [`crate::plane::FirstSends`]).
    pub(crate) first_sends: Vec<FirstSends>,
    /// The key of the ring in force (its hellos, and `optimize_topology`'s probes).
    pub(crate) ring_key: Option<concord_transport::auth::EpochKey>,
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<PeerState>,
    pub(crate) cond: Condvar,
    /// The watchdog's own wake-up: new deadlines, cancels, shutdown (not every message).
    pub(crate) watch: Condvar,
    pub(crate) listener: TcpListener,
    pub(crate) config: Config,
    pub(crate) backend: concord_transport::BackendKind,
    /// Whether connections to neighbours on this host may run over shared memory.
    pub(crate) shm: crate::plane::shm_links::ShmUse,
    pub(crate) closing: std::sync::atomic::AtomicBool,
    /// Backups of async in-place inputs, reused so that a collective costs a copy, not an
    /// allocation and its page faults; at most `BACKUP_POOL_BYTES` are kept.
    pub(crate) backups: Mutex<Vec<Vec<u8>>>,
    /// The GPU of the device buffers handed to this communicator, opened at the first one.
    pub(crate) gpu: Mutex<Option<Arc<Gpu>>>,
    /// The emulated device of the tests' hidden entry point.
    pub(crate) emulated: Mutex<Option<Arc<Gpu>>>,
    /// Whether threads waiting on this peer's collectives poll before they block.
    pub(crate) pace: Arc<Pace>,
    /// The master connection's read side (reader thread, or a driving caller).
    pub(crate) master_in: MasterIn,
    /// Bumped by every [`Inner::notify`]: what a polling caller watches.
    pub(crate) notified: std::sync::atomic::AtomicU64,
    /// Edges measured by `optimize_topology`, (from, to), kept for the next call.
    pub(crate) edges: Mutex<
        std::collections::BTreeMap<
            (concord_master::proto::PeerId, concord_master::proto::PeerId),
            crate::topology::probe::Edge,
        >,
    >,
}

/// How long a peer whose ring connection broke waits for the master's abort before it reports
/// the failure itself. A neighbour that died closes its master connection at the same moment as
/// its data connections: the master's abort, which then names the lost peer, is a few
/// milliseconds away, while a report from here would abort the collective without naming it.
/// Only a connection that broke between live peers waits the whole grace.
pub(crate) const RING_FAILURE_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Most bytes of idle in-place backups a communicator keeps for reuse.
const BACKUP_POOL_BYTES: usize = 1 << 30;

impl Inner {
    pub(crate) fn new(
        proto: PeerProto,
        master: TcpStream,
        master_read: TcpStream,
        listener: TcpListener,
        config: Config,
        backend: concord_transport::BackendKind,
        shm: crate::plane::shm_links::ShmUse,
    ) -> Self {
        let pace = Arc::new(Pace::new(config.spin));
        Inner {
            state: Mutex::new(PeerState {
                proto,
                plane: None,
                master,
                launched: HashMap::new(),
                wakers: Vec::new(),
                first_sends: Vec::new(),
                watch_at: None,
                ring_key: None,
            }),
            cond: Condvar::new(),
            watch: Condvar::new(),
            listener,
            config,
            backend,
            shm,
            closing: std::sync::atomic::AtomicBool::new(false),
            backups: Mutex::new(Vec::new()),
            gpu: Mutex::new(None),
            emulated: Mutex::new(None),
            pace,
            master_in: MasterIn::new(master_read),
            notified: Default::default(),
            edges: Mutex::new(Default::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes blocked callers, the watchdog and pending futures.
    pub(crate) fn notify(&self, g: &mut PeerState) {
        self.notified
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        for (_, w) in g.wakers.drain(..) {
            w.wake();
        }
        self.cond.notify_all();
    }

    /// Waits until `f` yields, the master goes away, or `deadline` passes.
    pub(crate) fn wait<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut(&mut PeerState) -> Option<Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut g = self.lock();
        loop {
            if let Some(r) = f(&mut g) {
                return r;
            }
            if let Some(e) = g.proto.fatal() {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(what.to_string()));
            }
            g = self
                .cond
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Registers a waker for `tag` (futures).
    pub(crate) fn register_waker(&self, tag: u64, waker: &Waker) {
        let mut g = self.lock();
        let done = g
            .proto
            .collective(tag)
            .is_none_or(|p| matches!(p, CollPhase::Done | CollPhase::Failed(_)))
            || g.proto.fatal().is_some();
        if done {
            waker.wake_by_ref();
        } else {
            g.wakers.push((tag, waker.clone()));
        }
    }

    /// This peer's (rank, world) on the ring in force; (0, 0) before the first ring.
    pub(crate) fn position(&self) -> (usize, usize) {
        let g = self.lock();
        let me = g.proto.peer_id();
        g.proto.ring().map_or((0, 0), |r| {
            let rank = r.1.iter().position(|m| Some(m.peer_id) == me);
            (rank.unwrap_or(0), r.1.len())
        })
    }

    /// A buffer of exactly `bytes` for an in-place backup or scratch (contents unspecified).
    pub(crate) fn take_backup(&self, bytes: usize) -> Vec<u8> {
        let mut pool = self.backups.lock().unwrap_or_else(|p| p.into_inner());
        match pool.iter().position(|b| b.capacity() >= bytes) {
            Some(i) => {
                let mut b = pool.swap_remove(i);
                b.resize(bytes, 0);
                b
            }
            None => vec![0u8; bytes],
        }
    }

    /// Returns a backup to the pool (dropped if the pool is full).
    pub(crate) fn give_backup(&self, backup: Vec<u8>) {
        let mut pool = self.backups.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + backup.capacity() <= BACKUP_POOL_BYTES {
            pool.push(backup);
        }
    }

    /// The GPU for buffers of `ctx`: opened (kernels compiled) at the first device buffer.
    pub(crate) fn gpu(
        &self,
        ctx: &Arc<crate::gpu::cudarc::driver::CudaContext>,
    ) -> Result<Arc<Gpu>, Error> {
        let mut slot = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gpu) = slot.as_ref() {
            return Ok(Arc::clone(gpu));
        }
        let gpu =
            Arc::new(Gpu::new(Arc::clone(ctx), self.config.sub_chunk_bytes).map_err(Error::Cuda)?);
        tracing::info!("device buffers on {}", gpu.device());
        *slot = Some(Arc::clone(&gpu));
        Ok(gpu)
    }

    /// The emulated device (host memory standing in for GPU memory; tests only).
    pub(crate) fn emulated_gpu(&self) -> Arc<Gpu> {
        let mut slot = self.emulated.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(slot.get_or_insert_with(|| Arc::new(Gpu::emulated(self.config.sub_chunk_bytes))))
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let mut g = self.lock();
        self.notify(&mut g);
        self.watch.notify_all();
    }
}

/// Sends what the protocol queued for the master. A write error means the master is gone.
pub(crate) fn flush(g: &mut PeerState) {
    while let Some(msg) = g.proto.poll_transmit() {
        if let Err(e) = g.master.write_all(&encode_peer(&msg)) {
            // Not the verdict: the master may have said why it closed (a kick, after a stall)
            // in bytes still waiting to be read. Stop sending; the reader thread reads what is
            // left and ends every wait with the master's reason, or the end of the stream.
            tracing::debug!("writing to the master failed ({e}); the reader thread will say why");
            while g.proto.poll_transmit().is_some() {}
            let _ = g.master.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

impl Inner {
    /// The pending-peers vote (shared by the communicator and the probe).
    pub(crate) fn pending_vote(&self) -> Result<bool, Error> {
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
}
