//! Only invited peers join: a master given a run token admits the peers that prove it and
//! refuses, with a reason and a log line, every other; a data port refuses hellos not signed
//! with the epoch's key; a master beyond loopback without a token does not start.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use concord::{Error, ReduceOp, RunToken};
use concord_master::proto::{decode_master, encode_peer, split_frame, MasterMsg, PeerMsg};
use concord_transport::auth::{EpochKey, KeyPurpose};
use concord_transport::handshake::{read_reply, DataHello, HelloStatus};

const TOKEN: &str = "d6f1c0a4e2b94c7f8a3e51b0c9d2f7a6";

/// A token file readable only by its owner, in a directory of its own.
fn token_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("concord-token-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, format!("{text}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

fn tokened_master(name: &str) -> MasterProcess {
    let path = token_file(name, TOKEN);
    MasterProcess::start_with(&["--token-file", path.to_str().unwrap()])
}

fn connect(addr: &str, token: Option<&str>) -> Result<concord::Communicator, Error> {
    let mut b = concord::Communicator::builder(addr)
        .connect_timeout(Duration::from_secs(5))
        .join_timeout(Duration::from_secs(10));
    if let Some(t) = token {
        b = b.token(RunToken::new(t).unwrap());
    }
    b.connect()
}

/// Peer side: joins with the token of `CONCORD_TOKEN`, listening for data on `DATA_PORT`,
/// then reduces and checks the sum.
#[test]
fn token_peer() {
    if !is_peer() {
        return;
    }
    let master = std::env::var("MASTER").unwrap();
    let port: u16 = std::env::var("DATA_PORT").unwrap().parse().unwrap();
    let mut comm = concord::Communicator::builder(master)
        .data_listen(format!("127.0.0.1:{port}").parse().unwrap())
        .op_timeout(Duration::from_secs(60))
        .connect()
        .expect("a peer holding the token joins");
    comm.wait_for_world(2, Duration::from_secs(60)).unwrap();
    let mut buf: Vec<f32> = (0..50_000)
        .map(|i| (i % 7) as f32 + comm.rank() as f32)
        .collect();
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, 1)
        .expect("all-reduce");
    let exact = (0..50_000).all(|i| buf[i] == 2.0 * (i % 7) as f32 + 1.0);
    println!("SUM {}", if exact { "exact" } else { "wrong" });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_token_peer(master: &MasterProcess, port: u16) -> Child {
    spawn_peer(
        "token_peer",
        &[
            ("MASTER", master.addr.clone()),
            ("DATA_PORT", port.to_string()),
            ("CONCORD_TOKEN", TOKEN.to_string()),
        ],
    )
}

#[test]
fn invited_peers_join_and_strangers_are_refused_on_both_planes() {
    if is_peer() {
        return;
    }
    let master = tokened_master("both-planes");
    let (port_a, port_b) = (free_port(), free_port());
    let a = spawn_token_peer(&master, port_a);

    // A stranger at peer A's data port, before the ring of two is built: it names plausible
    // ids and epochs but cannot sign for the epoch, with no token or another run's.
    let strangers: Vec<TcpStream> = [None, Some("another run's token 1234")]
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let mut s = (0..500)
                .find_map(|_| {
                    TcpStream::connect(("127.0.0.1", port_a)).ok().or_else(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        None
                    })
                })
                .expect("peer A listens for data");
            let token = token.map(|t| RunToken::new(t).unwrap());
            let key = EpochKey::derive(token.as_ref(), KeyPurpose::Ring, 2, i as u64);
            DataHello {
                epoch: 2,
                from: 2,
                to: 1,
                conn_index: 0,
                conn_count: 2,
            }
            .send(&key, &mut s)
            .unwrap();
            s
        })
        .collect();

    let b = spawn_token_peer(&master, port_b);
    for s in strangers {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        assert_eq!(
            read_reply(&mut s).expect("the data port answers the stranger"),
            HelloStatus::Refused
        );
    }
    for p in [a, b] {
        let (ok, out) = wait_output(p, Duration::from_secs(90));
        assert!(ok, "a peer holding the token failed:\n{out}");
        assert_eq!(lines_with(&out, "SUM "), vec!["exact"], "{out}");
    }

    // Control plane: a peer with another token is refused by the master, one without a token
    // learns that the master needs one; neither is registered.
    let err = connect(&master.addr, Some("another run's token 1234")).unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    assert!(err.to_string().contains("not invited"), "{err}");
    let err = connect(&master.addr, None).unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
    assert!(err.to_string().contains("requires a run token"), "{err}");

    // The master logged who was refused, and never the token.
    let log = master.log();
    assert!(
        log.lines()
            .any(|l| l.contains("not invited") && l.contains("127.0.0.1")),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the master logged the token:\n{log}");
}

