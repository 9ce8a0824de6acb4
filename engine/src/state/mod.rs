//! Shared state: named tensors plus a revision, kept bit-identical across peers.
//!
//! [`crate::Communicator::sync_shared_state`] hashes every entry (xxHash64, seed 0: simple
//! 64-bit arithmetic, so the same function can run on a GPU later), votes with the hashes, and
//! follows the master's plan: entries it holds in the elected version are served to peers that
//! need them; entries it is missing are pulled in pieces from **every** up-to-date holder at
//! once, a piece cut by a dying holder is fetched again from another, and each pulled entry is
//! verified against the elected hash before the new revision is adopted.
//!
//! Pull wire format, on a fresh connection to the holder's data port: a [`request::PullRequest`]
//! signed with the sync's key (derived from the run token and the master's salt), answered by
//! `status u32` (0: bytes follow) then `len` bytes. One connection carries many requests.

//!
//! Rooms: this file (the entries a user registers, hashes, sync results), `request` (the pull
//! request's codec), `serve` (a holder answering pulls), `pull` (a peer fetching its outdated
//! entries from every holder at once).

mod pull;
pub(crate) mod request;
mod serve;

pub(crate) use pull::pull_all;
pub(crate) use serve::serve;

use concord_kernels::DType;
use concord_master::proto::EntryDesc;

use crate::Element;

/// `"CSP1"`: the first word of every pull request.
pub(super) const PULL_MAGIC: u32 = 0x3150_5343;
/// Bytes fetched per request: small enough to spread one entry over several holders.
pub(super) const PIECE_BYTES: usize = 8 << 20;
/// Most holders one peer pulls from at once.
pub(super) const MAX_SOURCES: usize = 8;
pub(super) const MAX_KEY_BYTES: usize = 4096;

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
