//! The master that the launcher's rank 0 runs in its own process, on one thread of its own (the
//! master stays single-threaded), for as long as its communicator lives.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use concord_master::coordinator::CoordinatorConfig;
use concord_master::server::Server;
use concord_transport::auth::RunToken;

use crate::Error;

/// Set to `1` to run a launcher's master without a run token beyond loopback (every host that
/// reaches it may join).
pub const INSECURE_ENV: &str = "CONCORD_INSECURE";

/// A master running on a thread of this process.
#[derive(Debug)]
pub struct EmbeddedMaster {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedMaster {
    /// Starts a master for `master` (`host:port`, the address the other processes dial): it
    /// listens on that port on every interface (loopback only when the host is this machine's
    /// loopback). `token` is the run's token; without one a master beyond loopback needs
    /// `CONCORD_INSECURE=1`.
    pub fn start(master: &str, token: Option<RunToken>) -> Result<EmbeddedMaster, Error> {
        let resolved: Vec<SocketAddr> = master
            .to_socket_addrs()
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "the master address {master} does not resolve here: {e}"
                ))
            })?
            .collect();
        let first = *resolved.first().ok_or_else(|| {
            Error::InvalidArgument(format!("the master address {master} resolves to nothing"))
        })?;
        let port = first.port();
        let listen: SocketAddr = match first {
            a if a.ip().is_loopback() => a,
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
        };
        let insecure = std::env::var(INSECURE_ENV).is_ok_and(|v| v == "1");
        let mut config = CoordinatorConfig::default();
        config.token = token;
        let server = if insecure {
            Server::bind_insecure(listen, config)
        } else {
            Server::bind(listen, config)
        }
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "rank 0 could not start the master on {listen} ({e}); beyond loopback give every \
                 process the same CONCORD_TOKEN (a file's contents: openssl rand -hex 32), or set \
                 {INSECURE_ENV}=1 on a trusted network; if the port is taken, another process \
                 may claim rank 0, or set CONCORD_MASTER_PORT"
            ))
        })?;
        let addr = server.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_loop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("concord-master".into())
            .spawn(move || {
                let r = server.run(Some(Duration::from_millis(100)), || {
                    stop_loop.load(Ordering::Relaxed)
                });
                if let Err(e) = r {
                    tracing::error!("the embedded master stopped: {e}");
                }
            })
            .map_err(|e| Error::io("starting the master's thread", e))?;
        tracing::info!("rank 0 runs the master on {addr}");
        Ok(EmbeddedMaster {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EmbeddedMaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
