//! Many async all-reduces in flight across real processes: results equal one-by-one runs,
//! duplicate tags are refused, cancel and deadlines abort everywhere and restore inputs, a worker
//! panic fails only its collective, the thread count stays bounded, and handles can be awaited
//! from another thread or as futures while the owner probes for pending peers.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use common::*;
use concord::{verify, Completion, DType, Element, Error, ReduceOp};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

/// A minimal executor: Concord brings no runtime, so any will do.
fn block_on<F: Future + Unpin>(mut f: F) -> F::Output {
    struct Unparker(std::thread::Thread);
    impl Wake for Unparker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unparker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match std::pin::Pin::new(&mut f).poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

fn input<T: Element>(dtype: DType, op: ReduceOp, rank: usize, iter: u64, count: usize) -> Vec<T> {
    let mut bytes = vec![0u8; count * dtype.size_bytes()];
    verify::fill(dtype, op, rank, iter, &mut bytes);
    bytemuck::cast_slice(&bytes).to_vec()
}

fn wrong<T: Element>(dtype: DType, op: ReduceOp, world: usize, iter: u64, got: &[T]) -> u64 {
    let mut want = vec![0u8; std::mem::size_of_val(got)];
    verify::reference(dtype, op, world, iter, &mut want);
    verify::count_wrong(dtype, bytemuck::cast_slice(got), &want)
}

/// Peer: 24 mixed collectives in flight at once, launched and awaited by another thread while
/// the owner polls for pending peers; then the same one by one; digests must match.
#[test]
fn peer_concurrent() {
    if !is_peer() {
        return;
    }
    let world: usize = env("WORLD").parse().unwrap();
    let mut comm = join_world(&env("MASTER"), world);
    let rank = comm.rank();
    let ops = [
        ReduceOp::Sum,
        ReduceOp::Max,
        ReduceOp::Avg,
        ReduceOp::Prod,
        ReduceOp::Min,
    ];
    let sizes = [1usize, 1000, 65_537, 400_000];
    let threads_before = thread_count(std::process::id());
    let mut concurrent = Vec::new();
    {
        let (collectives, probe) = comm.split();
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                let mut handles = Vec::new();
                for i in 0..24u64 {
                    let op = ops[i as usize % ops.len()];
                    let count = sizes[i as usize % sizes.len()];
                    if i % 2 == 0 {
                        handles.push((
                            i,
                            None,
                            Some(collectives.all_reduce_async(
                                input::<f32>(DType::F32, op, rank, i, count),
                                op,
                                i,
                            )),
                        ));
                    } else {
                        handles.push((
                            i,
                            Some(collectives.all_reduce_async(
                                input::<half::bf16>(DType::BF16, op, rank, i, count),
                                op,
                                i,
                            )),
                            None,
                        ));
                    }
                }
                let mut out = Vec::new();
                for (i, bf, f) in handles {
                    let op = ops[i as usize % ops.len()];
                    if let Some(h) = f {
                        let (buf, r) = h.wait();
                        r.unwrap_or_else(|e| panic!("f32 {i}: {e}"));
                        assert_eq!(wrong(DType::F32, op, world, i, &buf), 0);
                        out.push(digest(bytemuck::cast_slice(&buf)));
                    }
                    if let Some(h) = bf {
                        let (buf, r) = block_on(h); // as a future
                        r.unwrap_or_else(|e| panic!("bf16 {i}: {e}"));
                        assert_eq!(wrong(DType::BF16, op, world, i, &buf), 0);
                        out.push(digest(bytemuck::cast_slice(&buf)));
                    }
                }
                out
            });
            // The owner may only probe while the other thread works.
            let mut probes = 0;
            while !worker.is_finished() && probes < 3 {
                assert!(
                    !probe.are_new_peers_pending().expect("probe"),
                    "nobody is waiting"
                );
                probes += 1;
            }
            concurrent = worker.join().expect("worker");
        });
    }
    let threads_after = thread_count(std::process::id());
    assert!(
        threads_after <= threads_before,
        "{threads_before} threads before, {threads_after} after"
    );
    // One by one, blocking.
    let mut serial = Vec::new();
    for i in 0..24u64 {
        let op = ops[i as usize % ops.len()];
        let count = sizes[i as usize % sizes.len()];
        if i % 2 == 0 {
            let mut b = input::<f32>(DType::F32, op, rank, i, count);
            comm.all_reduce_in_place(&mut b, op, 1000 + i).unwrap();
            serial.push(digest(bytemuck::cast_slice(&b)));
        } else {
            let mut b = input::<half::bf16>(DType::BF16, op, rank, i, count);
            comm.all_reduce_in_place(&mut b, op, 1000 + i).unwrap();
            serial.push(digest(bytemuck::cast_slice(&b)));
        }
    }
    assert_eq!(concurrent, serial, "in flight together == one by one");
    println!(
        "DIGEST {:016x}",
        concurrent.iter().fold(0u64, |a, d| a.rotate_left(5) ^ d)
    );
    comm.update_topology()
        .expect("the communicator is usable again after the handles are gone");
}

