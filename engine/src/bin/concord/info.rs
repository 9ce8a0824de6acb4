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
    println!("transports: socket (tcp): available; io_uring: {uring}; auto picks {chosen} (CONCORD_TRANSPORT=uring|socket|auto)");
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
