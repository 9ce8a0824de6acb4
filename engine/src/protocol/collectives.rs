//! Collectives from the peer's side: the vote that starts one per tag, the shell's report of its
//! part, the master's verdict, and the ways a tag ends early (cancel, local failure, forgetting).
//!
//! A tag goes `Voting` -> `Run` (the shell moves the data) -> `Completing` -> `Done`, or to
//! `Failed` from anywhere; the caller takes the outcome, which frees the tag. An abort carries
//! its kind (`AbortKind`), so every peer reports the same kind of error as the peer that
//! cancelled.

use concord_master::proto::{AbortKind, CollectiveDesc, PeerId, PeerMsg};

use super::{violation, CollPhase, Effect, PeerProto, SyncPhase, TopoPhase};
use crate::Error;

impl PeerProto {
    /// The phase of a collective.
    pub fn collective(&self, tag: u64) -> Option<&CollPhase> {
        self.colls.get(&tag)
    }

    /// Collectives in flight (not yet taken).
    pub fn collectives_in_flight(&self) -> usize {
        self.colls.len()
    }

    /// Starts the vote for a collective.
    pub fn start_collective(&mut self, tag: u64, desc: CollectiveDesc) -> Result<(), Error> {
        self.usable()?;
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            return Err(Error::Usage(format!(
                "all_reduce(tag {tag}) while the topology is not established ({}): call update_topology() first",
                match &self.topo {
                    TopoPhase::Failed { reason } => reason.as_str(),
                    _ => "an update is under way",
                }
            )));
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            return Err(Error::Usage(format!(
                "all_reduce(tag {tag}) during a shared-state sync (one operation kind at a time)"
            )));
        }
        if self.colls.contains_key(&tag) {
            return Err(Error::Usage(format!(
                "tag {tag} is already in flight: each collective in flight needs its own tag"
            )));
        }
        self.colls.insert(tag, CollPhase::Voting);
        self.out.push_back(PeerMsg::CollInit { tag, desc });
        Ok(())
    }

    /// The shell finished (or failed) its part of collective `tag`.
    pub fn collective_finished(&mut self, tag: u64, seq: u64, result: Result<(), String>) {
        if self.colls.get(&tag) != Some(&CollPhase::Run { seq }) {
            return; // Aborted meanwhile: the master already knows.
        }
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        self.colls.insert(tag, CollPhase::Completing { seq });
        self.out.push_back(PeerMsg::CollComplete {
            tag,
            seq,
            ok,
            detail,
        });
    }

    /// Takes a finished collective's outcome (`Done` or `Failed`), freeing its tag.
    pub fn take_collective(&mut self, tag: u64) -> Option<Result<(), Error>> {
        match self.colls.get(&tag)? {
            CollPhase::Done => {
                self.colls.remove(&tag);
                Some(Ok(()))
            }
            CollPhase::Failed(_) => match self.colls.remove(&tag) {
                Some(CollPhase::Failed(e)) => Some(Err(e)),
                _ => unreachable!("checked above"),
            },
            _ => None,
        }
    }

    /// Asks the master to abort collective `tag` on every peer: `kind` says what kind of abort
    /// (a deadline, a user's cancel, a failure here), `reason` says why in words. Returns false
    /// when the tag is not in flight here.
    pub fn cancel(&mut self, tag: u64, kind: AbortKind, reason: String) -> bool {
        let seq = match self.colls.get(&tag) {
            Some(CollPhase::Voting) => 0,
            Some(CollPhase::Run { seq } | CollPhase::Completing { seq }) => *seq,
            _ => return false,
        };
        self.out.push_back(PeerMsg::CollCancel {
            tag,
            seq,
            kind,
            reason,
        });
        true
    }

    /// Fails a tag here without the master (it did not answer in time).
    pub fn fail_locally(&mut self, tag: u64, error: Error) {
        if let Some(phase) = self.colls.get_mut(&tag) {
            if !matches!(phase, CollPhase::Done | CollPhase::Failed(_)) {
                *phase = CollPhase::Failed(error);
            }
        }
    }

    /// Forgets a tag whatever its state (the shell gave up waiting for the master).
    pub fn forget(&mut self, tag: u64) {
        self.colls.remove(&tag);
    }

    /// Every peer voted with the same descriptor: the shell runs the attempt.
    pub(super) fn on_coll_commence(
        &mut self,
        tag: u64,
        seq: u64,
        epoch: u64,
    ) -> Result<Vec<Effect>, Error> {
        if self.colls.get(&tag) != Some(&CollPhase::Voting) {
            return violation(&format!("CollCommence for tag {tag}, which is not voting"));
        }
        if self.ring.as_ref().map(|r| r.0) != Some(epoch) {
            return violation(&format!(
                "CollCommence for epoch {epoch}, not the ring in force"
            ));
        }
        self.colls.insert(tag, CollPhase::Run { seq });
        Ok(vec![Effect::Run { tag, seq }])
    }

    /// The peers disagreed on the descriptor: nothing is reduced.
    pub(super) fn on_coll_refused(
        &mut self,
        tag: u64,
        reason: String,
    ) -> Result<Vec<Effect>, Error> {
        if self.colls.get(&tag) != Some(&CollPhase::Voting) {
            return violation(&format!("CollRefused for tag {tag}, which is not voting"));
        }
        self.colls
            .insert(tag, CollPhase::Failed(Error::Mismatch { tag, reason }));
        Ok(Vec::new())
    }

    /// Every member completed the attempt.
    pub(super) fn on_coll_done(&mut self, tag: u64, seq: u64) -> Result<Vec<Effect>, Error> {
        match self.colls.get(&tag) {
            Some(CollPhase::Completing { seq: s }) if *s == seq => {
                self.colls.insert(tag, CollPhase::Done);
                Ok(vec![Effect::Retire { tag, seq }])
            }
            // A tag this peer gave up on (its deadline passed) and forgot.
            None => Ok(Vec::new()),
            _ => violation(&format!("CollDone for tag {tag} seq {seq} out of turn")),
        }
    }

    /// The attempt failed somewhere, lost a peer or was cancelled: the error says which.
    pub(super) fn on_coll_aborted(
        &mut self,
        tag: u64,
        seq: u64,
        kind: AbortKind,
        reason: String,
        lost: Vec<PeerId>,
    ) -> Result<Vec<Effect>, Error> {
        let running = match self.colls.get(&tag) {
            Some(CollPhase::Voting) => false,
            Some(CollPhase::Run { seq: s } | CollPhase::Completing { seq: s }) if *s == seq => true,
            _ => return Ok(Vec::new()), // Already failed or forgotten here.
        };
        // A lost peer means the ring is gone: nothing more can flow on it.
        let mut effects = Vec::new();
        if !lost.is_empty() {
            effects.push(Effect::BreakRing);
        }
        let error = match kind {
            AbortKind::Timeout => Error::Timeout(format!("collective {tag}: {reason}")),
            AbortKind::Cancelled => Error::Cancelled { tag, reason },
            AbortKind::LostPeer | AbortKind::Failed | AbortKind::Refused => {
                Error::Aborted { tag, reason, lost }
            }
        };
        self.colls.insert(tag, CollPhase::Failed(error));
        if running {
            effects.push(Effect::Retire { tag, seq });
        }
        Ok(effects)
    }
}
