//! Membership: admitting peers, (re)building the ring, and waiting for a whole world.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use concord_master::proto::RingMember;
use concord_transport::auth::{EpochKey, KeyPurpose};

use super::communicator::Communicator;
use crate::peer::{flush, Inner};
use crate::plane::links::{establish, LinkError, RingSetup};
use crate::plane::{DataPlane, PlaneEvents};
use crate::protocol::TopoPhase;
use crate::Error;

impl Communicator {
    /// Startup: admits pending peers (voting with every member) until the group has at least
    /// `min_world` peers, or fails with [`Error::Timeout`] after `timeout`. Returns the world
    /// size reached. Every member that is already in must call it too (the votes are unanimous).
    pub fn wait_for_world(&mut self, min_world: usize, timeout: Duration) -> Result<usize, Error> {
        let deadline = Instant::now() + timeout;
        while self.world_size() < min_world {
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "only {} of {min_world} peers joined within {} ms",
                    self.world_size(),
                    timeout.as_millis()
                )));
            }
            if self.are_new_peers_pending()? {
                self.update_topology()?;
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(self.world_size())
    }

    /// Admits pending peers and (re)builds the ring; retries a connection round that a dropped
    /// peer spoiled. Every member must call it (the vote is unanimous). Takes `&mut self`: it
    /// cannot run while async collectives borrow the communicator.
    pub fn update_topology(&mut self) -> Result<(), Error> {
        self.topology_vote(true)
    }

    /// Rebuilds the ring around lost peers without admitting pending ones: what a retry after a
    /// failure needs (a peer admitted in the middle of a re-run would start elsewhere). Every
    /// member must call it. [`Communicator::all_reduce_many_with_retry`] uses it.
    pub fn repair_topology(&mut self) -> Result<(), Error> {
        self.topology_vote(false)
    }

    /// How long a topology vote and its connection rounds may take, from now.
    pub(super) fn topology_deadline(&self) -> Instant {
        let c = &self.inner.config;
        Instant::now() + c.topology_timeout.max(c.op_timeout)
    }

    fn topology_vote(&mut self, admit: bool) -> Result<(), Error> {
        let deadline = self.topology_deadline();
        {
            let mut g = self.inner.lock();
            g.proto.reset_topology();
            if admit {
                g.proto.start_update_topology()?;
            } else {
                g.proto.start_repair_topology()?;
            }
            flush(&mut g);
        }
        self.finish_topology(deadline, "update_topology: not every member voted")
    }

    /// Drives a topology vote to its end, re-voting after failed connection rounds.
    pub(super) fn finish_topology(&self, deadline: Instant, what: &str) -> Result<(), Error> {
        const MAX_ROUNDS: usize = 16;
        let mut last_failure = String::new();
        for _ in 0..MAX_ROUNDS {
            let phase = self
                .inner
                .wait(deadline, what, |s| match s.proto.topology() {
                    TopoPhase::Connect { .. }
                    | TopoPhase::Done { .. }
                    | TopoPhase::Failed { .. } => Some(Ok(s.proto.topology().clone())),
                    _ => None,
                })?;
            tracing::info!(peer = ?self.inner.lock().proto.peer_id(), ?phase, "topology phase");
            match phase {
                TopoPhase::Done { .. } => return Ok(()),
                TopoPhase::Failed { reason } => {
                    tracing::info!("connection round failed ({reason}); voting again");
                    last_failure = reason;
                    self.revote()?;
                }
                TopoPhase::Connect {
                    epoch,
                    secret,
                    ring,
                } => {
                    let result = self.build_plane(epoch, secret, &ring);
                    tracing::info!(epoch, ok = result.is_ok(), error = ?result.as_ref().err(), "ring connections built");
                    {
                        let mut g = self.inner.lock();
                        match result {
                            Ok(plane) => {
                                g.plane = Some(plane);
                                g.ring_key = Some(EpochKey::derive(
                                    self.inner.config.token.as_ref(),
                                    KeyPurpose::Ring,
                                    epoch,
                                    secret,
                                ));
                                g.proto.install_ring(epoch, ring);
                                g.proto.connect_finished(epoch, Ok(()));
                            }
                            Err(LinkError::Misconfigured(why)) => {
                                // No round can fix it: fail the round for everyone, and this
                                // call at once, saying why.
                                g.proto.connect_finished(epoch, Err(why.clone()));
                                flush(&mut g);
                                return Err(Error::InvalidArgument(why));
                            }
                            Err(LinkError::Failed(why)) => {
                                g.proto.connect_finished(epoch, Err(why))
                            }
                        }
                        flush(&mut g);
                    }
                    let confirmed =
                        self.inner
                            .wait(
                                deadline,
                                "waiting for the ring to be confirmed",
                                |s| match s.proto.topology() {
                                    TopoPhase::Done { .. } => Some(Ok(None)),
                                    TopoPhase::Failed { reason } => Some(Ok(Some(reason.clone()))),
                                    _ => None,
                                },
                            )?;
                    match confirmed {
                        None => return Ok(()),
                        Some(reason) => last_failure = reason,
                    }
                    self.revote()?;
                }
                _ => unreachable!("filtered by the wait"),
            }
        }
        Err(Error::Timeout(format!(
            "the ring could not be built in {MAX_ROUNDS} rounds; the last failed with: {last_failure}"
        )))
    }

    fn revote(&self) -> Result<(), Error> {
        let old = {
            let mut g = self.inner.lock();
            g.proto.reset_topology();
            g.proto.start_update_topology()?;
            flush(&mut g);
            g.plane.take()
        };
        drop(old); // Outside the lock: its threads may report to it while stopping.
        Ok(())
    }

    fn build_plane(
        &self,
        epoch: u64,
        secret: u64,
        ring: &[RingMember],
    ) -> Result<DataPlane, LinkError> {
        // Old connections go first: a neighbour must never see two epochs' streams at once.
        let old = self.inner.lock().plane.take();
        drop(old);
        let config = &self.inner.config;
        let inner: &Inner = &self.inner;
        let setup = RingSetup {
            me: self.peer_id(),
            epoch,
            key: EpochKey::derive(config.token.as_ref(), KeyPurpose::Ring, epoch, secret),
            ring,
            conns: config.conns_per_neighbour,
            options: config.socket,
            timeout: config.topology_timeout,
            io_timeout: Some(config.op_timeout),
            shm: self.inner.shm,
            shm_ring_bytes: config.shm_ring(),
            cancelled: &|| {
                let g = inner.lock();
                g.proto.fatal().is_some()
                    || !matches!(g.proto.topology(), TopoPhase::Connect { epoch: e, .. } if *e == epoch)
            },
        };
        crate::fault::kill_point("connect", None);
        let links = establish(&self.inner.listener, &setup)?;
        // The plane reports finished attempts to the core (`PlaneEvents for Inner`), weakly: the
        // core owns the plane.
        let events: Weak<dyn PlaneEvents> = Arc::downgrade(&self.inner) as Weak<Inner>;
        DataPlane::start(
            links,
            self.inner.backend,
            config.sub_chunk_bytes,
            config.op_timeout,
            Arc::clone(&self.inner.pace),
            events,
        )
        .map_err(LinkError::Failed)
    }
}
