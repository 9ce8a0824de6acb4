//! The shared-state sync from the peer's side: the vote, the plan the master elects, the shell's
//! report of its pulls, and the master's verdict.
//!
//! The phase goes `Voting` -> `Plan` (the shell pulls what it lacks and serves the rest) ->
//! `Reported` -> `Complete`, or to `Failed`. A vote is refused while collectives are in flight or
//! the topology is not established: one operation kind at a time.

use concord_master::proto::{
    peer_message_bytes, EntryDesc, PeerMsg, Pull, MAX_ENTRIES, MAX_MESSAGE_BYTES,
};

use super::{violation, Effect, PeerProto, SyncPhase, TopoPhase};
use crate::Error;

impl PeerProto {
    /// Starts a shared-state sync vote (entries sorted by key).
    pub fn start_sync(
        &mut self,
        revision: u64,
        strategy: &str,
        entries: Vec<EntryDesc>,
    ) -> Result<(), Error> {
        self.usable()?;
        if !self.colls.is_empty() {
            return Err(Error::Usage(
                "sync_shared_state() with collectives in flight: wait for them first".into(),
            ));
        }
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            return Err(Error::Usage(
                "sync_shared_state() while the topology is not established: call update_topology()"
                    .into(),
            ));
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            return Err(Error::Usage(
                "a shared-state sync is already under way".into(),
            ));
        }
        if entries.len() > MAX_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "shared state of {} entries: one sync takes at most {MAX_ENTRIES}; sync them in \
                 parts, or pack small tensors into larger entries",
                entries.len()
            )));
        }
        let vote = PeerMsg::SyncVote {
            revision,
            strategy: strategy.into(),
            entries,
        };
        let bytes = peer_message_bytes(&vote);
        if bytes > MAX_MESSAGE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the shared-state vote (keys, dtypes, sizes and hashes of every entry) would take \
                 {bytes} bytes, over the {MAX_MESSAGE_BYTES}-byte message limit: use fewer or \
                 shorter keys"
            )));
        }
        self.sync = SyncPhase::Voting;
        self.out.push_back(vote);
        Ok(())
    }

    /// The sync phase.
    pub fn sync_phase(&self) -> &SyncPhase {
        &self.sync
    }

    /// The shell finished its pulls (or failed them).
    pub fn sync_pulled(&mut self, result: Result<(), String>) {
        if let SyncPhase::Plan { revision, .. } = self.sync {
            let (ok, detail) = match result {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e),
            };
            self.sync = SyncPhase::Reported { revision };
            self.out.push_back(PeerMsg::SyncDone {
                revision,
                ok,
                detail,
            });
        }
    }

    /// The master's plan: what this peer must pull (nothing, when up to date).
    pub(super) fn on_sync_plan(
        &mut self,
        revision: u64,
        secret: u64,
        pulls: Vec<Pull>,
    ) -> Result<Vec<Effect>, Error> {
        if self.sync != SyncPhase::Voting {
            return violation("a shared-state plan without a vote");
        }
        self.sync = SyncPhase::Plan {
            revision,
            secret,
            pulls,
        };
        Ok(Vec::new())
    }

    /// Every peer holds the elected revision.
    pub(super) fn on_sync_complete(&mut self, revision: u64) -> Result<Vec<Effect>, Error> {
        if self.sync != (SyncPhase::Reported { revision }) {
            return violation("SyncComplete out of turn");
        }
        self.sync = SyncPhase::Complete { revision };
        Ok(Vec::new())
    }

    /// The sync failed somewhere; nobody's revision changed.
    pub(super) fn on_sync_failed(&mut self, reason: String) -> Result<Vec<Effect>, Error> {
        if matches!(self.sync, SyncPhase::Idle | SyncPhase::Complete { .. }) {
            return violation("SyncFailed out of turn");
        }
        self.sync = SyncPhase::Failed(Error::SyncFailed(reason));
        Ok(Vec::new())
    }
}
