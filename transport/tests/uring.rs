//! The io_uring backend over loopback: frames both ways, short sends, timeouts, cross-thread
//! shutdown, zero-copy and fixed-buffer receives, and the counters that prove io_uring ran.
//!
//! Every test skips loudly (`SKIPPED: io_uring unavailable: <reason>` on stderr) where io_uring
//! cannot run. The tests hold one lock so that the process-wide counters can be compared exactly.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use concord_transport::buffers::PinnedPool;
use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::handshake::DataHello;
use concord_transport::socket;
use concord_transport::uring::{probe, uring_stats, UringStream};
use socket2::SockRef;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the test lock, or returns `None` after printing why io_uring tests cannot run.
fn uring_or_skip() -> Option<MutexGuard<'static, ()>> {
    match probe() {
        Ok(_) => Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner())),
        Err(why) => {
            skip_loudly(format!("SKIPPED: io_uring unavailable: {why}"));
            None
        }
    }
}

/// A connected loopback pair (client, server).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

fn uring_pair() -> (UringStream, UringStream) {
    let (a, b) = pair();
    (UringStream::new(a).unwrap(), UringStream::new(b).unwrap())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed * 7) as u8)
        .collect()
}

fn header(len: usize, seq: u64, sub: u32) -> DataHeader {
    DataHeader {
        len: len as u32,
        tag: 42,
        seq,
        step: 1,
        sub,
    }
}

/// Sends one frame from `tx` and checks that `rx` gets exactly it.
fn one_frame(tx: &mut UringStream, rx: &mut UringStream, len: usize, seq: u64) {
    let payload = pattern(len, seq);
    let sent = header(len, seq, 3);
    std::thread::scope(|s| {
        let writer = s.spawn(|| tx.write_frame(&sent, &payload));
        let got = rx.read_header().unwrap();
        assert_eq!(got, sent);
        let mut body = vec![0xAAu8; got.len as usize];
        rx.read_exact(&mut body).unwrap();
        assert!(body == payload, "payload of {len} B differs");
        writer.join().unwrap().unwrap();
    });
}

#[test]
fn probe_answers_and_is_cached() {
    match probe() {
        Ok(info) => {
            eprintln!("io_uring available: {info:?}");
            assert!(!info.kernel_release.is_empty());
        }
        Err(why) => {
            skip_loudly(format!("SKIPPED: io_uring unavailable: {why}"));
            assert!(!why.is_empty());
        }
    }
    assert_eq!(probe(), probe());
}

#[test]
fn frames_round_trip_both_directions() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    for (i, len) in [0usize, 1, 4096 + 3, 1 << 20].into_iter().enumerate() {
        one_frame(&mut a, &mut b, len, 2 * i as u64);
        one_frame(&mut b, &mut a, len, 2 * i as u64 + 1);
    }
}

#[test]
fn a_stream_of_many_frames_arrives_in_order() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut tx, mut rx) = uring_pair();
    const FRAMES: u64 = 2000;
    let len_of = |k: u64| ((k * 7919) % 70_000) as usize;
    std::thread::scope(|s| {
        s.spawn(move || {
            for k in 0..FRAMES {
                let len = len_of(k);
                tx.write_frame(&header(len, k, k as u32), &pattern(len, k))
                    .unwrap();
            }
        });
        let mut body = vec![0u8; 70_000];
        for k in 0..FRAMES {
            let h = rx.read_header().unwrap();
            assert_eq!(h, header(len_of(k), k, k as u32));
            rx.read_exact(&mut body[..h.len as usize]).unwrap();
            assert!(
                body[..h.len as usize] == pattern(h.len as usize, k),
                "frame {k}"
            );
        }
    });
}

#[test]
fn uring_and_socket_ends_interoperate() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (a, mut b) = pair();
    let mut a = UringStream::new(a).unwrap();
    let payload = pattern(300_000, 5);
    let h = header(payload.len(), 9, 0);
    std::thread::scope(|s| {
        s.spawn(|| a.write_frame(&h, &payload).unwrap());
        assert_eq!(socket::read_header(&mut b).unwrap(), h);
        let mut body = vec![0u8; payload.len()];
        b.read_exact(&mut body).unwrap();
        assert!(body == payload);
    });
    std::thread::scope(|s| {
        s.spawn(|| socket::write_frame(&mut b, &h, &payload).unwrap());
        assert_eq!(a.read_header().unwrap(), h);
        let mut body = vec![0u8; payload.len()];
        a.read_exact(&mut body).unwrap();
        assert!(body == payload);
    });
    // Read and Write let generic code such as the handshake run over the ring.
    let hello = DataHello {
        epoch: 1,
        from: 2,
        to: 3,
        conn_index: 0,
        conn_count: 1,
    };
    let key = concord_transport::auth::EpochKey::derive(
        None,
        concord_transport::auth::KeyPurpose::Ring,
        1,
        77,
    );
    hello.send(&key, &mut a).unwrap();
    let got = DataHello::receive(&mut b).unwrap();
    assert_eq!(got.hello, hello);
    assert!(got.verify(&key));
}

