//! The data plane of one ring epoch: fixed TX/RX threads per connection serving every attempt
//! in flight (see README.md beside this file).
//!
//! Rooms, bottom up: `connection` (one socket or io_uring stream), `links` (opening a ring
//! epoch's connections), `attempt` (one attempt's schedule state, flags and buffers), `shared`
//! (the registry and what every thread shares), `send` (TX), `recv` (RX and driving callers),
//! and this file (the plane's lifecycle). News goes up through [`PlaneEvents`], which the
//! communicator implements.

mod atomics;
mod attempt;
mod connection;
mod link_setup;
pub(crate) mod links;
mod recv;
mod send;
mod shared;
pub(crate) mod shm_links;

pub(crate) use attempt::Attempt;
pub(crate) use recv::Driver;
pub(crate) use send::FirstSends;

use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use concord_transport::{BackendKind, PinnedBuf, PinnedPool};

use crate::collective::Traffic;
use crate::pace::Pace;
use connection::Connection;
use links::Links;
use shared::{Registry, RxConn, Shared, POLL_FIRST};

/// How many finished (tag, seq) pairs are remembered, to drop their leftover frames.
pub(super) const RETIRED_MEMORY: usize = 4096;

/// While the collectives here total at most this many bytes (host memory, one connection),
/// the thread that makes a frame ready (the one that registered the collective, or the one that
/// reduced a sub-chunk) sends it itself on the first connection when that connection is free,
/// instead of handing it to the TX thread, and a caller waiting for a blocking collective may
/// receive on the first connection itself ([`DataPlane::driver`]): on a small machine every
/// hand-off between threads is a scheduling delay of tens of microseconds. The bound keeps such
/// writes from blocking: every frame in flight on a connection then fits in the receiver's
/// initial socket buffer (128 KiB by default on Linux) at once, so no two threads can wait on
/// each other's full buffers.
pub(crate) const INLINE_MAX_TOTAL_BYTES: usize = 64 << 10;

/// What the plane tells its owner.
#[derive(Debug)]
pub(crate) enum PlaneEvent {
    /// An operation finished its part here (or failed).
    Finished {
        /// User tag.
        tag: u64,
        /// Attempt.
        seq: u64,
        /// Bytes moved, or why it failed.
        result: Result<Traffic, String>,
        /// Whether the connections survived the failure (a failed reduction, not a broken link):
        /// the collective can be aborted alone.
        ring_intact: bool,
    },
}

/// Who hears a plane's [`PlaneEvent`]s: the communicator's core, which owns the plane. The plane
/// holds it weakly, so the core may drop the plane while threads still report.
pub(crate) trait PlaneEvents: Send + Sync {
    /// An attempt finished its part here, or failed (a TX or RX thread; no lock held).
    fn on_plane_event(&self, event: PlaneEvent);
}

