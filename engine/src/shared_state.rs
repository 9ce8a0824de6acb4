//! Shared state: named tensors plus a revision, kept bit-identical across peers.
//!
//! [`crate::Communicator::sync_shared_state`] hashes every entry (xxHash64, seed 0: simple
//! 64-bit arithmetic, so the same function can run on a GPU later), votes with the hashes, and
//! follows the master's plan: entries it holds in the elected version are served to peers that
//! need them; entries it is missing are pulled in pieces from **every** up-to-date holder at
//! once, a piece cut by a dying holder is fetched again from another, and each pulled entry is
//! verified against the elected hash before the new revision is adopted.
//!
//! Pull wire format, on a fresh connection to the holder's data port:
//! request `magic u32 "CSP1" | version u32 | secret u64 | revision u64 | offset u64 | len u64 |
//! key_len u32 | key`; answer `status u32` (0: bytes follow) then `len` bytes. One connection
//! carries many requests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use concord_kernels::DType;
use concord_master::proto::{EntryDesc, Pull};
use concord_transport::socket::{connect_until, resolve, SocketOptions};
use concord_transport::PROTOCOL_VERSION;
use socket2::SockRef;

use crate::Element;

const PULL_MAGIC: u32 = 0x3150_5343;
/// Bytes fetched per request: small enough to spread one entry over several holders.
const PIECE_BYTES: usize = 8 << 20;
/// Most holders one peer pulls from at once.
const MAX_SOURCES: usize = 8;
const MAX_KEY_BYTES: usize = 4096;

/// How a peer takes part in a shared-state sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SyncStrategy {
    /// Adopt the elected content, and serve it (the default).
    #[default]
    EnforcePopular,
    /// Only receive: never chosen as a source. If every peer is receive-only, all are kicked.
    ReceiveOnly,
    /// Only send: a send-only peer whose content is outdated is kicked.
    SendOnly,
}

impl SyncStrategy {
    pub(crate) fn wire(self) -> &'static str {
        match self {
            SyncStrategy::EnforcePopular => "enforce-popular",
            SyncStrategy::ReceiveOnly => "receive-only",
            SyncStrategy::SendOnly => "send-only",
        }
    }
}

/// One named tensor of the shared state, borrowed from the caller.
#[derive(Debug)]
pub struct Entry<'a> {
    pub(crate) key: String,
    pub(crate) dtype: DType,
    pub(crate) data: Bytes<'a>,
    pub(crate) allow_content_inequality: bool,
}

/// Where an entry's bytes live. A device entry is staged through a host copy: downloaded to be
/// hashed and served, and uploaded again only when a sync pulled it and succeeded.
pub(crate) enum Bytes<'a> {
    Host(&'a mut [u8]),
    Device {
        dev: &'a mut dyn crate::gpu::DeviceBytes,
        shadow: Vec<u8>,
    },
}

impl std::fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Host(b) => write!(f, "Host({} bytes)", b.len()),
            Bytes::Device { shadow, .. } => write!(f, "Device({} bytes)", shadow.len()),
        }
    }
}

impl Bytes<'_> {
    pub(crate) fn get(&self) -> &[u8] {
        match self {
            Bytes::Host(b) => b,
            Bytes::Device { shadow, .. } => shadow,
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut [u8] {
        match self {
            Bytes::Host(b) => b,
            Bytes::Device { shadow, .. } => shadow,
        }
    }
}

/// The shared state: named tensors (any dtype, 16-bit types included) and a revision.
///
/// ```no_run
/// # fn f(comm: &mut concord::Communicator) -> Result<(), concord::Error> {
/// let mut weights = vec![0.0f32; 1 << 20];
/// let mut step = vec![0u64; 1];
/// let mut state = concord::SharedState::new(0);
/// state.add("weights", &mut weights).add("step", &mut step);
/// let info = comm.sync_shared_state(&mut state, concord::SyncStrategy::EnforcePopular)?;
/// println!("revision {} ({} bytes received)", info.revision, info.bytes_received);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct SharedState<'a> {
    /// The revision this peer holds; a sync must raise it by exactly one (any value the first
    /// time, to resume from a checkpoint). After a sync it is the elected revision.
    pub revision: u64,
    pub(crate) entries: Vec<Entry<'a>>,
}