#[test]
fn short_sends_are_resubmitted() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (a, b) = pair();
    // Only the sender's buffer is small: a tiny receive window would stall loopback TCP on its
    // persist timer (silly-window avoidance) and make the test slow, not better.
    SockRef::from(&a).set_send_buffer_size(4096).unwrap();
    let (mut tx, mut rx) = (UringStream::new(a).unwrap(), UringStream::new(b).unwrap());
    let payload = pattern(1 << 20, 1);
    for waitall in [false, true] {
        tx.set_send_waitall(waitall);
        let before = uring_stats();
        std::thread::scope(|s| {
            s.spawn(|| {
                tx.write_frame(&header(payload.len(), 1, 0), &payload)
                    .unwrap()
            });
            let h = rx.read_header().unwrap();
            let mut body = vec![0u8; h.len as usize];
            // A slow reader in small pieces keeps the sender's buffer full.
            for piece in body.chunks_mut(64 * 1024) {
                std::thread::sleep(Duration::from_millis(2));
                rx.read_exact(piece).unwrap();
            }
            assert!(body == payload, "waitall={waitall}");
        });
        let d = uring_stats().since(&before);
        eprintln!("waitall={waitall}: {d:?}");
        assert_eq!(d.bytes_sent, (HEADER_BYTES + payload.len()) as u64);
        if !waitall {
            assert!(
                d.short_sends > 0,
                "a 4 KiB send buffer cannot take 1 MiB at once: {d:?}"
            );
        }
    }
}

/// The socket is the ring's registered file, so operations skip the descriptor lookup; a
/// stream that names it by descriptor (where registration fails) carries frames the same.
#[test]
fn sockets_are_registered_files_and_descriptors_work_too() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    assert!(
        a.has_fixed_file() && b.has_fixed_file(),
        "IORING_REGISTER_FILES exists since Linux 5.1; the probe needs 5.6"
    );
    a.set_direct_max(0);
    b.set_direct_max(0);
    one_frame(&mut a, &mut b, 300_000, 1);
    one_frame(&mut b, &mut a, 200_000, 2);
    a.use_descriptor();
    b.use_descriptor();
    assert!(!a.has_fixed_file());
    one_frame(&mut a, &mut b, 300_000, 3);
    one_frame(&mut b, &mut a, 200_000, 4);
}

#[test]
fn a_silent_peer_times_out() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    silent_peer_times_out(false);
}

/// The same with a linked `IORING_OP_LINK_TIMEOUT` on every operation (what kernels before
/// 5.11, which cannot give a wait its own timeout, run).
#[test]
fn a_silent_peer_times_out_with_linked_timeouts() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    silent_peer_times_out(true);
}

fn silent_peer_times_out(linked: bool) {
    let (mut a, mut b) = uring_pair();
    if linked {
        a.force_linked_timeouts();
    } else if !a.wait_timeouts() {
        skip_loudly(
            "SKIPPED (in part): this kernel has no IORING_FEAT_EXT_ARG; linked timeouts only"
                .into(),
        );
    }
    a.set_io_timeout(Some(Duration::from_millis(200)));
    let before = uring_stats();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let err = a.read_exact(&mut buf).unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Through the ring: the peer sends part of what is expected, then falls silent. The part
    // is progress; the silence after it is the timeout.
    let mut big_read = vec![0u8; 1 << 20];
    let part = pattern(300_000, 5);
    b.write_all(&part).unwrap();
    let start = Instant::now();
    let err = a.read_exact(&mut big_read).unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(
        big_read[..part.len()] == part[..],
        "the part that came was kept"
    );
    // A peer that stops reading stalls the sender: the send side times out too.
    SockRef::from(a.as_tcp())
        .set_send_buffer_size(4096)
        .unwrap();
    let big = vec![1u8; 16 << 20];
    let err = a.write_frame(&header(big.len(), 0, 0), &big).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(uring_stats().since(&before).timeouts >= 3);
    drop(b);
}

