//! A holder serving the entries it has in the elected version to the peers that pull them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use concord_transport::PROTOCOL_VERSION;

use socket2::SockRef;

use super::{MAX_KEY_BYTES, MAX_SOURCES, PULL_MAGIC};

/// Serves clean entries on `listener` until `stop` is set. Returns the bytes served.
pub(crate) fn serve(
    listener: &TcpListener,
    clean: &HashMap<&str, &[u8]>,
    secret: u64,
    revision: u64,
    stop: &AtomicBool,
) -> u64 {
    let served = AtomicU64::new(0);
    std::thread::scope(|s| {
        let mut handlers = 0usize;
        while !stop.load(Ordering::Acquire) {
            let _ = SockRef::from(listener).set_read_timeout(Some(Duration::from_millis(50)));
            let Ok((stream, _)) = listener.accept() else {
                continue;
            };
            if handlers >= 4 * MAX_SOURCES {
                continue; // Bounded: a flood of connections is dropped.
            }
            handlers += 1;
            let served = &served;
            s.spawn(move || {
                if let Err(e) = serve_one(stream, clean, secret, revision, stop, served) {
                    tracing::debug!("shared-state pull connection ended: {e}");
                }
            });
        }
    });
    served.load(Ordering::Relaxed)
}

fn serve_one(
    mut stream: TcpStream,
    clean: &HashMap<&str, &[u8]>,
    secret: u64,
    revision: u64,
    stop: &AtomicBool,
    served: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    loop {
        let mut head = [0u8; 44];
        match stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                continue; // (No partial header can be lost: requests are written in one piece.)
            }
            Err(e) => return Err(e),
        }
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8"));
        let (magic, version, their_secret, their_rev) =
            (u32_at(0), u32_at(4), u64_at(8), u64_at(16));
        let (offset, len, key_len) = (
            u64_at(24) as usize,
            u64_at(32) as usize,
            u32_at(40) as usize,
        );
        if magic != PULL_MAGIC || version != PROTOCOL_VERSION || key_len > MAX_KEY_BYTES {
            return Err(std::io::Error::other("not a Concord shared-state pull"));
        }
        let mut key = vec![0u8; key_len];
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.read_exact(&mut key)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let data = std::str::from_utf8(&key).ok().and_then(|k| clean.get(k));
        let valid = their_secret == secret && their_rev == revision;
        match data.filter(|d| valid && offset.checked_add(len).is_some_and(|end| end <= d.len())) {
            Some(d) => {
                stream.write_all(&0u32.to_le_bytes())?;
                stream.write_all(&d[offset..offset + len])?;
                served.fetch_add(len as u64, Ordering::Relaxed);
                crate::fault::kill_point("serve", Some(revision));
            }
            None => {
                stream.write_all(&1u32.to_le_bytes())?;
                return Err(std::io::Error::other(
                    "refused a pull (secret, revision, key or range)",
                ));
            }
        }
    }
}
