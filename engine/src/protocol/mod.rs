//! The peer's side of the control protocol, as a sans-IO state machine.
//!
//! Inputs: the user's requests (`start_*`), messages from the master ([`PeerProto::handle`]) and
//! what the I/O shell reports back (`connect_finished`, `collective_finished`). Outputs: messages
//! for the master ([`PeerProto::poll_transmit`]), [`Effect`]s for the shell, and states that
//! blocked callers wait on. It never reads a clock or touches a socket, so the same logic runs in
//! the real [`crate::Communicator`] and in a simulation.
//!
//! It also enforces the rule of one operation kind at a time: a topology update cannot start
//! while collectives are in flight, and the reverse.
//!
//! The state lives here, with registration, the loss of the master and the routing of master
//! messages; each kind of operation has its file, and all of them build on the plain data of
//! `phases`:
//!
//! - `phases`: the phases, effects and group sizes the shell reads, and the cancel-reason marks;
//! - `topology`: topology votes, the pending question, connection rounds, the ring in force;
//! - `collectives`: per-tag votes, completion, cancel and the master's verdicts;
//! - `shared_state`: the shared-state sync vote, plan and verdict.

mod collectives;
mod phases;
mod shared_state;
mod topology;

use std::collections::{BTreeMap, VecDeque};

use concord_master::proto::{encode_peer, MasterMsg, PeerId, PeerMsg, RingMember};
use concord_transport::auth::{self, Nonce, RunToken};
use concord_transport::PROTOCOL_VERSION;

pub use phases::{CollPhase, Effect, GroupInfo, SyncPhase, TopoPhase};

use crate::Error;

/// The peer's protocol state.
#[derive(Debug)]
pub struct PeerProto {
    peer_id: Option<PeerId>,
    /// Set once the master refused, kicked us or went away: every wait ends with it.
    fatal: Option<Error>,
    topo: TopoPhase,
    /// The ring in force: epoch, members, our rank.
    ring: Option<(u64, Vec<RingMember>)>,
    pending: Option<Option<bool>>,
    colls: BTreeMap<u64, CollPhase>,
    out: VecDeque<PeerMsg>,
    history: VecDeque<(u64, Vec<PeerId>)>,
    sync: SyncPhase,
    groups: GroupInfo,
    auth: Handshake,
}

/// What a peer proves itself with: the run token, if it has one, and a fresh nonce for the
/// master's proof to cover.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The run token (`None`: join a master that runs without one).
    pub token: Option<RunToken>,
    /// Fresh random bytes ([`concord_transport::auth::nonce`]).
    pub nonce: Nonce,
}

impl Credentials {
    /// No token and a zero nonce: for simulations and tests against a master without a token.
    pub fn none() -> Self {
        Credentials {
            token: None,
            nonce: [0; 32],
        }
    }
}

/// Where registration stands: the hello sent (and its bytes, which the proof covers), then the
/// master's challenge answered.
#[derive(Debug)]
struct Handshake {
    credentials: Credentials,
    hello_bytes: Vec<u8>,
    /// The master's nonce, once it challenged.
    master_nonce: Option<Nonce>,
}

impl PeerProto {
    /// A peer about to register, without a token; queues the hello.
    pub fn new(data_port: u16, advertise_ip: String) -> Self {
        Self::with_group(data_port, advertise_ip, 0, Credentials::none())
    }