#[test]
fn the_socket_read_timeout_becomes_the_io_timeout() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (a, _b) = pair();
    a.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut a = UringStream::new(a).unwrap();
    // SO_RCVTIMEO is kept in jiffies: it may read back a few ms longer.
    let t = a.io_timeout().expect("the timeout carries over");
    assert!(
        t >= Duration::from_millis(150) && t < Duration::from_millis(200),
        "{t:?}"
    );
    let err = a.read_exact(&mut [0u8; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
}

#[test]
fn shutdown_from_another_thread_wakes_a_blocked_read_and_write() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, b) = uring_pair();
    assert_eq!(
        a.io_timeout(),
        None,
        "no timeout: only the shutdown can end the wait"
    );
    let handle = a.shutdown_handle();
    let reader = std::thread::spawn(move || {
        let start = Instant::now();
        let r = a.read_exact(&mut [0u8; 1024]);
        (r, start.elapsed(), a)
    });
    std::thread::sleep(Duration::from_millis(100));
    let shut_at = Instant::now();
    handle.shutdown();
    let (r, waited, _a) = reader.join().unwrap();
    let err = r.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    assert!(
        waited >= Duration::from_millis(90),
        "it really blocked: {waited:?}"
    );
    assert!(
        shut_at.elapsed() < Duration::from_millis(500),
        "woke promptly"
    );
    assert!(handle.is_shut_down());
    drop(b);

    // A writer blocked on a peer that does not read.
    let (x, _y) = pair();
    SockRef::from(&x).set_send_buffer_size(4096).unwrap();
    let mut x = UringStream::new(x).unwrap();
    let handle = x.shutdown_handle();
    let writer = std::thread::spawn(move || {
        let big = vec![3u8; 32 << 20];
        x.write_frame(&header(big.len(), 0, 0), &big)
    });
    std::thread::sleep(Duration::from_millis(100));
    let shut_at = Instant::now();
    handle.shutdown();
    let err = writer.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    assert!(shut_at.elapsed() < Duration::from_millis(500));
}

#[test]
fn a_closed_peer_is_unexpected_eof() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    b.write_all(b"abc").unwrap();
    drop(b);
    let err = a.read_exact(&mut [0u8; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(a.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn counters_show_that_io_uring_carried_the_data() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    // Every byte through the ring (the header alone could take the small-transfer syscall).
    a.set_direct_max(0);
    b.set_direct_max(0);
    let before = uring_stats();
    one_frame(&mut a, &mut b, 100_000, 1);
    let d = uring_stats().since(&before);
    let frame = (HEADER_BYTES + 100_000) as u64;
    assert_eq!(d.bytes_sent, frame, "{d:?}");
    assert_eq!(d.bytes_received, frame, "{d:?}");
    assert!(
        d.sqes >= 3 && d.enters >= 3,
        "one send, two receives: {d:?}"
    );
}

#[test]
fn small_transfers_skip_the_ring() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    let small = pattern(1000, 7);
    let frame = (HEADER_BYTES + small.len()) as u64;

    // An empty socket buffer takes a small frame at once: one plain sendmsg, no ring.
    let before = uring_stats();
    a.write_frame(&header(small.len(), 1, 0), &small).unwrap();
    let d = uring_stats().since(&before);
    assert_eq!((d.direct_bytes_sent, d.bytes_sent), (frame, 0), "{d:?}");

    // Already arrived: plain recv calls, no ring.
    std::thread::sleep(Duration::from_millis(50));
    let before = uring_stats();
    assert!(read_frame(&mut b).1 == small);
    let d = uring_stats().since(&before);
    assert_eq!(
        (d.direct_bytes_received, d.bytes_received),
        (frame, 0),
        "{d:?}"
    );

    // Not there yet: the read waits in poll(2) for it, still without the ring.
    let before = uring_stats();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            a.write_frame(&header(small.len(), 2, 0), &small).unwrap();
        });
        let (h, body) = read_frame(&mut b);
        assert!(h.seq == 2 && body == small);
    });
    let d = uring_stats().since(&before);
    assert_eq!(
        (d.direct_bytes_received, d.bytes_received),
        (frame, 0),
        "{d:?}"
    );

    // A payload of exactly DIRECT_MAX_BYTES (the smallest sub-chunk of a small collective):
    // its frame, header included, still skips the ring on both ends.
    let edge = pattern(concord_transport::uring::DIRECT_MAX_BYTES, 8);
    let before = uring_stats();
    a.write_frame(&header(edge.len(), 3, 0), &edge).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(read_frame(&mut b).1 == edge);
    let d = uring_stats().since(&before);
    let edge_frame = (HEADER_BYTES + edge.len()) as u64;
    assert_eq!(
        (d.direct_bytes_sent, d.bytes_sent),
        (edge_frame, 0),
        "{d:?}"
    );
    assert_eq!(
        (d.direct_bytes_received, d.bytes_received),
        (edge_frame, 0),
        "{d:?}"
    );

    // Larger than DIRECT_MAX_BYTES: the ring carries all of it.
    let big = pattern(concord_transport::uring::DIRECT_MAX_BYTES + 1, 9);
    let before = uring_stats();
    std::thread::scope(|s| {
        s.spawn(|| a.write_frame(&header(big.len(), 4, 0), &big).unwrap());
        assert!(read_frame(&mut b).1 == big);
    });
    let d = uring_stats().since(&before);
    assert_eq!(d.bytes_sent, (HEADER_BYTES + big.len()) as u64, "{d:?}");
    assert_eq!(d.direct_bytes_sent, 0, "{d:?}");
    assert_eq!(
        d.bytes_received,
        big.len() as u64,
        "the payload through the ring: {d:?}"
    );
}

