//! Measuring one directed edge: a probe from this peer to another one's data port.
//!
//! The prober dials, sends a [`DataHello`] signed with the ring epoch's key and marked as a
//! probe (`conn_index` [`PROBE_INDEX`]), and once accepted times [`PINGS`] 8-byte round trips,
//! then streams up to `bytes` bytes (for at most `time`) in length-prefixed chunks closed by an
//! empty one; the server answers with the bytes it received, and the bandwidth is those bytes
//! over the time from the first chunk to the answer. The server checks the hello like a ring
//! connection's (epoch key, who calls, whom it calls) and refuses anything else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use concord_master::proto::PeerId;
use concord_transport::auth::EpochKey;
use concord_transport::handshake::{read_reply, write_reply, DataHello, HelloStatus};
use socket2::SockRef;

/// The `conn_index` that marks a hello as a probe's.
pub(crate) const PROBE_INDEX: u32 = u32::MAX;
/// Round trips timed per probe (the median is kept).
const PINGS: usize = 5;
/// Largest chunk of a probe's stream.
const CHUNK: usize = 1 << 20;

/// One directed edge as measured: bytes per second and round trip in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Edge {
    pub(crate) bandwidth: f64,
    pub(crate) rtt: f64,
}

/// What a probe needs to know.
pub(crate) struct ProbeSpec<'a> {
    pub(crate) key: &'a EpochKey,
    pub(crate) epoch: u64,
    pub(crate) me: PeerId,
    pub(crate) bytes: usize,
    pub(crate) time: Duration,
}

/// Measures the edge from this peer to `to` at `addr`.
pub(crate) fn probe(spec: &ProbeSpec<'_>, to: PeerId, addr: SocketAddr) -> Result<Edge, String> {
    let what = format!("probing peer {to} at {addr}");
    let mut s = TcpStream::connect_timeout(&addr, spec.time)
        .map_err(|e| format!("{what}: connecting: {e}"))?;
    let limit = Some(spec.time + Duration::from_secs(5));
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(limit))
        .and_then(|()| s.set_write_timeout(limit))
        .map_err(|e| format!("{what}: {e}"))?;
    DataHello {
        epoch: spec.epoch,
        from: spec.me,
        to,
        conn_index: PROBE_INDEX,
        conn_count: 0,
    }
    .send(spec.key, &mut s)
    .map_err(|e| format!("{what}: {e}"))?;
    match read_reply(&mut s).map_err(|e| format!("{what}: {e}"))? {
        HelloStatus::Ok => {}
        other => return Err(format!("{what}: refused ({other:?})")),
    }
    let io = |e: std::io::Error| format!("{what}: {e}");
    let mut rtts = Vec::with_capacity(PINGS);
    let mut echo = [0u8; 8];
    for k in 0..PINGS as u64 {
        let t = Instant::now();
        s.write_all(&k.to_le_bytes()).map_err(io)?;
        s.read_exact(&mut echo).map_err(io)?;
        rtts.push(t.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    let rtt = rtts[PINGS / 2];
    let zeros = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < spec.bytes && start.elapsed() < spec.time {
        let n = CHUNK.min(spec.bytes - sent);
        s.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
        s.write_all(&zeros[..n]).map_err(io)?;
        sent += n;
    }
    s.write_all(&0u32.to_le_bytes()).map_err(io)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).map_err(io)?;
    let secs = start.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(got);
    if received != sent as u64 {
        return Err(format!("{what}: it received {received} of {sent} bytes"));
    }
    Ok(Edge {
        bandwidth: sent as f64 / secs.max(1e-9),
        rtt,
    })
}

/// Serves the probe of peer `from` on `listener` until `deadline`: strangers and other callers
/// are refused, and waiting goes on for the expected one.
pub(crate) fn serve(
    listener: &TcpListener,
    spec: &ProbeSpec<'_>,
    from: PeerId,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("peer {from} sent no probe in time"));
        }
        SockRef::from(listener)
            .set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .map_err(|e| e.to_string())?;
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("accepting a probe: {e}")),
        };
        let limit = Some(left.max(Duration::from_millis(10)));
        if s.set_read_timeout(limit).is_err() || s.set_write_timeout(limit).is_err() {
            continue;
        }
        let Ok(signed) = DataHello::receive(&mut s) else {
            continue;
        };
        let h = signed.hello;
        let expected = h.epoch == spec.epoch
            && h.from == from
            && h.to == spec.me
            && h.conn_index == PROBE_INDEX;
        if !signed.verify(spec.key) || !expected {
            tracing::warn!(
                from = h.from,
                "refused a probe that is not the expected peer's of this epoch"
            );
            let _ = write_reply(&mut s, HelloStatus::Refused);
            continue;
        }
        write_reply(&mut s, HelloStatus::Ok).map_err(|e| e.to_string())?;
        return answer(&mut s).map_err(|e| format!("serving the probe of peer {from}: {e}"));
    }
}

/// The server's side of an accepted probe: echo the pings, count the stream, answer.
fn answer(s: &mut TcpStream) -> std::io::Result<()> {
    let mut ping = [0u8; 8];
    for _ in 0..PINGS {
        s.read_exact(&mut ping)?;
        s.write_all(&ping)?;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            break;
        }
        if n > CHUNK {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a probe chunk of {n} bytes"),
            ));
        }
        s.read_exact(&mut buf[..n])?;
        total += n as u64;
    }
    s.write_all(&total.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_transport::auth::{KeyPurpose, RunToken};

    #[test]
    fn a_probe_measures_and_a_stranger_is_refused() {
        let token = RunToken::new("probe token 0123456").unwrap();
        let key = EpochKey::derive(Some(&token), KeyPurpose::Ring, 4, 9);
        let other = EpochKey::derive(Some(&token), KeyPurpose::Ring, 5, 9);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = |key, me| ProbeSpec {
            key,
            epoch: 4,
            me,
            bytes: 8 << 20,
            time: Duration::from_secs(2),
        };
        std::thread::scope(|s| {
            let server = s.spawn(|| {
                serve(
                    &listener,
                    &spec(&key, 2),
                    1,
                    Instant::now() + Duration::from_secs(20),
                )
            });
            // Another epoch's key is refused; the expected caller then gets through.
            assert!(probe(&spec(&other, 1), 2, addr).is_err());
            let edge = probe(&spec(&key, 1), 2, addr).unwrap();
            assert!(edge.bandwidth > 1e7 && edge.rtt > 0.0, "{edge:?}");
            server.join().unwrap().unwrap();
        });
    }
}
