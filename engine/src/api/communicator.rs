//! The communicator: a peer's handle on its group, and its threads.
//!
//! Threads (a bound that does not grow with the operations in flight): the owner's thread runs
//! the API; `concord-master-rx` blocks on the master connection and feeds each message to the
//! [`crate::protocol::PeerProto`] under a mutex; `concord-watchdog` sleeps until the next
//! deadline; the data plane of the ring in force runs one TX and one RX thread per connection to
//! each neighbour. Nothing polls: an idle communicator is blocked syscalls only.

use std::cell::Cell;
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_master::proto::{encode_peer, PeerId, PeerMsg};
use concord_transport::socket::{connect_with_retry, listen, resolve, SocketOptions};
use concord_transport::{resolve_backend, BackendChoice, BackendKind};

use crate::config::{validate, Config};
use crate::control::master_link::read_master;
use crate::control::watchdog::watchdog;
use crate::peer::{flush, Inner};
use crate::protocol::{Credentials, PeerProto};
use crate::Error;
use crate::RunToken;

/// A peer's membership in a Concord group.
///
/// The communicator is `Send` but not `Sync`: one thread owns it. Blocking collectives and
/// topology updates are methods on it; async collectives go through [`Communicator::split`],
/// whose borrow keeps `update_topology` away while any are in flight.
///
/// ```no_run
/// use concord::{Communicator, ReduceOp};
/// let comm = Communicator::builder("127.0.0.1:48148").connect()?;
/// let grads = vec![1.0f32; 1024];
/// let mut out = vec![0.0f32; 1024];
/// let info = comm.all_reduce(&grads, &mut out, ReduceOp::Sum, 0)?;
/// println!("reduced across {} peers", info.world);
/// # Ok::<(), concord::Error>(())
/// ```
pub struct Communicator {
    pub(crate) inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    /// The master this process runs for its launcher's group (rank 0 of `from_env`); it stops
    /// after this peer said goodbye (fields drop after `Drop::drop`).
    pub(crate) embedded: Option<crate::launch::embedded::EmbeddedMaster>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("master", &self.inner.config.master)
            .finish_non_exhaustive()
    }
}

