//! One shared-memory segment: an anonymous `memfd`, created by the receiving end of a ring
//! connection and mapped by both ends.
//!
//! The file has no name in any file system (nothing in `/dev/shm`), mode 0600, and its memory
//! is freed by the kernel once the last mapping and descriptor are gone, whichever way the
//! processes end (SIGKILL included). The sending end opens it through `/proc/<pid>/fd/<fd>` of
//! the receiver, which the kernel allows only to the same user (a ptrace read check), and
//! checks a random cookie written into the segment, so that a reused pid or another pid
//! namespace cannot hand it the wrong file.
//!
//! Layout: a 4096-byte control block, then `capacity` bytes of ring data. The control block
//! holds the identity (magic, version, capacity, cookie; written once by the creator before the
//! offer) and, one cache line each, the writer's `head` with the reader's sleeping flag and the
//! reader's `tail` with the writer's sleeping flag.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Magic at the start of every segment ("CDSHMSEG").
const SEGMENT_MAGIC: u64 = 0x4745_534d_4853_4443;
/// Bytes before the ring data.
pub(super) const CONTROL_BYTES: usize = 4096;
/// Granularity of a ring's capacity.
pub const CAPACITY_ALIGN: usize = 4096;
/// Smallest ring: room for every frame of the collectives sent inline (64 KiB) and their
/// headers, so that such writes never wait for the reader.
pub const MIN_CAPACITY: usize = 256 << 10;
/// Largest ring one connection may ask for.
pub const MAX_CAPACITY: usize = 1 << 30;

/// One cache line, so that the two ends never write the same line.
#[repr(C, align(64))]
pub(super) struct Line<T>(pub(super) T);

/// The identity of a segment, fixed before it is offered.
#[repr(C)]
pub(super) struct Identity {
    magic: u64,
    version: u32,
    _reserved: u32,
    capacity: u64,
    cookie: [u8; 16],
}

/// The writer's position and the reader's flag: set while the reader sleeps on the doorbell.
#[repr(C)]
pub(super) struct WriterLine {
    pub(super) head: AtomicU64,
    pub(super) reader_sleeps: AtomicU32,
}

/// The reader's position and the writer's flag: set while the writer sleeps on the doorbell.
#[repr(C)]
pub(super) struct ReaderLine {
    pub(super) tail: AtomicU64,
    pub(super) writer_sleeps: AtomicU32,
}

/// The control block at the start of the segment.
#[repr(C)]
pub(super) struct Control {
    identity: Line<Identity>,
    pub(super) writer: Line<WriterLine>,
    pub(super) reader: Line<ReaderLine>,
}

const _: () = assert!(std::mem::size_of::<Control>() <= CONTROL_BYTES);

