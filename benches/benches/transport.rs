//! Frame transport over loopback: blocking sockets vs io_uring `SENDMSG` vs io_uring
//! `SENDMSG_ZC` (zero-copy), and the receive side with and without registered buffers.
//!
//! `send/uring_timeout` adds an I/O timeout (a timed wait, or the linked `IORING_OP_LINK_TIMEOUT`
//! of kernels before 5.11), as the engine runs it. `send/*`: the measured thread writes frames; a helper thread reads them with plain blocking
//! reads, so only the send path differs. `recv/*`: a helper thread writes with plain blocking
//! writes and the measured thread reads. Each sample ends when the other side has everything, so
//! the figures are end-to-end throughput (GB/s = 10^9 B/s of payload).
//!
//! Run: `cargo bench -p concord-benches --bench transport`. Where io_uring cannot run, its cases
//! are skipped with the reason on stderr.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_transport::buffers::PinnedPool;
use concord_transport::frame::DataHeader;
use concord_transport::socket;
use concord_transport::uring::{probe, uring_stats, UringStream};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SEND_SIZES: [usize; 3] = [128 << 10, 512 << 10, 1 << 20];
const RECV_SIZE: usize = 1 << 20;

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn header(len: usize) -> DataHeader {
    DataHeader {
        len: len as u32,
        tag: 1,
        seq: 1,
        step: 0,
        sub: 0,
    }
}

/// The far end of a connection: told how many frames to read (or write), says when done.
struct Peer {
    go: Option<mpsc::Sender<u64>>,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    /// A thread that reads frames of `len` bytes with blocking reads.
    fn reader(mut stream: TcpStream, len: usize) -> Peer {
        Peer::spawn(move |frames| {
            let mut body = vec![0u8; len];
            for _ in 0..frames {
                let h = socket::read_header(&mut stream).expect("header");
                stream
                    .read_exact(&mut body[..h.len as usize])
                    .expect("payload");
            }
        })
    }

    /// A thread that writes frames of `len` bytes with blocking writes.
    fn writer(mut stream: TcpStream, len: usize) -> Peer {
        Peer::spawn(move |frames| {
            let payload = vec![7u8; len];
            for _ in 0..frames {
                socket::write_frame(&mut stream, &header(len), &payload).expect("write");
            }
        })
    }

    fn spawn(mut work: impl FnMut(u64) + Send + 'static) -> Peer {
        let (go, go_rx) = mpsc::channel::<u64>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            for frames in go_rx {
                work(frames);
                done_tx.send(()).expect("bench alive");
            }
        });
        Peer {
            go: Some(go),
            done,
            thread: Some(thread),
        }
    }

    /// Times `frames` frames: starts the peer, runs `mine`, waits for the peer.
    fn time(&self, frames: u64, mine: impl FnOnce()) -> Duration {
        let start = Instant::now();
        self.go
            .as_ref()
            .expect("open")
            .send(frames)
            .expect("peer alive");
        mine();
        self.done.recv().expect("peer finished");
        start.elapsed()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.go.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bench(c: &mut Criterion) {
    let uring = probe();
    if let Err(why) = &uring {
        eprintln!("SKIPPED: io_uring unavailable: {why} (only the socket cases run)");
    }
    let mut g = c.benchmark_group("transport");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    for bytes in SEND_SIZES {
        g.throughput(Throughput::Bytes(bytes as u64));
        let payload = vec![3u8; bytes];
        let h = header(bytes);
        {
            let (mut tx, rx) = pair();
            let peer = Peer::reader(rx, bytes);
            g.bench_function(BenchmarkId::new("send/socket", bytes), |b| {
                b.iter_custom(|n| {
                    peer.time(n, || {
                        for _ in 0..n {
                            socket::write_frame(&mut tx, &h, &payload).expect("send");
                        }
                    })
                })
            });
        }
        if uring.is_err() {
            continue;
        }
        let cases = [
            ("send/uring", false, None),
            ("send/uring_timeout", false, Some(Duration::from_secs(10))),
            ("send/uring_zc", true, None),
        ];
        for (id, zc, timeout) in cases {
            let (tx, rx) = pair();
            let mut tx = UringStream::new(tx).expect("io_uring stream");
            // An I/O timeout on every submission, as the engine runs it.
            tx.set_io_timeout(timeout);
            if zc && tx.set_zero_copy(true).is_err() {
                eprintln!("SKIPPED: {id}: this kernel has no SENDMSG_ZC");
                continue;
            }
            let peer = Peer::reader(rx, bytes);
            let before = uring_stats();
            g.bench_function(BenchmarkId::new(id, bytes), |b| {
                b.iter_custom(|n| {
                    peer.time(n, || {
                        for _ in 0..n {
                            tx.write_frame(&h, &payload).expect("send");
                        }
                    })
                })
            });
            let d = uring_stats().since(&before);
            if zc {
                eprintln!(
                    "{id}/{bytes}: {} zero-copy sends, {} of them copied by the kernel anyway",
                    d.zc_sends, d.zc_copied
                );
            }
        }
    }

    g.throughput(Throughput::Bytes(RECV_SIZE as u64));
    {
        let (tx, mut rx) = pair();
        let peer = Peer::writer(tx, RECV_SIZE);
        let mut body = vec![0u8; RECV_SIZE];
        g.bench_function(BenchmarkId::new("recv/socket", RECV_SIZE), |b| {
            b.iter_custom(|n| {
                peer.time(n, || {
                    for _ in 0..n {
                        let h = socket::read_header(&mut rx).expect("header");
                        rx.read_exact(&mut body[..h.len as usize]).expect("recv");
                    }
                })
            })
        });
    }
    if uring.is_ok() {
        let pool = PinnedPool::new(1, RECV_SIZE).expect("staging pool");
        for (id, fixed) in [("recv/uring", false), ("recv/uring_fixed", true)] {
            let (tx, rx) = pair();
            let mut rx = UringStream::new(rx).expect("io_uring stream");
            if fixed && !rx.register_pool(&pool) {
                eprintln!(
                    "SKIPPED: {id}: {}",
                    rx.fixed_buffers_reason().unwrap_or("registration failed")
                );
                continue;
            }
            let peer = Peer::writer(tx, RECV_SIZE);
            let mut buf = pool.acquire();
            let mut body = vec![0u8; RECV_SIZE];
            g.bench_function(BenchmarkId::new(id, RECV_SIZE), |b| {
                b.iter_custom(|n| {
                    peer.time(n, || {
                        for _ in 0..n {
                            let h = rx.read_header().expect("header");
                            let len = h.len as usize;
                            if fixed {
                                rx.read_exact_fixed(&mut buf, len).expect("recv");
                            } else {
                                rx.read_exact(&mut body[..len]).expect("recv");
                            }
                        }
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
