//! The master against hostile clients on loopback: connections that close without a word or
//! half-way through a frame, floods from one address, and a master out of descriptors. After
//! each, the master holds no more descriptors than before, runs one thread, and a real group
//! still forms and reduces.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use concord::ReduceOp;
use concord_master::proto::{encode_peer, MasterMsg, PeerMsg, MAX_MESSAGE_BYTES};

/// A `concord master` with extra flags and, optionally, a lower open-files limit; killed on drop.
struct Master {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Master {
    fn start(flags: &[&str], nofile: Option<u64>) -> Self {
        let mut cmd = Command::new(concord_bin());
        cmd.args(["master", "--listen", "127.0.0.1:0"])
            .args(flags)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            let lower = move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                // SAFETY: `lim` is a valid rlimit; lowering a limit needs no privilege.
                match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            };
            // SAFETY: the hook runs in the child between fork and exec; it calls only
            // setrlimit, which is async-signal-safe, and allocates nothing.
            unsafe { cmd.pre_exec(lower) };
        }
        let mut child = cmd.spawn().expect("start concord master");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .expect("master prints its address");
        let addr = line.trim().rsplit(' ').next().expect("address").to_string();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "unexpected master banner {line:?}"
        );
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let master = Master { child, addr, log };
        master.probe();
        master
    }

    /// Waits until the event loop runs (the banner comes before it): garbage gets a kick.
    fn probe(&self) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[0xff; 16]).unwrap();
        assert!(
            matches!(read_master_msg(&mut s), Some(MasterMsg::Kicked { .. })),
            "the master kicks garbage"
        );
        assert!(closed_by_master(&mut s, Duration::from_secs(5)));
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/pid/fd")
            .count()
    }

    /// Waits up to `within` for the master's descriptors to fall to at most `at_most`.
    fn wait_fds(&self, at_most: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let now = self.fds();
            if now <= at_most {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the master still holds {now} descriptors after {within:?}, expected at most {at_most}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Asserts the master is alive and runs one thread.
    fn assert_serving(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the master exited"
        );
        assert_eq!(thread_count(self.pid()), 1, "the master runs one thread");
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peer side: join a group of two, all-reduce, check the sum, print it.
#[test]
fn peer_pair() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let mut buf: Vec<f32> = (0..4096)
        .map(|i| (i % 13) as f32 + comm.rank() as f32)
        .collect();
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, 1)
        .expect("all-reduce");
    let exact = (0..4096).all(|i| buf[i] == 2.0 * (i % 13) as f32 + 1.0);
    println!("SUM {}", if exact { "exact" } else { "wrong" });
}

/// A real group of two forms on `master` and reduces exactly, within a few seconds.
fn group_of_two_reduces(master: &Master) {
    let env = [("MASTER", master.addr.clone()), ("WORLD", "2".to_string())];
    let peers: Vec<Child> = (0..2).map(|_| spawn_peer("peer_pair", &env)).collect();
    for p in peers {
        let (ok, out) = wait_output(p, Duration::from_secs(30));
        assert!(ok, "peer failed:\n{out}");
        assert_eq!(lines_with(&out, "SUM "), vec!["exact"], "{out}");
    }
}

