//! A bounded pool of page-aligned, page-locked (pinned) staging buffers, allocated once.
//!
//! The pool maps `buffers x buffer_bytes` of anonymous memory at start and tries to `mlock(2)` it,
//! so that the kernel (io_uring fixed buffers) and later a GPU driver (`cudaHostRegister`) can DMA
//! into it without faulting. An ordinary user is bounded by `RLIMIT_MEMLOCK` (`ulimit -l`, often
//! 8 MiB, sometimes 64 KiB): when `mlock` is refused the pool halves its buffer count down to
//! [`PoolConfig::min_buffers`] and retries, and if even that is refused it keeps the full count
//! **unlocked**. Either way it records a message ([`PinnedPool::degraded_reason`]) for the caller
//! to print once; the pool always works.
//!
//! Buffers are lent out as [`PinnedBuf`] guards, which return themselves to the pool when dropped.
//! The pool is bounded: [`PinnedPool::acquire`] blocks while every buffer is out,
//! [`PinnedPool::try_acquire`] does not, [`PinnedPool::acquire_timeout`] bounds the wait.
//!
//! ```
//! use concord_transport::buffers::PinnedPool;
//! let pool = PinnedPool::new(4, 64 * 1024).unwrap();
//! if let Some(why) = pool.degraded_reason() {
//!     eprintln!("note: {why}");
//! }
//! let mut buf = pool.acquire();
//! buf[..5].copy_from_slice(b"hello");
//! assert_eq!(buf.len(), 64 * 1024);
//! drop(buf); // back in the pool
//! assert_eq!(pool.available(), pool.buffers());
//! ```

use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest pool the constructor accepts, in bytes (a bound, not a target).
pub const MAX_POOL_BYTES: usize = 64 << 30;

/// How to build a [`PinnedPool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Buffers wanted. Each costs `buffer_bytes` of memory for the life of the pool, locked
    /// memory (counted against `RLIMIT_MEMLOCK`) when locking succeeds.
    pub buffers: usize,
    /// Usable bytes per buffer; each buffer starts on a page boundary (the stride is rounded up to
    /// whole pages).
    pub buffer_bytes: usize,
    /// Fewest buffers the pool may shrink to while looking for a count that `mlock` accepts.
    /// Below that it keeps `buffers` unlocked buffers instead.
    pub min_buffers: usize,
    /// Try to lock the memory at all. `false` gives plain (pageable) page-aligned buffers and no
    /// degraded message.
    pub lock: bool,
}

impl PoolConfig {
    /// `buffers` buffers of `buffer_bytes`, locked if the limits allow, shrinking down to one.
    pub fn new(buffers: usize, buffer_bytes: usize) -> Self {
        PoolConfig {
            buffers,
            buffer_bytes,
            min_buffers: 1,
            lock: true,
        }
    }

    /// Sets [`PoolConfig::min_buffers`].
    pub fn with_min_buffers(mut self, min_buffers: usize) -> Self {
        self.min_buffers = min_buffers;
        self
    }

    /// Sets [`PoolConfig::lock`].
    pub fn with_lock(mut self, lock: bool) -> Self {
        self.lock = lock;
        self
    }
}

/// A fixed set of page-aligned staging buffers, locked in memory when the limits allow.
/// Cloning is cheap and shares the same buffers.
#[derive(Clone)]
pub struct PinnedPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Start of the mapping; `stride_bytes * buffers` bytes long.
    base: NonNull<u8>,
    stride_bytes: usize,
    buffer_bytes: usize,
    buffers: usize,
    requested: usize,
    locked: bool,
    degraded: Option<String>,
    /// Indices of the buffers not lent out. Never longer than `buffers`.
    free: Mutex<Vec<usize>>,
    returned: Condvar,
    id: u64,
}

// SAFETY: the mapping is owned by the pool and freed only in `Drop`. Buffer contents are reached
// through a `PinnedBuf`, and the free list guarantees at most one `PinnedBuf` per index, so no two
// threads access one buffer at once; the rest of the state is immutable or under the mutex.
unsafe impl Send for PoolInner {}
// SAFETY: as above; `&PoolInner` gives no access to buffer contents.
unsafe impl Sync for PoolInner {}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