    /// A peer of peer group `group` about to register with `credentials`; queues the hello.
    pub fn with_group(
        data_port: u16,
        advertise_ip: String,
        group: u32,
        credentials: Credentials,
    ) -> Self {
        let hello = PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port,
            advertise_ip,
            group,
            nonce: credentials.nonce,
        };
        let hello_bytes = encode_peer(&hello);
        let mut out = VecDeque::new();
        out.push_back(hello);
        PeerProto {
            peer_id: None,
            fatal: None,
            topo: TopoPhase::Waiting,
            ring: None,
            pending: None,
            colls: BTreeMap::new(),
            out,
            history: VecDeque::new(),
            sync: SyncPhase::Idle,
            groups: GroupInfo::default(),
            auth: Handshake {
                credentials,
                hello_bytes,
                master_nonce: None,
            },
        }
    }

    /// The master's challenge: prove the token over both nonces and the hello, unless the two
    /// sides disagree on whether the run has a token.
    fn on_challenge(&mut self, master_nonce: Nonce, token_required: bool) -> Vec<Effect> {
        if self.auth.master_nonce.is_some() || self.peer_id.is_some() {
            return self.master_lost(Error::Protocol("the master sent Challenge twice".into()));
        }
        let token = self.auth.credentials.token.as_ref();
        match (token.is_some(), token_required) {
            (false, true) => {
                return self.master_lost(Error::Unauthenticated(
                    "the master requires a run token and this peer has none; give it the \
                     run's token (CONCORD_TOKEN, --token-file, or the builder's token option)"
                        .into(),
                ))
            }
            (true, false) => {
                return self.master_lost(Error::Unauthenticated(
                    "this peer has a run token but the master runs without one (--insecure), \
                     so it cannot prove it belongs to the run; give the master the same token, \
                     or unset CONCORD_TOKEN here"
                        .into(),
                ))
            }
            _ => {}
        }
        self.auth.master_nonce = Some(master_nonce);
        let proof = auth::peer_proof(
            token,
            &master_nonce,
            &self.auth.credentials.nonce,
            &self.auth.hello_bytes,
        );
        self.out.push_back(PeerMsg::Proof { proof });
        Vec::new()
    }

    /// Next message for the master.
    pub fn poll_transmit(&mut self) -> Option<PeerMsg> {
        self.out.pop_front()
    }

    /// Our id, once welcomed.
    pub fn peer_id(&self) -> Option<PeerId> {
        self.peer_id
    }

    /// The fatal error, if the peer can no longer talk to the master.
    pub fn fatal(&self) -> Option<&Error> {
        self.fatal.as_ref()
    }

    fn usable(&self) -> Result<(), Error> {
        match &self.fatal {
            Some(e) => Err(e.clone()),
            None if self.peer_id.is_none() => {
                Err(Error::Usage("not registered with the master yet".into()))
            }
            None => Ok(()),
        }
    }

    /// A message from the master. An `Err` is a protocol violation by the master (fatal).
    pub fn handle(&mut self, msg: MasterMsg) -> Result<Vec<Effect>, Error> {
        match msg {
            MasterMsg::Challenge {
                nonce,
                token_required,
                ..
            } => Ok(self.on_challenge(nonce, token_required)),
            MasterMsg::Welcome { peer_id, proof, .. } => {
                if self.peer_id.is_some() {
                    return violation("Welcome twice");
                }
                let Some(master_nonce) = self.auth.master_nonce else {
                    return violation("Welcome before its challenge");
                };
                let token = self.auth.credentials.token.as_ref();
                if token.is_some() {
                    let nonce = &self.auth.credentials.nonce;
                    let expected = auth::master_proof(token, nonce, &master_nonce, peer_id);
                    if !auth::proofs_equal(&expected, &proof) {
                        return Ok(self.master_lost(Error::Unauthenticated(
                            "the master could not prove it holds this run's token: it is \
                             not this run's master (check the master address and the token)"
                                .into(),
                        )));
                    }
                }
                self.peer_id = Some(peer_id);
                Ok(Vec::new())
            }
            MasterMsg::Refused { version, reason } => {
                let error = if version != PROTOCOL_VERSION {
                    Error::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }
                } else {
                    Error::Refused(reason)
                };
                Ok(self.master_lost(error))
            }
            MasterMsg::Kicked { reason } => Ok(self.master_lost(Error::Kicked(reason))),
            MasterMsg::Ping => {
                self.out.push_back(PeerMsg::Pong);
                Ok(Vec::new())
            }
            MasterMsg::SyncPlan {
                revision,
                secret,
                pulls,
            } => self.on_sync_plan(revision, secret, pulls),
            MasterMsg::SyncComplete { revision } => self.on_sync_complete(revision),
            MasterMsg::SyncFailed { reason } => self.on_sync_failed(reason),
            MasterMsg::PendingAnswer { pending } => self.on_pending_answer(pending),
            MasterMsg::Topology {
                epoch,
                secret,
                ring,
            } => self.on_topology(epoch, secret, ring),
            MasterMsg::TopologyDone {
                epoch,
                world,
                global_world,
                groups,
                largest_group,
            } => self.on_topology_done(
                epoch,
                world,
                GroupInfo {
                    global_world,
                    groups,
                    largest_group,
                },
            ),
            MasterMsg::TopologyFailed { epoch: _, reason } => self.on_topology_failed(reason),
            MasterMsg::CollCommence { tag, seq, epoch } => self.on_coll_commence(tag, seq, epoch),
            MasterMsg::CollRefused { tag, reason } => self.on_coll_refused(tag, reason),
            MasterMsg::CollDone { tag, seq } => self.on_coll_done(tag, seq),
            MasterMsg::CollAborted {
                tag,
                seq,
                kind,
                reason,
                lost,
            } => self.on_coll_aborted(tag, seq, kind, reason, lost),
        }
    }

    /// The master connection is gone: every wait ends with `error`.
    pub fn master_lost(&mut self, error: Error) -> Vec<Effect> {
        if self.fatal.is_none() {
            self.fatal = Some(error.clone());
        }
        let mut effects = self.fail_everything(error);
        effects.push(Effect::BreakRing);
        effects
    }

    fn fail_everything(&mut self, error: Error) -> Vec<Effect> {
        let mut effects = Vec::new();
        for (tag, phase) in self.colls.iter_mut() {
            if let CollPhase::Run { seq } | CollPhase::Completing { seq } = phase {
                effects.push(Effect::Retire {
                    tag: *tag,
                    seq: *seq,
                });
            }
            if !matches!(phase, CollPhase::Done | CollPhase::Failed(_)) {
                *phase = CollPhase::Failed(error.clone());
            }
        }
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            self.topo = TopoPhase::Failed {
                reason: error.to_string(),
            };
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            self.sync = SyncPhase::Failed(error);
        }
        effects
    }
}

/// The answer to a master message that is illegal in the peer's state: a fatal protocol error.
fn violation(what: &str) -> Result<Vec<Effect>, Error> {
    Err(Error::Protocol(format!("the master sent {what}")))
}

#[cfg(test)]
mod tests;
