//! Shared-state sync: the vote, then pulls of the entries this peer lacks while it serves the
//! ones it holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use concord_transport::auth::{EpochKey, KeyPurpose};

use super::communicator::Communicator;
use crate::peer::flush;
use crate::protocol::SyncPhase;
use crate::state::{self, SharedState, SyncInfo, SyncStrategy};
use crate::Error;

impl Communicator {
    /// Brings every peer's shared state to the elected content and revision (see
    /// [`crate::SharedState`]): a unanimous vote, then outdated peers pull only their differing
    /// entries, from several up-to-date peers at once, and verify them. Every member must call
    /// it. On success `state.revision` is the elected revision.
    ///
    /// On failure revisions are unchanged; an entry this peer was pulling may hold a mix of old
    /// and new bytes, which the next sync repairs (it is still out of date).
    pub fn sync_shared_state(
        &mut self,
        state: &mut SharedState<'_>,
        strategy: SyncStrategy,
    ) -> Result<SyncInfo, Error> {
        let timeout = self.inner.config.op_timeout;
        let deadline = Instant::now() + timeout;
        let entries = state.describe()?;
        {
            let mut g = self.inner.lock();
            g.proto
                .start_sync(state.revision, strategy.wire(), entries)?;
            flush(&mut g);
        }
        let (revision, secret, pulls) = self.inner.wait(
            deadline,
            "sync_shared_state: not every member voted",
            |s| match s.proto.sync_phase() {
                SyncPhase::Plan {
                    revision,
                    secret,
                    pulls,
                } => Some(Ok((*revision, *secret, pulls.clone()))),
                SyncPhase::Failed(e) => Some(Err(e.clone())),
                _ => None,
            },
        )?;
        // Entries to fetch are written; the others are served, read-only.
        let mut dirty = Vec::new();
        let mut clean = std::collections::HashMap::new();
        for e in state.entries.iter_mut() {
            let crate::state::Entry {
                key,
                data,
                allow_content_inequality,
                ..
            } = e;
            match pulls.iter().find(|p| p.key == *key) {
                Some(pull) => dirty.push((pull, data.get_mut())),
                None if !*allow_content_inequality => {
                    clean.insert(key.as_str(), data.get());
                }
                None => {}
            }
        }
        let entries_pulled = dirty.len();
        let stop = AtomicBool::new(false);
        let inner = &*self.inner;
        let token = inner.config.token.as_ref();
        let key = EpochKey::derive(token, KeyPurpose::SharedState, revision, secret);
        let (outcome, bytes_received, bytes_sent) = std::thread::scope(|s| {
            let server = s.spawn(|| state::serve(&inner.listener, &clean, &key, revision, &stop));
            let pulled = if dirty.is_empty() {
                Ok(0)
            } else {
                state::pull_all(dirty, &key, revision, timeout)
            };
            let received = *pulled.as_ref().unwrap_or(&0);
            {
                let mut g = inner.lock();
                g.proto.sync_pulled(pulled.map(drop));
                flush(&mut g);
            }
            let outcome = inner.wait(
                deadline,
                "sync_shared_state: waiting for every peer's pulls",
                |s| match s.proto.sync_phase() {
                    SyncPhase::Complete { revision } => Some(Ok(*revision)),
                    SyncPhase::Failed(e) => Some(Err(e.clone())),
                    _ => None,
                },
            );
            stop.store(true, Ordering::Release);
            let sent = server.join().unwrap_or(0);
            (outcome, received, sent)
        });
        let revision = outcome?;
        let pulled: Vec<&str> = pulls.iter().map(|p| p.key.as_str()).collect();
        state.upload(&pulled)?;
        state.revision = revision;
        Ok(SyncInfo {
            revision: state.revision,
            entries_pulled,
            bytes_sent,
            bytes_received,
        })
    }
}