impl PinnedPool {
    /// `buffers` buffers of `buffer_bytes` with the default policy (see [`PoolConfig::new`]).
    pub fn new(buffers: usize, buffer_bytes: usize) -> io::Result<PinnedPool> {
        PinnedPool::with_config(PoolConfig::new(buffers, buffer_bytes))
    }

    /// Maps the memory, pre-faults it, and tries to lock it (see the module docs for the fallback).
    /// Fails only when the configuration is invalid or the memory cannot be mapped at all.
    pub fn with_config(config: PoolConfig) -> io::Result<PinnedPool> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if config.buffers == 0 || config.buffer_bytes == 0 {
            return Err(invalid(format!(
                "a staging pool needs at least one buffer of at least one byte, not {} x {} B",
                config.buffers, config.buffer_bytes
            )));
        }
        let page = page_bytes();
        let stride_bytes = config
            .buffer_bytes
            .checked_next_multiple_of(page)
            .ok_or_else(|| invalid("staging buffer size overflows".into()))?;
        let map_bytes = stride_bytes
            .checked_mul(config.buffers)
            .filter(|&b| b <= MAX_POOL_BYTES)
            .ok_or_else(|| {
                invalid(format!(
                    "a staging pool of {} x {} B is over the {MAX_POOL_BYTES} B limit",
                    config.buffers, config.buffer_bytes
                ))
            })?;
        let base = map_anonymous(map_bytes)?;
        let min_buffers = config.min_buffers.clamp(1, config.buffers);
        let (buffers, locked, degraded) = if config.lock {
            lock_some(base, stride_bytes, config.buffers, min_buffers)
        } else {
            (config.buffers, false, None)
        };
        if buffers < config.buffers {
            // SAFETY: the tail lies inside the mapping made above, past the buffers we keep, and
            // nothing points into it yet.
            let tail = unsafe { base.as_ptr().add(buffers * stride_bytes) };
            // SAFETY: `tail` is page aligned (stride is whole pages) and the range is ours.
            let rc =
                unsafe { libc::munmap(tail.cast(), (config.buffers - buffers) * stride_bytes) };
            debug_assert_eq!(rc, 0, "munmap of the pool's tail");
        }
        Ok(PinnedPool {
            inner: Arc::new(PoolInner {
                base,
                stride_bytes,
                buffer_bytes: config.buffer_bytes,
                buffers,
                requested: config.buffers,
                locked,
                degraded,
                free: Mutex::new((0..buffers).rev().collect()),
                returned: Condvar::new(),
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            }),
        })
    }

    /// Buffers the pool holds (may be fewer than requested, see [`PinnedPool::degraded_reason`]).
    pub fn buffers(&self) -> usize {
        self.inner.buffers
    }

    /// Buffers that were requested.
    pub fn requested_buffers(&self) -> usize {
        self.inner.requested
    }

    /// Usable bytes of each buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.inner.buffer_bytes
    }

    /// Whether the memory is locked (`mlock` succeeded for every buffer the pool holds).
    pub fn is_locked(&self) -> bool {
        self.inner.locked
    }

    /// Why the pool holds fewer buffers than requested, or holds them unlocked; `None` when it
    /// got what was asked. Meant to be printed once.
    pub fn degraded_reason(&self) -> Option<&str> {
        self.inner.degraded.as_deref()
    }

    /// Buffers not lent out right now.
    pub fn available(&self) -> usize {
        self.inner.free_list().len()
    }

    /// Takes a buffer, blocking while all are lent out.
    pub fn acquire(&self) -> PinnedBuf {
        let mut free = self.inner.free_list();
        loop {
            if let Some(index) = free.pop() {
                return self.lend(index);
            }
            free = self
                .inner
                .returned
                .wait(free)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes a buffer, waiting at most `timeout` for one to come back.
    pub fn acquire_timeout(&self, timeout: Duration) -> Option<PinnedBuf> {
        let deadline = Instant::now() + timeout;
        let mut free = self.inner.free_list();
        loop {
            if let Some(index) = free.pop() {
                return Some(self.lend(index));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            free = self
                .inner
                .returned
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Takes a buffer if one is free.
    pub fn try_acquire(&self) -> Option<PinnedBuf> {
        let index = self.inner.free_list().pop()?;
        Some(self.lend(index))
    }

    /// The whole mapping: `(start, bytes)`, page aligned, `buffers() * stride` long, buffer `i`
    /// starting at `start + i * stride` with stride the buffer size rounded up to whole pages.
    ///
    /// This is the hook for registering the same memory elsewhere, e.g. with CUDA
    /// (`cudaHostRegister(start, bytes, cudaHostRegisterDefault)`) so device copies go straight
    /// to or from the staging buffers.
    ///
    /// # Safety
    /// The pointer is valid only while a clone of this pool lives; whoever registers it must
    /// unregister it before the last clone is dropped. Reading or writing through it races with
    /// the holder of a [`PinnedBuf`] over the same range unless the caller orders the accesses
    /// (e.g. the DMA is issued by the buffer's holder). The mapping must not be unmapped,
    /// remapped or unlocked through the pointer.
    pub unsafe fn raw_region(&self) -> (*mut u8, usize) {
        (
            self.inner.base.as_ptr(),
            self.inner.stride_bytes * self.inner.buffers,
        )
    }

    /// Identity of the pool (shared by its clones), to match buffers against registrations.
    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// One `iovec` per buffer, in index order, for registering the pool as io_uring fixed buffers.
    #[cfg(target_os = "linux")]
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.inner.buffers)
            .map(|i| libc::iovec {
                iov_base: self.inner.buffer_ptr(i).cast(),
                iov_len: self.inner.buffer_bytes,
            })
            .collect()
    }

    fn lend(&self, index: usize) -> PinnedBuf {
        debug_assert!(index < self.inner.buffers);
        PinnedBuf {
            pool: Arc::clone(&self.inner),
            index,
        }
    }
}

impl fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedPool")
            .field("buffers", &self.inner.buffers)
            .field("requested", &self.inner.requested)
            .field("buffer_bytes", &self.inner.buffer_bytes)
            .field("locked", &self.inner.locked)
            .field("available", &self.available())
            .field("degraded", &self.inner.degraded)
            .finish()
    }
}

