//! Which of a ring epoch's connections run over shared memory: the offer that follows the
//! hellos (`concord_transport::shm::offer`).
//!
//! Every connection is decided on its own, so a ring that spans hosts mixes rings in memory
//! (neighbours on this host) with TCP (the others). The receiving end of each connection
//! creates the segment and offers it with its host identity; the sending end maps it when both
//! identities match and both ends allow shared memory, and answers. All offers go out before
//! any is read (they are small: the socket takes them at once), so the two directions between
//! the same two peers never wait on each other.
//!
//! The memfd descriptor is closed as soon as the answer arrives: from then on only the two
//! mappings hold the memory, and the kernel frees it when both processes are gone.

use std::net::TcpStream;
use std::time::Instant;

use concord_master::proto::PeerId;
use concord_transport::shm::{
    host_id, Answer, Offer, OfferedSegment, Segment, ShmReader, ShmWriter,
};

pub(crate) use super::link_setup::ShmUse;
use super::link_setup::{read_exact_until, LinkError, RingSetup, ShmEnds};

/// Decides every connection of the epoch: offers on `prev` (whose frames this peer receives),
/// answers on `next`.
pub(crate) fn negotiate(
    next: &[TcpStream],
    prev: &[TcpStream],
    setup: &RingSetup<'_>,
    succ: PeerId,
    pred: PeerId,
    deadline: Instant,
) -> Result<ShmEnds, LinkError> {
    let host = host_id();
    let mut offered = Vec::with_capacity(prev.len());
    for mut stream in prev {
        let created = if setup.shm == ShmUse::Off || host.is_none() {
            None
        } else {
            match Segment::create(setup.shm_ring_bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    let why =
                        format!("creating a shared-memory ring for ring predecessor {pred}: {e}");
                    if setup.shm == ShmUse::Require {
                        return Err(LinkError::Misconfigured(format!(
                            "{why} (transport shm requires it; use auto to fall back to TCP)"
                        )));
                    }
                    warn_once(&format!("{why}; using TCP"));
                    None
                }
            }
        };
        let offer = Offer {
            host: host.unwrap_or([0; 64]),
            segment: created.as_ref().map(|c| OfferedSegment {
                pid: std::process::id(),
                fd: std::os::fd::AsRawFd::as_raw_fd(&c.fd),
                capacity: setup.shm_ring_bytes as u64,
                cookie: c.cookie,
            }),
        };
        offer.send(&mut stream).map_err(|e| e.to_string())?;
        offered.push(created);
    }
    let mut ends = ShmEnds::default();
    let mut require_failed = None;
    for stream in next {
        let mut buf = [0u8; concord_transport::shm::offer::OFFER_BYTES];
        read_exact_until(stream, &mut buf, setup, deadline, setup.cancelled).map_err(|e| {
            format!("reading the shared-memory offer of ring successor {succ}: {e}")
        })?;
        let offer = Offer::decode(&buf).map_err(|e| e.to_string())?;
        let same_host = host.is_some_and(|h| h == offer.host);
        let (answer, segment) = match (same_host, setup.shm, offer.segment) {
            (false, ..) => (Answer::OtherHost, None),
            (true, ShmUse::Off, _) => (Answer::Disabled, None),
            (true, _, None) => {
                if setup.shm == ShmUse::Require {
                    require_failed.get_or_insert(format!(
                        "ring successor {succ} runs on this host but does not allow shared memory \
                         (its transport is socket or io_uring)"
                    ));
                }
                (Answer::Disabled, None)
            }
            (true, _, Some(o)) => {
                match Segment::open(o.pid, o.fd, o.capacity as usize, &o.cookie) {
                    Ok(seg) => (Answer::Mapped, Some(seg)),
                    Err(e) => {
                        let why =
                            format!("mapping the shared-memory ring of ring successor {succ}: {e}");
                        if setup.shm == ShmUse::Require {
                            require_failed.get_or_insert(why.clone());
                        } else {
                            warn_once(&format!("{why}; using TCP"));
                        }
                        (
                            Answer::Failed {
                                errno: e.raw_os_error().unwrap_or(0),
                            },
                            None,
                        )
                    }
                }
            }
        };
        let mut s = stream;
        answer.send(&mut s).map_err(|e| e.to_string())?;
        ends.next.push(match segment {
            Some(seg) => Some(ShmWriter::new(seg, bell(stream)?, setup.io_timeout)),
            None => None,
        });
    }
    for (stream, created) in prev.iter().zip(offered) {
        let mut buf = [0u8; concord_transport::shm::offer::ANSWER_BYTES];
        read_exact_until(stream, &mut buf, setup, deadline, setup.cancelled).map_err(|e| {
            format!("reading the shared-memory answer of ring predecessor {pred}: {e}")
        })?;
        let answer = Answer::decode(&buf).map_err(|e| e.to_string())?;
        if setup.shm == ShmUse::Require {
            let why = match answer {
                Answer::Disabled => Some(format!(
                    "ring predecessor {pred} runs on this host but does not allow shared memory \
                     (its transport is socket or io_uring)"
                )),
                Answer::Failed { errno } => Some(format!(
                    "ring predecessor {pred} could not map this peer's shared-memory ring: {}",
                    std::io::Error::from_raw_os_error(errno)
                )),
                Answer::Mapped | Answer::OtherHost => None,
            };
            if let Some(why) = why {
                require_failed.get_or_insert(why);
            }
        }
        // The descriptor closes here either way; a mapped segment lives on in both mappings.
        ends.prev.push(match (answer, created) {
            (Answer::Mapped, Some(c)) => {
                Some(ShmReader::new(c.segment, bell(stream)?, setup.io_timeout))
            }
            (Answer::Mapped, None) => {
                return Err(LinkError::Failed(format!(
                    "ring predecessor {pred} says it mapped a shared-memory ring that was never offered"
                )))
            }
            _ => None,
        });
    }
    if let Some(why) = require_failed {
        return Err(LinkError::Misconfigured(format!(
            "{why}: transport shm requires shared memory with every neighbour on this host; use \
             auto to fall back to TCP"
        )));
    }
    Ok(ends)
}

/// The doorbell of a ring: its connection's socket, shared with the plane's stopper.
fn bell(stream: &TcpStream) -> Result<TcpStream, LinkError> {
    stream
        .try_clone()
        .map_err(|e| LinkError::Failed(format!("cloning a data socket: {e}")))
}

/// A fall-back to TCP is said once per process (every ring epoch would repeat it).
fn warn_once(why: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!("{why}");
    } else {
        tracing::warn!("{why}");
    }
}