impl Communicator {
    pub(crate) fn connect(mut config: Config) -> Result<Self, Error> {
        validate(&config)?;
        if config.token.is_none() {
            config.token = RunToken::from_env()?;
        }
        let credentials = Credentials {
            token: config.token.clone(),
            nonce: concord_transport::auth::nonce()?,
        };
        let (backend, shm) = resolve_transport(config.transport)?;
        choose_addresses(&mut config)?;
        let listener = listen_data(&config)?;
        let data_port = listener
            .local_addr()
            .map_err(|e| Error::io("reading the data port's address", e))?
            .port();
        let master_addr = resolve(&config.master).map_err(|e| Error::MasterLost(e.to_string()))?;
        let stream = connect_with_retry(
            master_addr,
            &SocketOptions::default(),
            config.connect_timeout,
            "the master",
        )
        .map_err(|e| Error::MasterLost(format!("{e}; is `concord master` running there?")))?;
        concord_transport::socket::set_keepalive(&stream, Duration::from_secs(1))?;
        let read_half = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the master connection", e))?;
        let proto = PeerProto::with_group(
            data_port,
            config.advertise_ip.clone().unwrap_or_default(),
            config.group,
            credentials,
        );
        let inner = Arc::new(Inner::new(
            proto, stream, read_half, listener, config, backend, shm,
        ));
        let mut threads = Vec::new();
        let reader_inner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("concord-master-rx".into())
                .spawn(move || read_master(reader_inner))
                .map_err(|e| Error::io("spawning the master reader", e))?,
        );
        let weak = Arc::downgrade(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("concord-watchdog".into())
                .spawn(move || watchdog(weak))
                .map_err(|e| Error::io("spawning the watchdog", e))?,
        );
        let comm = Communicator {
            inner,
            threads,
            embedded: None,
            _not_sync: PhantomData,
        };
        flush(&mut comm.inner.lock());
        // Registered: wait for the group to admit us, then build the ring like any member.
        let deadline = Instant::now() + comm.inner.config.join_timeout;
        comm.finish_topology(deadline, "waiting to be admitted by the group")?;
        Ok(comm)
    }

    /// What this peer's data plane runs on: `Shm` when its connections to the ring successor
    /// are a shared-memory ring (a neighbour on this host), else the TCP backend (io_uring or
    /// socket), which also carries everything to other hosts.
    pub fn transport(&self) -> BackendKind {
        self.inner
            .lock()
            .plane
            .as_ref()
            .and_then(|p| p.transport())
            .unwrap_or(self.inner.backend)
    }

    /// This peer's id in the group.
    pub fn peer_id(&self) -> PeerId {
        self.inner
            .lock()
            .proto
            .peer_id()
            .expect("connected communicators are registered")
    }

    /// This peer's group.
    pub fn group(&self) -> u32 {
        self.inner.config.group
    }

    /// Accepted peers across all groups.
    pub fn global_world_size(&self) -> usize {
        self.inner.lock().proto.group_info().global_world as usize
    }

    /// Number of peer groups.
    pub fn num_groups(&self) -> usize {
        self.inner.lock().proto.group_info().groups as usize
    }

    /// Size of the largest peer group.
    pub fn largest_group_size(&self) -> usize {
        self.inner.lock().proto.group_info().largest_group as usize
    }

    /// Number of peers in this peer's group (its ring), as of the last topology update.
    pub fn world_size(&self) -> usize {
        self.inner.lock().proto.ring().map_or(0, |r| r.1.len())
    }

    /// This peer's position in the ring in force.
    pub fn rank(&self) -> usize {
        let g = self.inner.lock();
        let me = g.proto.peer_id();
        g.proto
            .ring()
            .and_then(|r| r.1.iter().position(|m| Some(m.peer_id) == me))
            .unwrap_or(0)
    }

    /// The rank (ring position) of peer `id` on the ring in force, if it is a member: what a
    /// broadcast or reduce names as its root.
    pub fn rank_of(&self, id: PeerId) -> Option<usize> {
        self.peer_ids().iter().position(|&p| p == id)
    }

    /// Ids of the members of the ring of `epoch`, for one of the last 64 rings this peer was in.
    pub fn ring_members(&self, epoch: u64) -> Option<Vec<PeerId>> {
        self.inner.lock().proto.ring_history(epoch)
    }

    /// Ids of the ring's members, in ring order.
    pub fn peer_ids(&self) -> Vec<PeerId> {
        self.inner
            .lock()
            .proto
            .ring()
            .map_or_else(Vec::new, |r| r.1.iter().map(|m| m.peer_id).collect())
    }

    /// Whether peers are waiting to join: a cheap unanimous vote, so that every member gets the
    /// same answer and calls [`Communicator::update_topology`] together. It may run while async
    /// collectives are in flight (see [`PeerProbe`](crate::PeerProbe)).
    pub fn are_new_peers_pending(&self) -> Result<bool, Error> {
        self.inner.pending_vote()
    }

    /// Splits the communicator for async collectives: a [`Collectives`](crate::Collectives) that may move to
    /// another thread to launch and await them, and a [`PeerProbe`](crate::PeerProbe) that stays on this thread and
    /// may only ask [`PeerProbe::are_new_peers_pending`](crate::PeerProbe::are_new_peers_pending). Both borrow the communicator, so
    /// `update_topology` (which takes `&mut self`) waits until they, and every handle, are gone.
    ///
    /// ```compile_fail
    /// # fn f(comm: &mut concord::Communicator) {
    /// let (collectives, _probe) = comm.split();
    /// comm.update_topology(); // error: the communicator is borrowed while async work is possible
    /// drop(collectives);
    /// # }
    /// ```
    ///
    /// The probe stays on the owner's thread:
    ///
    /// ```compile_fail
    /// # fn f(comm: &mut concord::Communicator) {
    /// let (_collectives, probe) = comm.split();
    /// std::thread::scope(|s| { s.spawn(move || probe.are_new_peers_pending()); });
    /// # }
    /// ```
    ///
    /// and the communicator itself is not shared between threads (it is `Send`, not `Sync`):
    ///
    /// ```compile_fail
    /// # fn f(comm: &concord::Communicator) {
    /// std::thread::scope(|s| { s.spawn(|| comm.world_size()); });
    /// # }
    /// ```
    pub fn split(&mut self) -> (crate::Collectives<'_>, crate::PeerProbe<'_>) {
        (
            crate::Collectives::new(Arc::clone(&self.inner)),
            crate::PeerProbe::new(Arc::clone(&self.inner)),
        )
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.inner.begin_shutdown();
        let plane = {
            let mut g = self.inner.lock();
            let _ = std::io::Write::write_all(&mut g.master, &encode_peer(&PeerMsg::Goodbye));
            let _ = g.master.shutdown(Shutdown::Both);
            g.plane.take()
        };
        drop(plane);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Fills in the interface, advertised address and port range from the environment where the
/// builder left them, and binds the data listener to the chosen interface's address.
fn choose_addresses(config: &mut Config) -> Result<(), Error> {
    use crate::launch::interfaces::{choose, local_addrs, FAMILY_ENV, IFNAME_ENV};
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if config.advertise_ip.is_none() {
        config.advertise_ip = var("CONCORD_ADVERTISE");
    }
    if config.data_ports.is_none() {
        if let Some(r) = var("CONCORD_DATA_PORTS") {
            config.data_ports = Some(crate::config::parse_port_range("CONCORD_DATA_PORTS", &r)?);
        }
    }
    let Some(spec) = config.socket_ifname.clone().or_else(|| var(IFNAME_ENV)) else {
        return Ok(());
    };
    let prefer_v6 = match var(FAMILY_ENV).as_deref() {
        None | Some("AF_INET") => false,
        Some("AF_INET6") => true,
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "{FAMILY_ENV}={other:?}: give AF_INET or AF_INET6"
            )))
        }
    };
    let chosen = choose(&spec, &local_addrs()?, prefer_v6)?;
    tracing::info!("data plane on {} ({})", chosen.ip, chosen.name);
    config.data_listen = SocketAddr::new(chosen.ip, config.data_listen.port());
    if config.advertise_ip.is_none() {
        config.advertise_ip = Some(chosen.ip.to_string());
    }
    Ok(())
}

