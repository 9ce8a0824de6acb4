//! The in-memory network and the event queue, in virtual time.
//!
//! Every message travels on a [`Link`]: one per direction of a peer's master connection, one per
//! directed ring neighbour pair and epoch (a data connection lives for one ring epoch). Each
//! message gets a random latency, plus a random extra delay when the `delay` fault is on, but a
//! link never reorders: like TCP, a message is delivered no earlier than the one before it on
//! the same link. Different links race freely, which is where the interesting interleavings
//! come from (a data frame overtaking the master's go-ahead, an abort overtaking a frame).
//!
//! The queue is ordered by (time, sequence number), so events due at the same microsecond run
//! in the order they were scheduled: the whole run is a pure function of the seed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use concord_master::coordinator::ConnId;
use concord_master::proto::PeerId;

use super::rng::{Digest, Rng};

/// Virtual time in microseconds since the start of the run.
pub(crate) type Time = u64;

/// One data frame: the header fields of a real frame (`tag, seq, step, sub, len`) plus the ring
/// epoch its connection belongs to.
#[derive(Clone, Debug)]
pub(crate) struct Frame {
    pub(crate) epoch: u64,
    pub(crate) tag: u64,
    pub(crate) seq: u64,
    pub(crate) step: u32,
    pub(crate) sub: u32,
    pub(crate) payload: Vec<u8>,
}

/// Something that happens at a virtual time. Peers are named by their index in the world.
#[derive(Debug)]
pub(crate) enum Event {
    /// A peer opens its master connection and says hello.
    Register { peer: usize },
    /// Bytes from a peer reach the master (possibly a fragment of a message).
    ToMaster { conn: ConnId, bytes: Vec<u8> },
    /// The master sees a connection close (the peer left, died, or gave up).
    MasterSeesClose { conn: ConnId },
    /// The master's deadline (`Coordinator::poll_timeout`) is due.
    MasterTimer { generation: u64 },
    /// Bytes from the master reach a peer (possibly a fragment of a message).
    ToPeer { peer: usize, bytes: Vec<u8> },
    /// A peer sees the master close its connection.
    PeerSeesClose { peer: usize },
    /// A data frame reaches the ring successor.
    Data {
        to: usize,
        from: usize,
        frame: Frame,
    },
    /// A predecessor's data-connection hello (epoch, its id, the epoch's secret).
    Dial {
        to: usize,
        from: usize,
        from_id: PeerId,
        epoch: u64,
        secret: u64,
    },
    /// The successor accepted the dial.
    DialAck { to: usize, from: usize, epoch: u64 },
    /// The data connection of `epoch` between `from` and `to` closed.
    LinkDown { to: usize, from: usize, epoch: u64 },
    /// A peer's compute between steps is over.
    Wake { peer: usize },
    /// A stalled peer runs again.
    Resume { peer: usize },
    /// Time to inject the next fault.
    FaultTick,
    /// Periodic check that nothing waits longer than the bound.
    Check,
}

impl Event {
    /// The peer that processes this event, if a peer does (a stalled peer defers it).
    pub(crate) fn target_peer(&self) -> Option<usize> {
        match self {
            Event::ToPeer { peer, .. }
            | Event::PeerSeesClose { peer }
            | Event::Wake { peer }
            | Event::Register { peer } => Some(*peer),
            Event::Data { to, .. }
            | Event::Dial { to, .. }
            | Event::DialAck { to, .. }
            | Event::LinkDown { to, .. } => Some(*to),
            _ => None,
        }
    }

