//! Collectives that survive lost peers: a batch of all-reduces re-runs what failed on a repaired
//! ring; any other collective (or group of them) re-runs through [`Communicator::with_retry`].

use std::time::Instant;

use concord_kernels::ReduceOp;

use super::communicator::Communicator;
use crate::results::{Batch, ReduceInfo, RetryReport};
use crate::{Element, Error};

impl Communicator {
    /// Runs a batch of tagged in-place all-reduces with at most `max_in_flight` in flight; when
    /// some fail because the group lost a peer (or hit a deadline), rebuilds the ring with the
    /// survivors and re-runs only those, until all succeed or fewer than two peers remain.
    /// Every survivor must call it with the same batch (the retries are collective too).
    ///
    /// On success every buffer holds the reduction over the peers of its successful attempt; on
    /// failure the buffers come back with their original contents.
    pub fn all_reduce_many_with_retry<T: Element>(
        &mut self,
        batch: Vec<(u64, Vec<T>)>,
        op: ReduceOp,
        max_in_flight: usize,
    ) -> Result<RetryReport<T>, (Batch<T>, Error)> {
        const MAX_ATTEMPTS: usize = 16;
        let order: Vec<u64> = batch.iter().map(|(t, _)| *t).collect();
        let mut todo = batch;
        let mut done = Vec::with_capacity(todo.len());
        let mut report = RetryReport {
            results: Vec::new(),
            retries: 0,
            first_failure: None,
        };
        for _ in 0..MAX_ATTEMPTS {
            let results = {
                let (collectives, _probe) = self.split();
                collectives.all_reduce_many(std::mem::take(&mut todo), op, max_in_flight)
            };
            let mut fatal = None;
            for (tag, (buf, r)) in results {
                match r {
                    Ok(info) => done.push((tag, buf, info)),
                    Err(e) => {
                        report
                            .first_failure
                            .get_or_insert_with(|| (Instant::now(), e.clone()));
                        if !(e.is_retryable() || matches!(e, Error::Timeout(_))) {
                            fatal.get_or_insert(e);
                        }
                        todo.push((tag, buf));
                    }
                }
            }
            if let Some(e) = fatal {
                return Err((give_back(&order, done, todo), e));
            }
            if todo.is_empty() {
                done.sort_by_key(|(t, _, _)| order.iter().position(|o| o == t));
                report.results = done;
                return Ok(report);
            }
            report.retries += 1;
            if let Err(e) = self.repair_topology() {
                return Err((give_back(&order, done, todo), e));
            }
            if self.world_size() < 2 {
                let e = Error::Aborted {
                    tag: todo[0].0,
                    reason: "fewer than two peers remain".into(),
                    lost: Vec::new(),
                };
                return Err((give_back(&order, done, todo), e));
            }
        }
        let e = Error::Timeout(format!(
            "{} collectives still failing after {MAX_ATTEMPTS} attempts",
            todo.len()
        ));
        Err((give_back(&order, done, todo), e))
    }
}

impl Communicator {
    /// Runs `attempt` (one or more collectives on this communicator) until it succeeds: when it
    /// fails because the group lost a peer (or hit a deadline), rebuilds the ring with the
    /// survivors ([`Communicator::repair_topology`]) and runs it again, at most 16 times.
    /// Every survivor must call it with the same `attempt` (the retries are collective too).
    ///
    /// `attempt` is called with the communicator, whose ring may be smaller each time: it
    /// reads [`Communicator::world_size`], [`Communicator::rank`] and [`Communicator::rank_of`]
    /// to size an all-gather's output or to pick a broadcast's root again (the error of a
    /// broadcast or reduce whose root was lost says so). In-place inputs are restored before
    /// each retry, as by every failing collective. Returns the result and the retries taken.
    pub fn with_retry<R>(
        &mut self,
        mut attempt: impl FnMut(&Communicator) -> Result<R, Error>,
    ) -> Result<(R, usize), Error> {
        const MAX_ATTEMPTS: usize = 16;
        let mut last = None;
        for retries in 0..MAX_ATTEMPTS {
            match attempt(self) {
                Ok(r) => return Ok((r, retries)),
                Err(e) if e.is_retryable() || matches!(e, Error::Timeout(_)) => {
                    tracing::info!("retrying on a repaired ring after: {e}");
                    last = Some(e);
                    self.repair_topology()?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Timeout(format!(
            "still failing after {MAX_ATTEMPTS} attempts; the last error: {}",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }
}

/// Every buffer of a batch that gave up, in batch order: the failed ones hold their inputs
/// again, the successful ones their results (all or nothing holds per collective).
fn give_back<T>(
    order: &[u64],
    done: Vec<(u64, Vec<T>, ReduceInfo)>,
    mut todo: Batch<T>,
) -> Batch<T> {
    todo.extend(done.into_iter().map(|(t, b, _)| (t, b)));
    todo.sort_by_key(|(t, _)| order.iter().position(|o| o == t));
    todo
}
