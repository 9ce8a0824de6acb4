//! The builder of a [`Communicator`](super::Communicator): every setting, with its default.

use std::net::SocketAddr;
use std::time::Duration;

use concord_transport::auth::RunToken;
use concord_transport::BackendChoice;

use super::communicator::Communicator;
use crate::config::Config;
use crate::launch::embedded::EmbeddedMaster;
use crate::launch::env::{detect, LaunchEnv};
use crate::Error;

/// Builds a [`Communicator`].
#[derive(Debug)]
pub struct CommunicatorBuilder {
    config: Config,
    /// The launcher's group, when built from its environment.
    launch: Option<LaunchEnv>,
}

/// How long a launched process waits for rank 0's master to come up (default).
const LAUNCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

impl Communicator {
    /// Starts building a communicator for the master at `master` ("host:port").
    pub fn builder(master: impl Into<String>) -> CommunicatorBuilder {
        CommunicatorBuilder {
            config: Config::new(master.into()),
            launch: None,
        }
    }

    /// Joins the group that the launcher's environment describes (torchrun, Slurm, Open MPI,
    /// PMI or `CONCORD_*` variables; see [`crate::launch::env`]) and waits, within the join
    /// timeout, until the whole world is in. The process the launcher calls rank 0 runs the
    /// master on a thread of its own unless `CONCORD_MASTER` names one. Every process runs the
    /// same code:
    ///
    /// ```no_run
    /// let comm = concord::Communicator::from_env()?; // under torchrun, srun, mpirun, ...
    /// assert!(comm.world_size() >= 1);
    /// # Ok::<(), concord::Error>(())
    /// ```
    pub fn from_env() -> Result<Communicator, Error> {
        CommunicatorBuilder::from_env()?.connect()
    }
}

impl CommunicatorBuilder {
    /// A builder for the launcher's group (see [`Communicator::from_env`]); every setting may
    /// still be changed before `connect`.
    pub fn from_env() -> Result<CommunicatorBuilder, Error> {
        let env = detect(&|k| std::env::var(k).ok())?.ok_or_else(|| {
            Error::InvalidArgument(
                "no launcher's variables are set (torchrun's RANK/WORLD_SIZE/MASTER_ADDR/\
                 MASTER_PORT, Slurm's SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST, Open MPI's \
                 OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE, or CONCORD_RANK/CONCORD_WORLD_SIZE/\
                 CONCORD_MASTER): start this process with a launcher, or use \
                 Communicator::builder(master)"
                    .into(),
            )
        })?;
        Ok(Self::from_launch(env))
    }

    /// A builder for the group `env` describes.
    pub fn from_launch(env: LaunchEnv) -> CommunicatorBuilder {
        let mut b = Communicator::builder(env.master.clone());
        b.config.connect_timeout = LAUNCH_CONNECT_TIMEOUT;
        b.launch = Some(env);
        b
    }

    /// The launcher's view of this process, when built from it.
    pub fn launch_env(&self) -> Option<&LaunchEnv> {
        self.launch.as_ref()
    }

    /// Where this peer listens for data connections (default `0.0.0.0:0`).
    pub fn data_listen(mut self, addr: SocketAddr) -> Self {
        self.config.data_listen = addr;
        self
    }
    /// IP the ring should dial, behind NAT (default: `CONCORD_ADVERTISE`, else the chosen
    /// interface's, else the address the master sees).
    pub fn advertise_ip(mut self, ip: impl Into<String>) -> Self {
        self.config.advertise_ip = Some(ip.into());
        self
    }
    /// The interface whose address the data plane binds and advertises, as NCCL users write
    /// it: `eth0`, a prefix, `eth0,ib0`, `=eth0`, `^docker,lo` (default: `CONCORD_SOCKET_IFNAME`,
    /// else every interface; `CONCORD_SOCKET_FAMILY=AF_INET6` prefers IPv6).
    pub fn socket_ifname(mut self, spec: impl Into<String>) -> Self {
        self.config.socket_ifname = Some(spec.into());
        self
    }
    /// The ports the data listener may take, the first free one (default: `CONCORD_DATA_PORTS`,
    /// else any free port).
    pub fn data_port_range(mut self, lo: u16, hi: u16) -> Self {
        self.config.data_ports = Some((lo, hi));
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
    /// Ring bytes of each shared-memory connection this peer receives on (default: room for
    /// four sub-chunks, 2 MiB with the default sub-chunk; a multiple of 4 KiB from 256 KiB to
    /// 1 GiB).
    pub fn shm_ring_bytes(mut self, bytes: usize) -> Self {
        self.config.shm_ring_bytes = Some(bytes);
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
    /// Data-plane transport (default: `CONCORD_TRANSPORT`, else auto): `Auto` runs each
    /// connection to a neighbour on this host over shared memory where both ends allow it, and
    /// the others over io_uring where allowed, else sockets; `Shm` makes a failed shared-memory
    /// connection on one host an error; `Uring` and `Socket` never use shared memory. Peers on
    /// one host are those with the same kernel boot id, or the same `CONCORD_HOST_ID`.
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
    ///
    /// Built from a launcher's environment, it also starts the master where this is rank 0 and
    /// returns only once the launcher's whole world is in the group.
    pub fn connect(self) -> Result<Communicator, Error> {
        let Some(env) = self.launch else {
            return Communicator::connect(self.config);
        };
        if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(env.master.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "the master address {} does not resolve here ({e}); it came from {}",
                env.master,
                env.took.join(", ")
            )));
        }
        let embedded = if env.starts_master {
            let token = match &self.config.token {
                Some(t) => Some(t.clone()),
                None => RunToken::from_env()?,
            };
            Some(EmbeddedMaster::start(&env.master, token)?)
        } else {
            None
        };
        let join_timeout = self.config.join_timeout;
        let mut comm = Communicator::connect(self.config)?;
        comm.embedded = embedded;
        comm.wait_for_world(env.world, join_timeout)?;
        if comm.world_size() != env.world {
            return Err(Error::InvalidArgument(format!(
                "{} peers joined the master at {}, more than the launcher's world of {}: do two \
                 processes claim one rank, or two jobs share the master's port?",
                comm.world_size(),
                env.master,
                env.world
            )));
        }
        Ok(comm)
    }
}