/// Binds the data listener: `data_listen`, or the first free port of `data_ports` there.
fn listen_data(config: &Config) -> Result<std::net::TcpListener, Error> {
    let bind = |addr: SocketAddr| {
        listen(addr, 128).map_err(|e| match e {
            concord_transport::TransportError::Io { context, source } => {
                Error::io(format!("data port {addr}: {context}"), source)
            }
            other => other.into(),
        })
    };
    let Some((lo, hi)) = config.data_ports else {
        return bind(config.data_listen);
    };
    for port in lo..=hi {
        if let Ok(l) = bind(SocketAddr::new(config.data_listen.ip(), port)) {
            return Ok(l);
        }
    }
    Err(Error::InvalidArgument(format!(
        "no free data port in {lo}-{hi} on {}: widen the range (CONCORD_DATA_PORTS, --data-ports, data_port_range)",
        config.data_listen.ip()
    )))
}

/// Picks the TCP backend once, and whether neighbours on this host may share memory; a
/// fall-back from io_uring is said once per process.
fn resolve_transport(
    choice: Option<BackendChoice>,
) -> Result<(BackendKind, crate::plane::shm_links::ShmUse), Error> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let choice = match choice {
        Some(c) => c,
        None => BackendChoice::from_env_or(BackendChoice::Auto).map_err(Error::InvalidArgument)?,
    };
    let (kind, why) = resolve_backend(choice).map_err(Error::InvalidArgument)?;
    if let Some(why) = why {
        SAID.call_once(|| tracing::warn!("io_uring unavailable ({why}); using plain sockets"));
    }
    Ok((kind, crate::plane::shm_links::ShmUse::of(choice)))
}
