//! Choosing the network interface (and so the address) a peer uses for its data connections,
//! as NCCL and Gloo users already write it (`CONCORD_SOCKET_IFNAME`): `eth0` or `eth` (names
//! starting so), `eth0,ib0` (any of them, in that order), `=eth0` (exactly that name), `^docker,lo`
//! (any but those). IPv4 addresses are preferred; `CONCORD_SOCKET_FAMILY=AF_INET6` prefers IPv6.

use std::net::IpAddr;

use crate::Error;

/// The interface-selection variable.
pub const IFNAME_ENV: &str = "CONCORD_SOCKET_IFNAME";
/// The address-family preference variable (`AF_INET` or `AF_INET6`).
pub const FAMILY_ENV: &str = "CONCORD_SOCKET_FAMILY";

/// One address of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    /// The interface's name (`eth0`).
    pub name: String,
    /// One of its addresses.
    pub ip: IpAddr,
}

/// The address to use among `addrs` for `spec` (see the module's header); `prefer_v6` picks IPv6
/// first. An error lists what the machine has.
pub fn choose(spec: &str, addrs: &[IfAddr], prefer_v6: bool) -> Result<IfAddr, Error> {
    let spec = spec.trim();
    let (exclude, list) = match spec.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let (exact, list) = match list.strip_prefix('=') {
        Some(rest) => (true, rest),
        None => (false, list),
    };
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{IFNAME_ENV}={spec:?} names no interface: give eth0, a prefix, a list, =exact or ^excluded"
        )));
    }
    let matches = |n: &str, pat: &str| if exact { n == pat } else { n.starts_with(pat) };
    let usable = |a: &&IfAddr| match a.ip {
        IpAddr::V4(_) => true,
        // Link-local IPv6 needs a scope to dial: not for a ring.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    };
    let rank = |a: &IfAddr| {
        let pos = if exclude {
            0
        } else {
            names
                .iter()
                .position(|p| matches(&a.name, p))
                .unwrap_or(usize::MAX)
        };
        let family = usize::from(a.ip.is_ipv6() != prefer_v6);
        (pos, family)
    };
    let mut candidates: Vec<&IfAddr> = addrs
        .iter()
        .filter(usable)
        .filter(|a| {
            let hit = names.iter().any(|p| matches(&a.name, p));
            hit != exclude && !(exclude && a.ip.is_loopback())
        })
        .collect();
    candidates.sort_by_key(|a| rank(a));
    candidates.first().map(|a| (*a).clone()).ok_or_else(|| {
        let have: Vec<String> = addrs.iter().map(|a| format!("{} {}", a.name, a.ip)).collect();
        Error::InvalidArgument(format!(
            "{IFNAME_ENV}={spec:?} matches no interface with a usable address; this machine has: {}",
            if have.is_empty() { "none".to_string() } else { have.join(", ") }
        ))
    })
}

/// This machine's interface addresses (interfaces that are up).
pub fn local_addrs() -> Result<Vec<IfAddr>, Error> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` on success; the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io(
            "listing the network interfaces",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            out.push(IfAddr { name, ip });
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Vec<IfAddr> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("docker0", "172.17.0.1"),
            ("eth0", "fe80::1"),
            ("eth0", "10.0.0.5"),
            ("eth0", "2001:db8::5"),
            ("ib0", "192.168.1.5"),
        ]
        .iter()
        .map(|(n, ip)| IfAddr {
            name: n.to_string(),
            ip: ip.parse().unwrap(),
        })
        .collect()
    }

    fn pick(spec: &str, v6: bool) -> String {
        choose(spec, &machine(), v6)
            .map(|a| format!("{} {}", a.name, a.ip))
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn names_prefixes_lists_exact_and_excluded() {
        assert_eq!(pick("eth0", false), "eth0 10.0.0.5");
        assert_eq!(pick("eth", false), "eth0 10.0.0.5");
        assert_eq!(pick("eth0", true), "eth0 2001:db8::5");
        assert_eq!(pick("ib0,eth0", false), "ib0 192.168.1.5");
        assert!(pick("=eth", false).contains("matches no interface"));
        assert_eq!(pick("=ib0", false), "ib0 192.168.1.5");
        // Excluding docker and loopback leaves eth0 and ib0; in the machine's order.
        assert_eq!(pick("^docker,lo", false), "eth0 10.0.0.5");
        assert_eq!(pick("^docker", false), "eth0 10.0.0.5");
        let e = pick("wlan", false);
        assert!(e.contains("wlan") && e.contains("eth0 10.0.0.5"), "{e}");
        assert!(pick(" , ", false).contains("names no interface"));
    }

    #[test]
    fn this_machine_lists_its_loopback() {
        let addrs = local_addrs().unwrap();
        assert!(addrs.iter().any(|a| a.ip.is_loopback()), "{addrs:?}");
        assert_eq!(
            choose("lo", &addrs, false).unwrap().ip.to_string(),
            "127.0.0.1"
        );
    }
}