impl PoolInner {
    fn free_list(&self) -> MutexGuard<'_, Vec<usize>> {
        // A panic while holding the lock cannot leave the Vec half-updated (push/pop only).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn buffer_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.buffers, "buffer {index} of {}", self.buffers);
        // SAFETY: `index < buffers`, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(index * self.stride_bytes) }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Every PinnedBuf holds an Arc to us, so none is alive; a registration that holds a pool
        // clone (UringStream) is gone too. munmap also drops the lock.
        // SAFETY: the mapping was made in `with_config` with this length (tail already unmapped).
        let rc =
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.stride_bytes * self.buffers) };
        debug_assert_eq!(rc, 0, "munmap of the staging pool");
    }
}

/// One buffer lent out by a [`PinnedPool`]; goes back to the pool when dropped. Dereferences to
/// its `buffer_bytes` bytes (contents are whatever the previous holder left).
pub struct PinnedBuf {
    pool: Arc<PoolInner>,
    index: usize,
}

impl PinnedBuf {
    /// Index of this buffer in its pool (its io_uring fixed-buffer index when registered).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Identity of the pool this buffer belongs to.
    pub(crate) fn pool_id(&self) -> u64 {
        self.pool.id
    }
}

impl Deref for PinnedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the live mapping (the Arc keeps it) and this guard is the
        // only one for `index` (free list), so nobody writes it while `&self` is borrowed.
        unsafe {
            std::slice::from_raw_parts(self.pool.buffer_ptr(self.index), self.pool.buffer_bytes)
        }
    }
}

