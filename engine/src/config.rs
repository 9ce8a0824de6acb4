//! A communicator's settings: what the builder fills in and every layer below reads.

use std::net::SocketAddr;
use std::time::Duration;

use concord_transport::auth::RunToken;
use concord_transport::socket::SocketOptions;
use concord_transport::BackendChoice;

use crate::Error;

/// How a communicator connects and moves data. Every field has a default; see the builder.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The master's address ("host:port").
    pub master: String,
    /// Where this peer accepts data connections (port 0: any free port).
    pub data_listen: SocketAddr,
    /// IP to advertise to the ring instead of the one the master sees (behind NAT). `None`:
    /// `CONCORD_ADVERTISE`, else the chosen interface's, else the one the master sees.
    pub advertise_ip: Option<String>,
    /// Which interface's address the data plane binds and advertises (`eth0`, a prefix, a
    /// list, `=exact`, `^excluded`; see [`crate::launch::interfaces`]). `None`:
    /// `CONCORD_SOCKET_IFNAME`, else every interface.
    pub socket_ifname: Option<String>,
    /// The ports the data listener may take, tried in order (firewalls). `None`:
    /// `CONCORD_DATA_PORTS` (`lo-hi`), else any free port (or `data_listen`'s).
    pub data_ports: Option<(u16, u16)>,
    /// Connections per ring neighbour (sub-chunks are striped over them).
    pub conns_per_neighbour: usize,
    /// Sub-chunk size: the unit of pipelining and of one frame. Smaller overlaps better,
    /// larger costs fewer syscalls.
    pub sub_chunk_bytes: usize,
    /// Ring bytes of each shared-memory connection this peer receives on (a multiple of 4 KiB,
    /// 256 KiB to 1 GiB). `None`: room for four sub-chunks ([`Config::shm_ring`]).
    pub shm_ring_bytes: Option<usize>,
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
    /// The run token this peer proves to the master and signs its data-plane and shared-state
    /// hellos with (keys derived per epoch; the token never travels). `None`: `CONCORD_TOKEN`,
    /// else none (only a master without a token admits such a peer).
    pub token: Option<RunToken>,
}

impl Config {
    /// Ring bytes of a shared-memory connection: the configured size, else room for four
    /// sub-chunks with their headers. Measured with `concord bench --local 2|4 -b 256M`,
    /// interleaved: with 512 KiB sub-chunks a 2 MiB ring gave 3.7-5.6 GB/s on 2 peers against
    /// 3.4-4.3 with 1 MiB, 2.2-2.5 with 16 MiB (a ring larger than the caches loses).
    pub fn shm_ring(&self) -> usize {
        use concord_transport::shm::segment::{CAPACITY_ALIGN, MAX_CAPACITY, MIN_CAPACITY};
        self.shm_ring_bytes.unwrap_or_else(|| {
            let four = 4 * (self.sub_chunk_bytes + CAPACITY_ALIGN);
            four.next_multiple_of(CAPACITY_ALIGN)
                .clamp(MIN_CAPACITY, MAX_CAPACITY)
        })
    }

    pub(crate) fn new(master: String) -> Self {
        Config {
            master,
            data_listen: "0.0.0.0:0".parse().expect("valid"),
            advertise_ip: None,
            socket_ifname: None,
            data_ports: None,
            conns_per_neighbour: 2,
            sub_chunk_bytes: 512 * 1024,
            shm_ring_bytes: None,
            socket: SocketOptions::default(),
            connect_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(600),
            topology_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_secs(120),
            max_in_flight: 256,
            transport: None,
            group: 0,
            spin: concord_transport::spin::spin_from_env(),
            token: None,
        }
    }
}

/// Refuses settings outside their documented ranges before anything is opened.
pub(crate) fn validate(c: &Config) -> Result<(), Error> {
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
    use concord_transport::shm::segment::{CAPACITY_ALIGN, MAX_CAPACITY, MIN_CAPACITY};
    if let Some(ring) = c.shm_ring_bytes {
        if !ring.is_multiple_of(CAPACITY_ALIGN) || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&ring) {
            return Err(Error::InvalidArgument(format!(
                "shm_ring_bytes {ring} is not a multiple of 4 KiB in 256 KiB..=1 GiB"
            )));
        }
    }
    if !(1..=65536).contains(&c.max_in_flight) {
        return Err(Error::InvalidArgument(format!(
            "max_in_flight {} not in 1..=65536",
            c.max_in_flight
        )));
    }
    Ok(())
}

/// `lo-hi` (or one port) as a port range; `what` names the setting in an error.
pub(crate) fn parse_port_range(what: &str, text: &str) -> Result<(u16, u16), Error> {
    let (lo, hi) = text
        .trim()
        .split_once('-')
        .unwrap_or((text.trim(), text.trim()));
    match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
        (Ok(lo), Ok(hi)) if lo > 0 && lo <= hi => Ok((lo, hi)),
        _ => Err(Error::InvalidArgument(format!(
            "{what}={text:?}: give a port range like 40000-40100 (1 to 65535, low first)"
        ))),
    }
}