impl<'a> SharedState<'a> {
    /// An empty state at `revision`.
    pub fn new(revision: u64) -> Self {
        SharedState {
            revision,
            entries: Vec::new(),
        }
    }

    /// Adds a tensor that every peer must hold bit for bit.
    pub fn add<T: Element>(&mut self, key: impl Into<String>, data: &'a mut [T]) -> &mut Self {
        self.push(key.into(), data, false)
    }

    /// Adds a tensor that may differ between peers by design (never transferred).
    pub fn add_allow_content_inequality<T: Element>(
        &mut self,
        key: impl Into<String>,
        data: &'a mut [T],
    ) -> &mut Self {
        self.push(key.into(), data, true)
    }

    fn push<T: Element>(&mut self, key: String, data: &'a mut [T], allow: bool) -> &mut Self {
        let data: &mut [u8] = bytemuck::cast_slice_mut(data);
        self.entries.push(Entry {
            key,
            dtype: T::DTYPE,
            data: Bytes::Host(data),
            allow_content_inequality: allow,
        });
        self
    }

    /// Adds a tensor in GPU memory that every peer must hold bit for bit. A sync downloads it
    /// (to hash and serve it) and, when it pulled a newer version, uploads that once the sync
    /// succeeded; a failed sync leaves it untouched.
    pub fn add_device<T: crate::DeviceElement>(
        &mut self,
        key: impl Into<String>,
        data: &'a mut crate::gpu::cudarc::driver::CudaSlice<T>,
    ) -> &mut Self {
        self.entries.push(Entry {
            key: key.into(),
            dtype: T::DTYPE,
            data: Bytes::Device {
                dev: data,
                shadow: Vec::new(),
            },
            allow_content_inequality: false,
        });
        self
    }

    /// Copies device entries to their host shadows.
    fn download(&mut self) -> Result<(), crate::Error> {
        for e in &mut self.entries {
            if let Bytes::Device { dev, shadow } = &mut e.data {
                dev.download(shadow).map_err(crate::Error::Cuda)?;
            }
        }
        Ok(())
    }

    /// After a successful sync: uploads the device entries named in `pulled`.
    pub(crate) fn upload(&mut self, pulled: &[&str]) -> Result<(), crate::Error> {
        for e in &mut self.entries {
            if let (Bytes::Device { dev, shadow }, true) =
                (&mut e.data, pulled.contains(&e.key.as_str()))
            {
                dev.upload(shadow).map_err(crate::Error::Cuda)?;
            }
        }
        Ok(())
    }

    /// The vote's entry descriptions, sorted by key, with their hashes.
    pub(crate) fn describe(&mut self) -> Result<Vec<EntryDesc>, crate::Error> {
        self.download()?;
        self.entries.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(w) = self.entries.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(crate::Error::InvalidArgument(format!(
                "shared-state key {:?} added twice",
                w[0].key
            )));
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.key.is_empty() || e.key.len() > MAX_KEY_BYTES)
        {
            return Err(crate::Error::InvalidArgument(format!(
                "shared-state key {:?} must be 1 to {MAX_KEY_BYTES} bytes",
                e.key
            )));
        }
        Ok(self
            .entries
            .iter()
            .map(|e| EntryDesc {
                key: e.key.clone(),
                dtype: e.dtype.name().into(),
                bytes: e.data.get().len() as u64,
                hash: hash(e.data.get()),
                allow_content_inequality: e.allow_content_inequality,
            })
            .collect())
    }
}

/// The hash of an entry's bytes.
pub fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

/// What a sync did on this peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncInfo {
    /// The revision every peer now holds.
    pub revision: u64,
    /// Entries this peer fetched.
    pub entries_pulled: usize,
    /// Bytes this peer served to others.
    pub bytes_sent: u64,
    /// Bytes this peer fetched.
    pub bytes_received: u64,
}