#[test]
fn concurrent_collectives_match_serial_ones_on_3_peers() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers: Vec<_> = (0..3)
        .map(|_| {
            spawn_peer(
                "peer_concurrent",
                &[("MASTER", master.addr.clone()), ("WORLD", "3".into())],
            )
        })
        .collect();
    let digests: Vec<String> = peers
        .into_iter()
        .map(|p| {
            let (ok, out) = wait_output(p, Duration::from_secs(120));
            assert!(ok, "peer failed:\n{out}");
            lines_with(&out, "DIGEST ")[0].to_string()
        })
        .collect();
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
}

/// Peer: duplicate tags, cancel, deadlines, an injected worker panic, and 64 in flight.
#[test]
fn peer_failures() {
    if !is_peer() {
        return;
    }
    let mut comm = join_world(&env("MASTER"), 2);
    let rank = comm.rank();
    let base_threads = thread_count(std::process::id());
    {
        let (c, _probe) = comm.split();
        // A duplicate tag in flight is refused; the first one completes.
        let first = c.all_reduce_async(vec![1.0f32; 1 << 20], ReduceOp::Sum, 5);
        let dup = c.all_reduce_async(vec![1.0f32; 8], ReduceOp::Sum, 5);
        let (_, r) = dup.wait();
        let e = r.unwrap_err();
        assert!(
            matches!(&e, Error::Usage(m) if m.contains("tag 5") && m.contains("in flight")),
            "{e}"
        );
        let (buf, r) = first.wait();
        r.unwrap();
        assert!(buf.iter().all(|x| *x == 2.0));

        // 64 in flight: threads stay within the documented bound (2 per connection + 2).
        let handles: Vec<_> = (0..64u64)
            .map(|t| c.all_reduce_async(vec![t as f32; 1 << 18], ReduceOp::Sum, 100 + t))
            .collect();
        let during = thread_count(std::process::id());
        println!("THREADS base {base_threads} during {during}");
        assert!(
            during <= base_threads,
            "64 in flight raised threads from {base_threads} to {during}"
        );
        for (t, h) in handles.into_iter().enumerate() {
            let (b, r): Completion<f32> = h.wait();
            r.unwrap();
            assert!(b.iter().all(|x| *x == 2.0 * t as f32));
        }

        // Cancel: rank 0 cancels a large collective; both peers get Cancelled with the tag and
        // their inputs back.
        let original: Vec<f32> = (0..(1 << 22)).map(|i| (i % 1000) as f32).collect();
        let h = c.all_reduce_async(original.clone(), ReduceOp::Sum, 7);
        if rank == 0 {
            h.cancel();
        }
        let (buf, r) = h.wait();
        match r {
            Err(Error::Cancelled { tag: 7, reason }) => {
                assert!(reason.contains("cancelled by peer"), "{reason}")
            }
            // The operation may finish before the cancel lands; then it is a plain success.
            Ok(_) => println!("NOTE cancel raced completion"),
            Err(e) => panic!("expected a cancel, got {e}"),
        }
        if buf != original {
            assert!(
                buf.iter().zip(&original).all(|(b, o)| *b == 2.0 * o),
                "either restored or fully reduced"
            );
        }

        // Deadline: rank 1 joins tag 8 late; rank 0's deadline passes, both see a timeout naming
        // the tag, inputs restored.
        let start = Instant::now();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(1200));
        }
        let h = c.all_reduce_async_timeout(
            original.clone(),
            ReduceOp::Sum,
            8,
            Duration::from_millis(400),
        );
        let (buf, r) = h.wait();
        let e = r.unwrap_err();
        assert!(
            matches!(&e, Error::Timeout(m) if m.contains('8') && m.contains("timed out")),
            "{e}"
        );
        assert_eq!(buf, original, "in-place input restored after the timeout");
        if rank == 0 {
            let took = start.elapsed();
            assert!(
                took < Duration::from_millis(1400),
                "timed out after {took:?}"
            );
            println!("TIMEOUT_MS {}", took.as_millis());
        }
    }
    // Resynchronise (rank 0 may be ahead by the sleep), then a worker panic on rank 1 for tag 9.
    comm.all_reduce_in_place(&mut [0f32; 4], ReduceOp::Sum, 50)
        .unwrap();
    let mut buf = vec![3.0f32; 1 << 16];
    let e = comm
        .all_reduce_in_place(&mut buf, ReduceOp::Sum, 9)
        .unwrap_err();
    assert!(
        e.to_string().contains("injected fault"),
        "the panic message reaches every peer: {e}"
    );
    assert!(buf.iter().all(|x| *x == 3.0), "input restored");
    // The communicator still works.
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, 10)
        .expect("usable after the panic");
    assert!(buf.iter().all(|x| *x == 6.0));
    println!("OK");
}

#[test]
fn duplicate_tags_cancel_deadlines_panics_and_thread_bound() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers = vec![
        spawn_peer("peer_failures", &[("MASTER", master.addr.clone())]),
        spawn_peer(
            "peer_failures",
            &[
                ("MASTER", master.addr.clone()),
                ("CONCORD_FAULT_PANIC_TAG", "9".into()),
            ],
        ),
    ];
    for p in peers {
        let (ok, out) = wait_output(p, Duration::from_secs(120));
        assert!(ok && out.contains("OK"), "peer failed:\n{out}");
        for l in lines_with(&out, "TIMEOUT_MS ") {
            println!("deadline 400 ms -> error after {l} ms");
        }
    }
}
