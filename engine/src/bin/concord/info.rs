//! `concord info`: what this host offers Concord.

pub(crate) fn print() {
    println!(
        "concord {} (protocol version {})",
        env!("CARGO_PKG_VERSION"),
        concord_transport::PROTOCOL_VERSION
    );
    println!("cpu features: {}", cpu_features());
    let runnable: Vec<&str> = concord_kernels::CpuPath::available()
        .into_iter()
        .map(|p| p.name())
        .collect();
    println!(
        "kernels: {} (paths this CPU runs: {}; force one with CONCORD_KERNELS=NAME)",
        concord_kernels::cpu_path(),
        runnable.join(", ")
    );
    let uring = match concord_transport::uring::probe() {
        Ok(info) => format!("available ({info:?})"),
        Err(why) => format!("not available: {why}"),
    };
    let chosen = match concord_transport::resolve_backend(concord_transport::BackendChoice::Auto) {
        Ok((kind, _)) => kind.name(),
        Err(_) => "socket",
    };
    println!("transports: socket (tcp): available; io_uring: {uring}; auto picks {chosen} towards other hosts (CONCORD_TRANSPORT=auto|shm|uring|socket)");
    println!("shared memory with peers on this host: {}", shm_status());
    match concord_kernels::cuda::probe() {
        Ok(device) => println!("cuda: available: {device}"),
        Err(reason) => println!("cuda: not available: {reason}"),
    }
}

fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        macro_rules! feat {
            ($($name:tt),*) => { $( if std::arch::is_x86_feature_detected!($name) { f.push($name); } )* };
        }
        feat!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512fp16"
        );
        if f.is_empty() {
            "none of interest".into()
        } else {
            f.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// Whether this process can create a shared-memory ring and map it the way a neighbour would
/// (through `/proc/<pid>/fd`), and the host identity peers compare.
fn shm_status() -> String {
    use concord_transport::shm::{host_id, Segment, HOST_ID_ENV};
    use std::os::fd::AsRawFd;
    let Some(host) = host_id() else {
        return format!("not available: no kernel boot id and no {HOST_ID_ENV}");
    };
    let host = String::from_utf8_lossy(&host)
        .trim_end_matches('\0')
        .to_string();
    let size = concord_transport::shm::segment::MIN_CAPACITY;
    let mapped = Segment::create(size).and_then(|c| {
        Segment::open(std::process::id(), c.fd.as_raw_fd(), size, &c.cookie).map(drop)
    });
    match mapped {
        Ok(()) => format!("available (host id {host}; set {HOST_ID_ENV} to override)"),
        Err(e) => format!("not available: {e}"),
    }
}