/// A hand-written client that answers the challenge with a made-up proof is refused and closed;
/// one that skips the proof is kicked.
#[test]
fn a_forged_proof_is_refused() {
    if is_peer() {
        return;
    }
    let master = tokened_master("forged");
    let hello = encode_peer(&PeerMsg::Hello {
        version: concord_transport::PROTOCOL_VERSION,
        data_port: 1,
        advertise_ip: String::new(),
        group: 0,
        nonce: [1; 32],
    });
    let mut s = TcpStream::connect(&master.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello).unwrap();
    match read_master_msg(&mut s) {
        Some(MasterMsg::Challenge { token_required, .. }) => assert!(token_required),
        other => panic!("expected a challenge, got {other:?}"),
    }
    s.write_all(&encode_peer(&PeerMsg::Proof { proof: [0; 32] }))
        .unwrap();
    match read_master_msg(&mut s) {
        Some(MasterMsg::Refused { reason, .. }) => {
            assert!(reason.contains("not invited"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let mut s = TcpStream::connect(&master.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello).unwrap();
    assert!(matches!(
        read_master_msg(&mut s),
        Some(MasterMsg::Challenge { .. })
    ));
    s.write_all(&encode_peer(&PeerMsg::AcceptVote)).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let kicked = split_frame(&rest)
        .ok()
        .flatten()
        .and_then(|(body, _)| decode_master(body).ok());
    match kicked {
        Some(MasterMsg::Kicked { reason }) => assert!(reason.contains("Proof"), "{reason}"),
        other => panic!("expected a kick, got {other:?}"),
    }
}

/// A peer given a token does not join a master without one: that master could be anyone's.
#[test]
fn a_peer_with_a_token_refuses_a_master_without_one() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let err = connect(&master.addr, Some(TOKEN)).unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err}");
    assert!(err.to_string().contains("--insecure"), "{err}");
    // Without a token on either side, loopback works as before.
    connect(&master.addr, None).expect("a loopback master without a token admits peers");
}

fn master_output(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(concord_bin())
        .arg("master")
        .args(args)
        .env_remove("CONCORD_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // A master that started keeps running: read its first line, then stop it.
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while stderr.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        out.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&out).into_owned();
    if line.contains("listening on") {
        let _ = child.kill();
        let _ = child.wait();
        return (true, line);
    }
    (child.wait().unwrap().success(), line)
}

#[test]
fn a_master_beyond_loopback_needs_a_token_or_insecure() {
    if is_peer() {
        return;
    }
    let (ok, out) = master_output(&["--listen", "0.0.0.0:0"]);
    assert!(!ok, "the master started without a token: {out}");
    assert!(
        out.contains("--insecure") && out.contains("--token-file"),
        "{out}"
    );
    let (ok, out) = master_output(&["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(ok && out.contains("listening on 0.0.0.0:"), "{out}");
    let path = token_file("beyond", TOKEN);
    let (ok, out) = master_output(&[
        "--listen",
        "0.0.0.0:0",
        "--token-file",
        path.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("listening on 0.0.0.0:"), "{out}");
    // A token too short to be secret is refused, naming the limit.
    let short = token_file("short", "abc");
    let (ok, out) = master_output(&["--token-file", short.to_str().unwrap()]);
    assert!(!ok && out.contains("at least 16"), "{out}");
}