/// Whether the master closed `s` (after what it sent), within `within`.
fn closed_by_master(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut rest = [0u8; 4096];
    loop {
        match s.read(&mut rest) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn connections_that_vanish_leave_no_descriptor_or_buffer_behind() {
    if is_peer() {
        return;
    }
    // No per-address limit in the way: every one of them is admitted, then must be dropped.
    let mut master = Master::start(&["--max-connections-per-ip", "1000"], None);
    let baseline = master.fds();

    for _ in 0..200 {
        drop(TcpStream::connect(&master.addr).unwrap());
    }
    master.wait_fds(baseline + 1, Duration::from_secs(5));
    // A stranger's frame longer than a hello is refused at once, before it is buffered.
    let mut big = TcpStream::connect(&master.addr).unwrap();
    big.write_all(&((MAX_MESSAGE_BYTES - 4) as u32).to_le_bytes())
        .unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match read_master_msg(&mut big) {
        Some(MasterMsg::Kicked { reason }) => assert!(reason.contains("registered"), "{reason}"),
        other => panic!("expected a kick, got {other:?}"),
    }
    assert!(closed_by_master(&mut big, Duration::from_secs(5)));
    // Half of the largest frame a stranger may send, then gone: 30 partial read buffers.
    let limit = concord_master::coordinator::MAX_UNREGISTERED_MESSAGE_BYTES;
    let mut half_frame = ((limit - 4) as u32).to_le_bytes().to_vec();
    half_frame.resize(limit / 2, 0);
    let halves: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut s = TcpStream::connect(&master.addr).unwrap();
            s.write_all(&half_frame).unwrap();
            s
        })
        .collect();
    // While they are open the master holds them (so the count below can fail).
    let deadline = Instant::now() + Duration::from_secs(5);
    while master.fds() < baseline + 30 {
        assert!(
            Instant::now() < deadline,
            "the master never held all 30: {} descriptors, {baseline} before",
            master.fds()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(halves);

    master.wait_fds(baseline + 1, Duration::from_secs(5));
    master.assert_serving();
    group_of_two_reduces(&master);
    master.wait_fds(baseline + 1, Duration::from_secs(5));
    master.assert_serving();
}

#[test]
fn a_flood_from_one_address_is_refused_past_the_limit_and_logged_once() {
    if is_peer() {
        return;
    }
    let mut master = Master::start(
        &[
            "--max-connections-per-ip",
            "8",
            "--hello-timeout-ms",
            "60000",
        ],
        None,
    );
    let baseline = master.fds();
    let mut idle = Vec::new();
    let mut refused = 0;
    let start = Instant::now();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&master.addr).unwrap();
        // The master answers a refused connection at once; an admitted one hears nothing.
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        match read_master_msg(&mut s) {
            Some(MasterMsg::Refused { reason, .. }) => {
                assert!(
                    reason.contains("127.0.0.1") && reason.contains("--max-connections-per-ip"),
                    "{reason}"
                );
                assert!(closed_by_master(&mut s, Duration::from_secs(2)));
                refused += 1;
            }
            None => idle.push(s),
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((idle.len(), refused), (8, 12));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "refusals took {:?}",
        start.elapsed()
    );
    master.assert_serving();

    // A peer arriving now, its Hello sent, is refused with the reason, not left hanging.
    let mut s = TcpStream::connect(&master.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(&encode_peer(&PeerMsg::Hello {
        version: concord_transport::PROTOCOL_VERSION,
        data_port: 1,
        advertise_ip: String::new(),
        group: 0,
        nonce: [0; 32],
    }))
    .unwrap();
    match read_master_msg(&mut s) {
        Some(MasterMsg::Refused { reason, .. }) => {
            assert!(reason.contains("--max-connections-per-ip"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(s);

    drop(idle);
    master.wait_fds(baseline + 1, Duration::from_secs(5));
    group_of_two_reduces(&master);
    master.assert_serving();
    let log = master.log();
    assert_eq!(
        log.matches("refused a connection from 127.0.0.1").count(),
        1,
        "thirteen refusals of one address are logged once:\n{log}"
    );
}

/// Open connections to `addr`, without a word.
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn out_of_descriptors_the_master_rests_and_recovers() {
    if is_peer() {
        return;
    }
    // Connections allowed far past what 64 descriptors hold: `accept` fails with EMFILE.
    let mut master = Master::start(&["--max-connections", "1000"], Some(64));
    let baseline = master.fds();
    let idle = idle_connections(&master.addr, 120);
    let deadline = Instant::now() + Duration::from_secs(5);
    while master.fds() < 60 {
        assert!(
            Instant::now() < deadline,
            "the master never filled its table"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Out of descriptors with connections waiting, the loop rests rather than spins.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(master.pid());
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu_ticks(master.pid()) - before;
    assert!(
        used <= 10,
        "out of descriptors, the master used {used} ticks in 1 s"
    );
    master.assert_serving();
    assert!(master.log().contains("accept failed"), "{}", master.log());

    drop(idle);
    master.wait_fds(baseline + 1, Duration::from_secs(5));
    group_of_two_reduces(&master);
    master.assert_serving();
}

#[test]
fn under_a_small_descriptor_limit_the_default_refuses_before_running_out() {
    if is_peer() {
        return;
    }
    let mut master = Master::start(&[], Some(64));
    let baseline = master.fds();
    let mut conns = idle_connections(&master.addr, 100);
    let mut refused = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        if let Some(MasterMsg::Refused { reason, .. }) = read_master_msg(s) {
            assert!(reason.contains("--max-connections"), "{reason}");
            refused += 1;
        }
    }
    assert!(refused >= 40, "only {refused} of 100 refused");
    assert!(
        !master.log().contains("accept failed"),
        "the limit refused them before the descriptors ran out:\n{}",
        master.log()
    );
    master.assert_serving();
    drop(conns);
    master.wait_fds(baseline + 1, Duration::from_secs(5));
    group_of_two_reduces(&master);
    master.assert_serving();
}

/// Peer side: join a group of two with the run token, then `ROUNDS` all-reduces, each checked.
#[test]
fn peer_rounds() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let rounds: u64 = std::env::var("ROUNDS").unwrap().parse().unwrap();
    let mut wrong = 0;
    for round in 0..rounds {
        let mut buf: Vec<f32> = (0..65_536)
            .map(|i| ((i + round as usize) % 29) as f32 + comm.rank() as f32)
            .collect();
        comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, round)
            .expect("all-reduce beside hostile clients");
        let exact = (0..65_536).all(|i| buf[i] == 2.0 * ((i + round as usize) % 29) as f32 + 1.0);
        wrong += u64::from(!exact);
    }
    println!("ROUNDS {rounds} WRONG {wrong}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One round of every kind of hostile client; those that linger go to `held`.
fn hostile_batch(addr: &str, held: &mut Vec<TcpStream>, round: u64) {
    let connect = || TcpStream::connect(addr).ok();
    // Garbage, then gone.
    if let Some(mut s) = connect() {
        let junk: Vec<u8> = (0..64u64)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(round) >> 7) as u8)
            .collect();
        let _ = s.write_all(&junk);
    }
    // Connect and close (a health check, a port scan).
    drop(connect());
    // Oversized: a frame longer than anything a stranger may send.
    if let Some(mut s) = connect() {
        let _ = s.write_all(&(2u32 << 20).to_le_bytes());
        let _ = s.write_all(&[7u8; 1024]);
    }
    // A stranger: a hello, then a made-up proof.
    if let Some(mut s) = connect() {
        let hello = encode_peer(&PeerMsg::Hello {
            version: concord_transport::PROTOCOL_VERSION,
            data_port: 9,
            advertise_ip: String::new(),
            group: 0,
            nonce: [round as u8; 32],
        });
        let _ = s.write_all(&hello);
        let _ = s.write_all(&encode_peer(&PeerMsg::Proof { proof: [1; 32] }));
    }
    // Idle, slow (a byte of a hello), and half a frame: held for a while.
    if held.len() >= 30 {
        held.drain(..10);
    }
    if let Some(s) = connect() {
        held.push(s);
    }
    if let Some(mut s) = connect() {
        let _ = s.write_all(&[0x20]);
        held.push(s);
    }
    if let Some(mut s) = connect() {
        let _ = s.write_all(&4000u32.to_le_bytes());
        let _ = s.write_all(&[1u8; 2000]);
        held.push(s);
    }
}

/// Hostile clients of every kind, all the time a token-holding group reduces beside them: every
/// collective stays exact, and the master keeps one thread, its descriptors return to where
/// they were, and its memory stays flat.
#[test]
fn hostile_clients_beside_a_running_group_cost_the_master_nothing() {
    if is_peer() {
        return;
    }
    let token = "hostile soak token 5e1d0c9b";
    let token_file =
        std::env::temp_dir().join(format!("concord-hostile-{}.token", std::process::id()));
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut master = Master::start(&["--token-file", token_file.to_str().unwrap()], None);
    let baseline = master.fds();
    let rounds: u64 = std::env::var("CONCORD_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    let env = [
        ("MASTER", master.addr.clone()),
        ("WORLD", "2".to_string()),
        ("ROUNDS", rounds.to_string()),
        ("CONCORD_TOKEN", token.to_string()),
    ];
    let mut peers: Vec<Child> = (0..2).map(|_| spawn_peer("peer_rounds", &env)).collect();
    let mut held = Vec::new();
    let (mut batches, mut warm_rss) = (0u64, None);
    let start = Instant::now();
    while peers.iter_mut().any(|p| p.try_wait().unwrap().is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the group did not finish beside the hostile clients"
        );
        hostile_batch(&master.addr, &mut held, batches);
        batches += 1;
        if batches == 20 {
            warm_rss = Some(rss_kib(master.pid()));
        }
        if batches % 10 == 0 {
            master.assert_serving();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for p in peers {
        let (ok, out) = wait_output(p, Duration::from_secs(10));
        assert!(ok, "a peer failed beside hostile clients:\n{out}");
        assert_eq!(
            lines_with(&out, "ROUNDS "),
            vec![format!("{rounds} WRONG 0")],
            "{out}"
        );
    }
    let end_rss = rss_kib(master.pid());
    drop(held);
    master.assert_serving();
    master.wait_fds(baseline, Duration::from_secs(15));
    if let Some(warm) = warm_rss {
        assert!(
            end_rss <= warm + 8 * 1024,
            "the master grew from {warm} KiB to {end_rss} KiB over {batches} hostile batches"
        );
    }
    println!(
        "{batches} hostile batches beside {rounds} all-reduces; master RSS {} -> {end_rss} KiB",
        warm_rss.unwrap_or(0)
    );
    assert!(batches >= 20, "too few hostile batches ran ({batches})");
    let _ = std::fs::remove_file(token_file);
}