/// One frame's header and payload, read with `read_header` and `read_exact`.
fn read_frame(rx: &mut UringStream) -> (DataHeader, Vec<u8>) {
    let h = rx.read_header().unwrap();
    let mut body = vec![0u8; h.len as usize];
    rx.read_exact(&mut body).unwrap();
    (h, body)
}

#[test]
fn zero_copy_sends_round_trip() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    if let Err(e) = a.set_zero_copy(true) {
        skip_loudly(format!("SKIPPED: zero-copy send unavailable: {e}"));
        return;
    }
    assert!(a.zero_copy());
    let before = uring_stats();
    for (i, len) in [0usize, 1, 4099, 1 << 20].into_iter().enumerate() {
        one_frame(&mut a, &mut b, len, i as u64);
    }
    let d = uring_stats().since(&before);
    eprintln!(
        "zero-copy: {d:?} (zc_copied counts sends the kernel copied anyway, as over loopback)"
    );
    assert!(d.zc_sends >= 4, "{d:?}");
}

#[test]
fn fixed_buffer_receives_land_in_the_pool() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    let (mut a, mut b) = uring_pair();
    // Small reads would take a plain recv when their bytes are already there: count the ring's.
    b.set_direct_max(0);
    let pool = PinnedPool::new(2, 256 * 1024).unwrap();
    if let Some(why) = pool.degraded_reason() {
        eprintln!("note: {why}");
    }
    let registered = b.register_pool(&pool);
    if !registered {
        eprintln!(
            "note: fixed buffers not registered ({}); testing the fallback",
            b.fixed_buffers_reason().unwrap_or("?")
        );
    }
    let before = uring_stats();
    let mut buf = pool.acquire();
    for (k, len) in [1usize, 4099, 256 * 1024].into_iter().enumerate() {
        let payload = pattern(len, k as u64);
        std::thread::scope(|s| {
            s.spawn(|| a.write_frame(&header(len, k as u64, 0), &payload).unwrap());
            let h = b.read_header().unwrap();
            b.read_exact_fixed(&mut buf, h.len as usize).unwrap();
            assert!(buf[..len] == payload[..], "{len} B");
        });
    }
    let d = uring_stats().since(&before);
    if registered {
        assert!(d.fixed_reads >= 3, "{d:?}");
    } else {
        assert_eq!(d.fixed_reads, 0, "{d:?}");
    }
    // A buffer of another pool falls back to a plain receive.
    let other = PinnedPool::new(1, 4096).unwrap();
    let mut foreign = other.acquire();
    std::thread::scope(|s| {
        s.spawn(|| a.write_all(b"xyz").unwrap());
        b.read_exact_fixed(&mut foreign, 3).unwrap();
    });
    assert_eq!(&foreign[..3], b"xyz");
}

#[test]
fn streams_move_between_threads_and_run_concurrently() {
    let Some(_serial) = uring_or_skip() else {
        return;
    };
    // Two connections, each driven by its own pair of threads at once.
    let conns: Vec<(UringStream, UringStream)> = (0..2).map(|_| uring_pair()).collect();
    std::thread::scope(|s| {
        for (c, (mut tx, mut rx)) in conns.into_iter().enumerate() {
            s.spawn(move || {
                for k in 0..50u64 {
                    let len = 50_000 + k as usize;
                    tx.write_frame(&header(len, k, c as u32), &pattern(len, k + c as u64))
                        .unwrap();
                }
            });
            s.spawn(move || {
                let mut body = vec![0u8; 60_000];
                for k in 0..50u64 {
                    let h = rx.read_header().unwrap();
                    assert_eq!(h.sub, c as u32);
                    rx.read_exact(&mut body[..h.len as usize]).unwrap();
                    assert!(body[..h.len as usize] == pattern(h.len as usize, k + c as u64));
                }
            });
        }
    });
}

/// Says why a test is skipped on the real stderr: the test harness captures `eprintln!`, and a
/// skip must be visible in a plain `cargo test`.
fn skip_loudly(message: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