/// Serves clean entries on `listener` until `stop` is set. Returns the bytes served.
pub(crate) fn serve(
    listener: &TcpListener,
    clean: &HashMap<&str, &[u8]>,
    secret: u64,
    revision: u64,
    stop: &AtomicBool,
) -> u64 {
    let served = AtomicU64::new(0);
    std::thread::scope(|s| {
        let mut handlers = 0usize;
        while !stop.load(Ordering::Acquire) {
            let _ = SockRef::from(listener).set_read_timeout(Some(Duration::from_millis(50)));
            let Ok((stream, _)) = listener.accept() else {
                continue;
            };
            if handlers >= 4 * MAX_SOURCES {
                continue; // Bounded: a flood of connections is dropped.
            }
            handlers += 1;
            let served = &served;
            s.spawn(move || {
                if let Err(e) = serve_one(stream, clean, secret, revision, stop, served) {
                    tracing::debug!("shared-state pull connection ended: {e}");
                }
            });
        }
    });
    served.load(Ordering::Relaxed)
}

fn serve_one(
    mut stream: TcpStream,
    clean: &HashMap<&str, &[u8]>,
    secret: u64,
    revision: u64,
    stop: &AtomicBool,
    served: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        let mut head = [0u8; 44];
        match stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                continue; // (No partial header can be lost: requests are written in one piece.)
            }
            Err(e) => return Err(e),
        }
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8"));
        let (magic, version, their_secret, their_rev) =
            (u32_at(0), u32_at(4), u64_at(8), u64_at(16));
        let (offset, len, key_len) = (
            u64_at(24) as usize,
            u64_at(32) as usize,
            u32_at(40) as usize,
        );
        if magic != PULL_MAGIC || version != PROTOCOL_VERSION || key_len > MAX_KEY_BYTES {
            return Err(std::io::Error::other("not a Concord shared-state pull"));
        }
        let mut key = vec![0u8; key_len];
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.read_exact(&mut key)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let data = std::str::from_utf8(&key).ok().and_then(|k| clean.get(k));
        let valid = their_secret == secret && their_rev == revision;
        match data.filter(|d| valid && offset.checked_add(len).is_some_and(|end| end <= d.len())) {
            Some(d) => {
                stream.write_all(&0u32.to_le_bytes())?;
                stream.write_all(&d[offset..offset + len])?;
                served.fetch_add(len as u64, Ordering::Relaxed);
                crate::fault::kill_point("serve", Some(revision));
            }
            None => {
                stream.write_all(&1u32.to_le_bytes())?;
                return Err(std::io::Error::other(
                    "refused a pull (secret, revision, key or range)",
                ));
            }
        }
    }
}

struct Piece<'b> {
    entry: usize,
    offset: usize,
    buf: &'b mut [u8],
    /// The worker that takes it first (spreads the pieces over every holder).
    home: usize,
}

/// The pieces still to fetch, and the entries of those being fetched right now (a worker that
/// could serve one of those must wait: if its holder dies, the piece comes back).
struct Work<'b> {
    queued: Vec<Piece<'b>>,
    in_flight: Vec<usize>,
    /// Per worker: connected and asking for pieces, or finished. Until then (or until
    /// `steal_after`) its home pieces are left to it, so that a worker that connected first does
    /// not take every piece before the other holders' workers are up.
    ready: Vec<bool>,
    steal_after: Instant,
}

/// How long a worker's home pieces wait for it to connect before others may take them (only a
/// holder that is slow to answer, or unreachable, costs this).
const STEAL_GRACE: Duration = Duration::from_secs(1);