    /// Folds the event into the trace digest: its kind, every id and every byte it carries.
    pub(crate) fn digest(&self, d: &mut Digest) {
        const NONE: &[u8] = &[];
        let p = |i: &usize| *i as u64;
        let (kind, ids, bytes): (u64, [u64; 6], &[u8]) = match self {
            Event::Register { peer } => (1, [p(peer), 0, 0, 0, 0, 0], NONE),
            Event::ToMaster { conn, bytes } => (2, [*conn, 0, 0, 0, 0, 0], bytes),
            Event::MasterSeesClose { conn } => (3, [*conn, 0, 0, 0, 0, 0], NONE),
            Event::MasterTimer { generation } => (4, [*generation, 0, 0, 0, 0, 0], NONE),
            Event::ToPeer { peer, bytes } => (5, [p(peer), 0, 0, 0, 0, 0], bytes),
            Event::PeerSeesClose { peer } => (6, [p(peer), 0, 0, 0, 0, 0], NONE),
            Event::Data { to, from, frame } => {
                let (f, place) = (frame, u64::from(frame.step) << 32 | u64::from(frame.sub));
                (
                    7,
                    [p(to), p(from), f.epoch, f.tag, f.seq, place],
                    &f.payload,
                )
            }
            Event::Dial {
                to,
                from,
                from_id,
                epoch,
                secret,
            } => (8, [p(to), p(from), *from_id, *epoch, *secret, 0], NONE),
            Event::DialAck { to, from, epoch } => (9, [p(to), p(from), *epoch, 0, 0, 0], NONE),
            Event::LinkDown { to, from, epoch } => (10, [p(to), p(from), *epoch, 0, 0, 0], NONE),
            Event::Wake { peer } => (11, [p(peer), 0, 0, 0, 0, 0], NONE),
            Event::Resume { peer } => (12, [p(peer), 0, 0, 0, 0, 0], NONE),
            Event::FaultTick => (13, [0; 6], NONE),
            Event::Check => (14, [0; 6], NONE),
        };
        d.u64(kind);
        for x in ids {
            d.u64(x);
        }
        d.u64(bytes.len() as u64);
        d.bytes(bytes);
    }
}

/// A directed connection; messages on one link are delivered in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Link {
    /// Peer to master.
    Up(usize),
    /// Master to peer.
    Down(usize),
    /// Ring data connection of one epoch.
    Data { from: usize, to: usize, epoch: u64 },
}

#[derive(Debug)]
struct Scheduled {
    at: Time,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest event must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Most events ever queued at once; a run that needs more is runaway and fails.
const MAX_QUEUED: usize = 1 << 20;

/// The event queue and the links.
#[derive(Debug)]
pub(crate) struct Net {
    queue: BinaryHeap<Scheduled>,
    next_seq: u64,
    /// Delivery time of the last message on each link (FIFO order).
    last: BTreeMap<Link, Time>,
    rng: Rng,
    delay: bool,
}

impl Net {
    pub(crate) fn new(rng: Rng, delay: bool) -> Self {
        Net {
            queue: BinaryHeap::new(),
            next_seq: 0,
            last: BTreeMap::new(),
            rng,
            delay,
        }
    }

    /// Schedules `event` at `at`.
    pub(crate) fn at(&mut self, at: Time, event: Event) {
        assert!(self.queue.len() < MAX_QUEUED, "event queue overflow");
        self.queue.push(Scheduled {
            at,
            seq: self.next_seq,
            event,
        });
        self.next_seq += 1;
    }

    /// The next event due, if any.
    pub(crate) fn pop(&mut self) -> Option<(Time, Event)> {
        self.queue.pop().map(|s| (s.at, s.event))
    }

    /// Sends `event` on `link` at `now`: latency (plus the `delay` fault), FIFO per link.
    pub(crate) fn send(&mut self, now: Time, link: Link, bytes: usize, event: Event) {
        let base = match link {
            Link::Up(_) | Link::Down(_) => self.rng.range(40, 160),
            // About 1 GB/s per data connection on top of a short hop.
            Link::Data { .. } => self.rng.range(20, 80) + bytes as u64 / 1000,
        };
        let extra = if !self.delay {
            0
        } else if self.rng.chance(1, 10) {
            self.rng.range(0, 20_000)
        } else if self.rng.chance(1, 200) {
            self.rng.range(100_000, 400_000)
        } else {
            0
        };
        let last = self.last.entry(link).or_insert(0);
        let at = (now + base + extra).max(*last);
        *last = at;
        self.at(at, event);
    }

    /// Sends control-message bytes on a master link, sometimes cut in two segments (as TCP may
    /// deliver them), so that both ends' reassembly through `split_frame` is exercised.
    pub(crate) fn send_control(&mut self, now: Time, link: Link, conn: ConnId, bytes: Vec<u8>) {
        let make = |bytes: Vec<u8>| match link {
            Link::Up(_) => Event::ToMaster { conn, bytes },
            Link::Down(peer) => Event::ToPeer { peer, bytes },
            Link::Data { .. } => unreachable!("control bytes travel on master links"),
        };
        if bytes.len() > 1 && self.rng.chance(1, 8) {
            let cut = self.rng.range(1, bytes.len() as u64) as usize;
            let (a, b) = bytes.split_at(cut);
            let (a, b) = (a.to_vec(), b.to_vec());
            let len = bytes.len();
            self.send(now, link, len, make(a));
            self.send(now, link, 0, make(b));
        } else {
            let len = bytes.len();
            self.send(now, link, len, make(bytes));
        }
    }
}