/// The connections and threads of one ring epoch.
pub(crate) struct DataPlane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    transport: Option<BackendKind>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Takes over the links and starts one TX thread per successor connection and one RX thread
    /// per predecessor connection.
    pub(crate) fn start(
        mut links: Links,
        backend: BackendKind,
        sub_bytes: usize,
        register_timeout: Duration,
        pace: Arc<Pace>,
        events: Weak<dyn PlaneEvents>,
    ) -> Result<Self, String> {
        let mut stoppers = Vec::new();
        let shm = std::mem::take(&mut links.shm);
        // Each connection is TCP (socket or io_uring) unless it was made a shared-memory ring,
        // whose socket then lives on in the ring end as its doorbell.
        let mut next = Vec::new();
        let ends = shm.next.into_iter().chain(std::iter::repeat_with(|| None));
        for (tcp, end) in std::mem::take(&mut links.next).into_iter().zip(ends) {
            let (c, stop) = match end {
                Some(w) => Connection::shm_tx(w),
                None => Connection::new(tcp, backend)?,
            };
            next.push(c);
            stoppers.push(stop);
        }
        let mut prev = Vec::new();
        let ends = shm.prev.into_iter().chain(std::iter::repeat_with(|| None));
        for (tcp, end) in std::mem::take(&mut links.prev).into_iter().zip(ends) {
            let (c, stop) = match end {
                Some(r) => Connection::shm_rx(r),
                None => Connection::new(tcp, backend)?,
            };
            prev.push(c);
            stoppers.push(stop);
        }
        let rx_probes = prev.iter().map(Connection::probe).collect();
        let transport = next.first().map(Connection::kind);
        let rx = prev
            .into_iter()
            .map(|mut stream| {
                let staging = staging_for(&mut stream, sub_bytes);
                Mutex::new(RxConn {
                    stream,
                    staging,
                    pending: None,
                    held: None,
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            tx: next.into_iter().map(Mutex::new).collect(),
            rx,
            rx_probes,
            inline: AtomicBool::new(true),
            aside: Default::default(),
            stoppers,
            next_id: links.next_id,
            prev_id: links.prev_id,
            registry: Mutex::new(Registry::default()),
            registry_cv: Condvar::new(),
            tx_threads: OnceLock::new(),
            failed: AtomicBool::new(false),
            events,
            register_timeout,
            pace,
            widening: crate::affinity::Widening::from_env(),
            small: AtomicU8::new(POLL_FIRST),
        });
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| format!("spawning a data thread: {e}"))
        };
        for i in 0..shared.tx.len() {
            let s = Arc::clone(&shared);
            threads.push(spawn(
                format!("concord-tx-{i}"),
                Box::new(move || send::tx_loop(&s, i)),
            )?);
        }
        let _ = shared
            .tx_threads
            .set(threads.iter().map(|t| t.thread().clone()).collect());
        for i in 0..shared.rx.len() {
            let s = Arc::clone(&shared);
            threads.push(spawn(
                format!("concord-rx-{i}"),
                Box::new(move || recv::rx_loop(&s, i)),
            )?);
        }
        Ok(DataPlane {
            shared,
            threads,
            transport,
        })
    }

    /// Adds an operation. Its first frames go out when the returned [`FirstSends`] is sent,
    /// which the caller does once it no longer holds the communicator's lock (sending may
    /// finish the operation, whose report takes that lock).
    pub(crate) fn register(&self, attempt: Arc<Attempt>) -> Result<FirstSends, String> {
        if attempt.is_empty() {
            self.shared.finish(&attempt, Ok(Traffic::default()));
            return Ok(FirstSends(None));
        }
        {
            let mut r = self.shared.lock();
            if let Some(why) = &r.failure {
                return Err(why.clone());
            }
            r.ops.push(Arc::clone(&attempt));
            r.generation += 1;
            self.shared.update_small(&r);
        }
        self.shared.registry_cv.notify_all();
        Ok(FirstSends(Some((Arc::clone(&self.shared), attempt))))
    }

    /// What the connections to the successor run on (`None`: a ring of one has none).
    pub(crate) fn transport(&self) -> Option<BackendKind> {
        self.transport
    }

    /// What a caller needs to receive on this plane while it waits (see [`Driver`]).
    pub(crate) fn driver(&self) -> Driver {
        self.shared.aside.enter();
        Driver(Arc::clone(&self.shared))
    }

    /// Shuts the connections down without waiting: every thread blocked on them returns, and
    /// fails the plane from its own thread (never the caller's, which may hold the
    /// communicator's lock).
    pub(crate) fn break_links(&self) {
        self.shared.stop_all();
    }

    /// Removes an operation (done or aborted): its later frames are dropped on receipt.
    pub(crate) fn retire(&self, tag: u64, seq: u64) {
        let mut r = self.shared.lock();
        if let Some(i) = r.ops.iter().position(|o| o.tag == tag && o.seq == seq) {
            let attempt = r.ops.swap_remove(i);
            attempt.retire();
            r.generation += 1;
            self.shared.update_small(&r);
        }
        if r.retired.len() == RETIRED_MEMORY {
            r.retired.pop_front();
        }
        r.retired.push_back((tag, seq));
        drop(r);
        // RX threads waiting for a registration learn it is retired. TX threads need no wake-up:
        // a parked one holds no operation, and a busy one skips a retired operation's frames.
        self.shared.registry_cv.notify_all();
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shared.fail("the ring was torn down".into());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The RX staging buffer of one connection: page-locked and registered with io_uring where the
/// limits allow (one buffer per connection, so registration never multiplies against
/// `RLIMIT_MEMLOCK`); otherwise ordinary memory, said once.
fn staging_for(stream: &mut Connection, sub_bytes: usize) -> PinnedBuf {
    static SAID: std::sync::Once = std::sync::Once::new();
    let pool = PinnedPool::new(1, sub_bytes)
        .or_else(|_| {
            PinnedPool::with_config(
                concord_transport::PoolConfig::new(1, sub_bytes).with_lock(false),
            )
        })
        .expect("one staging buffer of at most 64 MiB can be allocated");
    let mut why: Vec<String> = pool
        .degraded_reason()
        .map(str::to_string)
        .into_iter()
        .collect();
    why.extend(stream.register(&pool));
    if !why.is_empty() {
        SAID.call_once(|| {
            tracing::warn!(
                "receive staging degraded, still working: {}",
                why.join("; ")
            )
        });
    }
    pool.acquire()
}