impl DerefMut for PinnedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access.
        unsafe {
            std::slice::from_raw_parts_mut(self.pool.buffer_ptr(self.index), self.pool.buffer_bytes)
        }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let mut free = self.pool.free_list();
        debug_assert!(free.len() < self.pool.buffers && !free.contains(&self.index));
        free.push(self.index);
        drop(free);
        self.pool.returned.notify_one();
    }
}

impl fmt::Debug for PinnedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBuf")
            .field("index", &self.index)
            .field("bytes", &self.pool.buffer_bytes)
            .finish()
    }
}

fn page_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

/// Maps `bytes` of private anonymous memory, pre-faulted so the first transfer does not pay for it.
fn map_anonymous(bytes: usize) -> io::Result<NonNull<u8>> {
    #[cfg(target_os = "linux")]
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::MAP_PRIVATE | libc::MAP_ANON;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mapping {bytes} B of staging buffers: {e}"),
        ));
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Locks the first `n` buffers for `n = buffers, buffers/2, ..., min_buffers`; returns how many
/// buffers to keep, whether they are locked, and the degraded message if any.
fn lock_some(
    base: NonNull<u8>,
    stride_bytes: usize,
    buffers: usize,
    min_buffers: usize,
) -> (usize, bool, Option<String>) {
    let mut n = buffers;
    let mut first_error: Option<io::Error> = None;
    loop {
        // SAFETY: the range is the start of our own mapping; mlock only pins pages.
        let rc = unsafe { libc::mlock(base.as_ptr().cast(), n * stride_bytes) };
        if rc == 0 {
            let degraded = first_error.map(|e| {
                format!(
                    "locked {n} of the {buffers} staging buffers requested ({} of {} KiB): mlock refused more ({e}; {}); raise `ulimit -l` or grant CAP_IPC_LOCK for the full pool",
                    n * stride_bytes / 1024,
                    buffers * stride_bytes / 1024,
                    memlock_limit_text()
                )
            });
            return (n, true, degraded);
        }
        let e = io::Error::last_os_error();
        let retry = matches!(
            e.raw_os_error(),
            Some(libc::ENOMEM | libc::EPERM | libc::EAGAIN)
        );
        first_error.get_or_insert(e);
        if !retry || n / 2 < min_buffers || n == 1 {
            break;
        }
        n /= 2;
    }
    let e = first_error.expect("an error was recorded");
    let why = format!(
        "staging buffers are not locked in memory ({buffers} x {} KiB; mlock: {e}; {}); they work, but may be paged out and every transfer pins their pages anew; raise `ulimit -l` to at least {} KiB or grant CAP_IPC_LOCK",
        stride_bytes / 1024,
        memlock_limit_text(),
        min_buffers * stride_bytes / 1024,
    );
    (buffers, false, Some(why))
}

fn memlock_limit_text() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return "RLIMIT_MEMLOCK unknown".into();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "RLIMIT_MEMLOCK is unlimited".into()
    } else {
        format!("RLIMIT_MEMLOCK is {} KiB", lim.rlim_cur / 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_distinct() {
        let pool = PinnedPool::with_config(PoolConfig::new(3, 5000).with_lock(false)).unwrap();
        assert!(pool.degraded_reason().is_none() && !pool.is_locked());
        let mut bufs: Vec<PinnedBuf> = (0..3).map(|_| pool.try_acquire().unwrap()).collect();
        assert!(pool.try_acquire().is_none());
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), 5000);
            assert_eq!(b.as_ptr() as usize % page_bytes(), 0);
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8));
        }
        drop(bufs);
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn acquire_blocks_until_a_buffer_returns() {
        let pool = PinnedPool::new(1, 4096).unwrap();
        let held = pool.acquire();
        assert!(pool.acquire_timeout(Duration::from_millis(20)).is_none());
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.acquire().index());
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert_eq!(waiter.join().unwrap(), 0);
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(PinnedPool::new(0, 4096).is_err());
        assert!(PinnedPool::new(1, 0).is_err());
        assert!(PinnedPool::new(usize::MAX / 2, 4096).is_err());
    }
}
