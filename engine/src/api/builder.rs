//! The builder of a [`Communicator`](super::Communicator): every setting, with its default.

use std::net::SocketAddr;
use std::time::Duration;

use concord_transport::auth::RunToken;
use concord_transport::BackendChoice;

use super::communicator::Communicator;
use crate::config::Config;
use crate::Error;

/// Builds a [`Communicator`].
#[derive(Debug)]
pub struct CommunicatorBuilder {
    config: Config,
}

impl Communicator {
    /// Starts building a communicator for the master at `master` ("host:port").
    pub fn builder(master: impl Into<String>) -> CommunicatorBuilder {
        CommunicatorBuilder {
            config: Config::new(master.into()),
        }
    }
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
    /// The run token (default: `CONCORD_TOKEN`, else none). The master must hold the same one:
    /// each side proves it to the other by challenge-response, and the ring's hellos are signed
    /// with keys derived from it, so the token never travels.
    pub fn token(mut self, token: RunToken) -> Self {
        self.config.token = Some(token);
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