/// Pulls every dirty entry from its holders, several at once; verifies the hashes.
/// Returns the bytes received.
pub(crate) fn pull_all(
    mut dirty: Vec<(&Pull, &mut [u8])>,
    secret: u64,
    revision: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let mut sources: Vec<(u64, String)> = Vec::new();
    for (pull, _) in &dirty {
        if pull.sources.is_empty() {
            return Err(format!(
                "no peer holds the elected version of {:?}",
                pull.key
            ));
        }
        for s in &pull.sources {
            if !sources.iter().any(|(id, _)| *id == s.peer_id) && sources.len() < MAX_SOURCES {
                sources.push((s.peer_id, s.data_addr.clone()));
            }
        }
    }
    let keys: Vec<(String, u64, Vec<u64>)> = dirty
        .iter()
        .map(|(p, _)| {
            (
                p.key.clone(),
                p.hash,
                p.sources.iter().map(|s| s.peer_id).collect(),
            )
        })
        .collect();
    // With few holders, two connections each: one TCP stream is bound by one core.
    let streams = if sources.len() < 4 { 2 } else { 1 };
    let workers: Vec<&(u64, String)> = sources
        .iter()
        .flat_map(|s| std::iter::repeat_n(s, streams))
        .collect();
    let mut pieces = Vec::new();
    for (i, (pull, buf)) in dirty.iter_mut().enumerate() {
        // Homes go round the workers whose holder has this entry (anyone's if none of them).
        let servers: Vec<usize> = (0..workers.len())
            .filter(|&k| pull.sources.iter().any(|s| s.peer_id == workers[k].0))
            .collect();
        for (j, chunk) in buf.chunks_mut(PIECE_BYTES).enumerate() {
            let home = if servers.is_empty() {
                usize::MAX
            } else {
                servers[pieces.len() % servers.len()]
            };
            pieces.push(Piece {
                entry: i,
                offset: j * PIECE_BYTES,
                buf: chunk,
                home,
            });
        }
    }
    let work = (
        Mutex::new(Work {
            queued: pieces,
            in_flight: Vec::new(),
            ready: vec![false; workers.len()],
            steal_after: Instant::now() + STEAL_GRACE,
        }),
        Condvar::new(),
    );
    let received = AtomicU64::new(0);
    let deadline = Instant::now() + timeout;
    std::thread::scope(|s| {
        for (w, (id, addr)) in workers.iter().enumerate() {
            let (work, keys, received) = (&work, &keys, &received);
            s.spawn(move || {
                let job = Job {
                    worker: w,
                    id: *id,
                    work,
                    keys,
                    secret,
                    revision,
                    deadline,
                };
                if let Err(e) = pull_from(&job, addr, received) {
                    tracing::info!("stopped pulling shared state from peer {id}: {e}");
                }
                // Done or failed: whatever is still homed here is anyone's.
                job.set_ready();
            });
        }
    });
    let left = work
        .0
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .queued;
    if let Some(p) = left.first() {
        return Err(format!(
            "{} piece(s) of {:?} could not be fetched from any holder",
            left.len(),
            keys[p.entry].0
        ));
    }
    drop(left);
    // Verify what arrived (the pieces, and their borrows of the entries, are gone), on two
    // threads.
    let verify = |entries: &[(&Pull, &mut [u8])]| -> Result<(), String> {
        for (pull, bytes) in entries {
            let got = hash(bytes);
            if got != pull.hash {
                return Err(format!(
                    "shared-state entry {:?} arrived with hash {got:016x}, expected {:016x}",
                    pull.key, pull.hash
                ));
            }
        }
        Ok(())
    };
    let (a, b) = dirty.split_at(dirty.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| verify(a));
        let mine = verify(b);
        other
            .join()
            .unwrap_or_else(|_| Err("hash verification panicked".into()))
            .and(mine)
    })?;
    Ok(received.load(Ordering::Relaxed))
}

/// What one pull worker needs.
struct Job<'a, 'b> {
    worker: usize,
    id: u64,
    work: &'a (Mutex<Work<'b>>, Condvar),
    keys: &'a [(String, u64, Vec<u64>)],
    secret: u64,
    revision: u64,
    deadline: Instant,
}