/// A mapped segment. Unmapped on drop.
pub struct Segment {
    base: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop; the control block is accessed
// only through atomics, and the ring data through the ring protocol (`ring.rs`), under which
// each byte has one writer at a time and is read only after its release.
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` gives no unsynchronised access by itself.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A segment just created, with what the offer tells the other end.
#[derive(Debug)]
pub struct Created {
    /// The creator's mapping.
    pub segment: Segment,
    /// The memfd: keep it open until the other end has mapped the segment, then drop it.
    pub fd: OwnedFd,
    /// The random cookie written into the segment.
    pub cookie: [u8; 16],
}

impl Segment {
    /// Creates a segment of `capacity` ring bytes (a multiple of [`CAPACITY_ALIGN`] within
    /// [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]).
    pub fn create(capacity: usize) -> io::Result<Created> {
        check_capacity(capacity)?;
        // SAFETY: a NUL-terminated name and valid flags; the result is checked.
        let raw = unsafe { libc::memfd_create(c"concord-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(with_context(io::Error::last_os_error(), "memfd_create"));
        }
        // SAFETY: `raw` is a descriptor this call just opened and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fchmod on a descriptor we own; the result is checked.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(with_context(
                io::Error::last_os_error(),
                "fchmod 0600 on the memfd",
            ));
        }
        let file = File::from(fd);
        file.set_len((CONTROL_BYTES + capacity) as u64)
            .map_err(|e| with_context(e, "sizing the memfd"))?;
        let segment = map(&file, CONTROL_BYTES + capacity, capacity)?;
        let mut cookie = [0u8; 16];
        getrandom::getrandom(&mut cookie)
            .map_err(|e| io::Error::other(format!("no randomness for the segment cookie: {e}")))?;
        // SAFETY: the mapping is fresh, writable and nobody else has it yet; the identity line
        // is written once here, before the segment is offered.
        unsafe {
            segment.base.as_ptr().cast::<Identity>().write(Identity {
                magic: SEGMENT_MAGIC,
                version: crate::PROTOCOL_VERSION,
                _reserved: 0,
                capacity: capacity as u64,
                cookie,
            });
        }
        Ok(Created {
            segment,
            fd: file.into(),
            cookie,
        })
    }

    /// Maps the segment another process offered: its memfd `fd` in process `pid`, expected to
    /// hold `capacity` ring bytes and `cookie`. The error says what did not hold.
    pub fn open(pid: u32, fd: RawFd, capacity: usize, cookie: &[u8; 16]) -> io::Result<Segment> {
        check_capacity(capacity)?;
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| with_context(e, &format!("opening {path}")))?;
        let meta = file
            .metadata()
            .map_err(|e| with_context(e, &format!("fstat of {path}")))?;
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{path} is owned by uid {} with mode {:o}, not private to uid {me}",
                    meta.uid(),
                    meta.mode() & 0o777
                ),
            ));
        }
        if meta.len() != (CONTROL_BYTES + capacity) as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{path} holds {} bytes, not the {} offered",
                    meta.len(),
                    CONTROL_BYTES + capacity
                ),
            ));
        }
        let segment = map(&file, CONTROL_BYTES + capacity, capacity)?;
        // SAFETY: the identity line was written before the offer and is never written again.
        let id = unsafe { segment.base.as_ptr().cast::<Identity>().read() };
        if id.magic != SEGMENT_MAGIC
            || id.version != crate::PROTOCOL_VERSION
            || id.capacity != capacity as u64
            || id.cookie != *cookie
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path} is not the segment offered (another process or version)"),
            ));
        }
        Ok(segment)
    }

    /// Ring bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub(super) fn control(&self) -> &Control {
        // SAFETY: the mapping starts with the control block (page-aligned, large enough, zeroed
        // by the kernel or written by the creator), valid for `self`'s lifetime; its mutable
        // fields are atomics.
        unsafe { &*self.base.as_ptr().cast::<Control>() }
    }

    /// The first ring byte.
    pub(super) fn data(&self) -> *mut u8 {
        // SAFETY: the mapping is `CONTROL_BYTES + capacity` long.
        unsafe { self.base.as_ptr().add(CONTROL_BYTES) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `map`, unmapped once here; no
        // reference into it outlives the segment (the ring borrows it for each access).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn check_capacity(capacity: usize) -> io::Result<()> {
    if !capacity.is_multiple_of(CAPACITY_ALIGN)
        || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a shared-memory ring of {capacity} bytes: use a multiple of {CAPACITY_ALIGN} between {MIN_CAPACITY} and {MAX_CAPACITY}"
            ),
        ));
    }
    Ok(())
}

fn map(file: &File, len: usize, capacity: usize) -> io::Result<Segment> {
    // SAFETY: a fresh shared mapping of a file we hold open, of the file's length; the result
    // is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(with_context(
            io::Error::last_os_error(),
            "mmap of the segment",
        ));
    }
    Ok(Segment {
        base: NonNull::new(p.cast()).expect("mmap never returns null on success"),
        len,
        capacity,
    })
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_segment_opens_through_proc_with_its_cookie_only() {
        let c = Segment::create(MIN_CAPACITY).unwrap();
        let pid = std::process::id();
        let fd = c.fd.as_raw_fd();
        let other = Segment::open(pid, fd, MIN_CAPACITY, &c.cookie).unwrap();
        // Both mappings see the same memory.
        c.segment
            .control()
            .writer
            .0
            .head
            .store(12345, Ordering::SeqCst);
        assert_eq!(other.control().writer.0.head.load(Ordering::SeqCst), 12345);
        // SAFETY: test-only; nobody else touches these bytes.
        unsafe { c.segment.data().add(7).write(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { other.data().add(7).read() }, 42);
        // A wrong cookie or size is refused with the reason.
        let mut wrong = c.cookie;
        wrong[0] ^= 1;
        let e = Segment::open(pid, fd, MIN_CAPACITY, &wrong).unwrap_err();
        assert!(e.to_string().contains("not the segment offered"), "{e}");
        let e = Segment::open(pid, fd, 2 * MIN_CAPACITY, &c.cookie).unwrap_err();
        assert!(e.to_string().contains("not the"), "{e}");
        // Private to this user, and in no file system.
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.mode() & 0o777, 0o600);
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert!(
            link.to_string_lossy().starts_with("/memfd:concord-ring"),
            "{link:?}"
        );
    }

    #[test]
    fn capacities_are_checked() {
        for bad in [
            0,
            MIN_CAPACITY - CAPACITY_ALIGN,
            MIN_CAPACITY + 1,
            2 * MAX_CAPACITY,
        ] {
            let e = Segment::create(bad).unwrap_err();
            assert!(e.to_string().contains("multiple of"), "{bad}: {e}");
        }
        assert!(Segment::open(1, 3, 17, &[0; 16]).is_err());
    }
}