impl<'b> Job<'_, 'b> {
    fn serves(&self, entry: usize) -> bool {
        self.keys[entry].2.contains(&self.id)
    }

    /// The next piece for this worker: its own first, then any its holder has; waits while a
    /// piece it could serve is in flight elsewhere. `None`: nothing left for it.
    ///
    /// Another worker's home piece is taken only once that worker is up (then it is simply
    /// faster) or after [`STEAL_GRACE`] (its holder may be unreachable).
    fn next(&self) -> Option<Piece<'b>> {
        let (lock, cv) = self.work;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        if !w.ready[self.worker] {
            w.ready[self.worker] = true;
            cv.notify_all();
        }
        loop {
            let now = Instant::now();
            let own = w
                .queued
                .iter()
                .position(|p| p.home == self.worker && self.serves(p.entry));
            let open = |p: &Piece<'_>| {
                p.home == self.worker
                    || w.ready.get(p.home).is_none_or(|r| *r)
                    || now >= w.steal_after
            };
            let any = || {
                w.queued
                    .iter()
                    .position(|p| self.serves(p.entry) && open(p))
            };
            if let Some(i) = own.or_else(any) {
                let piece = w.queued.swap_remove(i);
                w.in_flight.push(piece.entry);
                return Some(piece);
            }
            let waiting_on = self.left_for_me(&w);
            let left = self.deadline.saturating_duration_since(now);
            if !waiting_on || left.is_zero() {
                return None;
            }
            let until_open = w.steal_after.saturating_duration_since(now);
            let wait = if until_open.is_zero() {
                left
            } else {
                left.min(until_open)
            };
            w = cv
                .wait_timeout(w, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether a piece this worker's holder could serve is still queued or in flight.
    fn has_work(&self) -> bool {
        let w = self.work.0.lock().unwrap_or_else(|p| p.into_inner());
        self.left_for_me(&w)
    }

    /// [`Job::has_work`] under the lock already held.
    fn left_for_me(&self, w: &Work<'_>) -> bool {
        w.queued.iter().any(|p| self.serves(p.entry)) || w.in_flight.iter().any(|e| self.serves(*e))
    }

    /// Marks this worker up (or finished), so others may take its home pieces.
    fn set_ready(&self) {
        let (lock, cv) = self.work;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        w.ready[self.worker] = true;
        cv.notify_all();
    }
}

fn pull_from(job: &Job<'_, '_>, addr: &str, received: &AtomicU64) -> Result<(), String> {
    let addr: SocketAddr = resolve(addr).map_err(|e| e.to_string())?;
    let left = job.deadline.saturating_duration_since(Instant::now());
    let mut stream = connect_until(
        addr,
        &SocketOptions::default(),
        left.min(Duration::from_secs(10)),
        "a shared-state holder",
        // A holder that does not answer (it died) is retried only while something is left
        // that it could serve: once the others fetched everything, this worker stops.
        &|| !job.has_work(),
    )
    .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let (lock, cv) = job.work;
    while let Some(mut piece) = job.next() {
        let result = fetch(
            &mut stream,
            &job.keys[piece.entry].0,
            piece.offset,
            &mut *piece.buf,
            job.secret,
            job.revision,
        );
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = w.in_flight.iter().position(|e| *e == piece.entry) {
            w.in_flight.swap_remove(k);
        }
        match result {
            Ok(()) => {
                received.fetch_add(piece.buf.len() as u64, Ordering::Relaxed);
                cv.notify_all();
            }
            Err(e) => {
                // Hand the piece to another holder.
                piece.home = usize::MAX;
                w.queued.push(piece);
                cv.notify_all();
                return Err(e);
            }
        }
    }
    Ok(())
}

fn fetch(
    stream: &mut TcpStream,
    key: &str,
    offset: usize,
    buf: &mut [u8],
    secret: u64,
    revision: u64,
) -> Result<(), String> {
    let mut req = Vec::with_capacity(44 + key.len());
    req.extend_from_slice(&PULL_MAGIC.to_le_bytes());
    req.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    req.extend_from_slice(&secret.to_le_bytes());
    req.extend_from_slice(&revision.to_le_bytes());
    req.extend_from_slice(&(offset as u64).to_le_bytes());
    req.extend_from_slice(&(buf.len() as u64).to_le_bytes());
    req.extend_from_slice(&(key.len() as u32).to_le_bytes());
    req.extend_from_slice(key.as_bytes());
    stream.write_all(&req).map_err(|e| e.to_string())?;
    let mut status = [0u8; 4];
    stream.read_exact(&mut status).map_err(|e| e.to_string())?;
    if u32::from_le_bytes(status) != 0 {
        return Err(format!("the holder refused to serve {key:?}"));
    }
    stream.read_exact(buf).map_err(|e| e.to_string())
}
