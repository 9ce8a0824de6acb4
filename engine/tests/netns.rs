//! A cut link, across a real network stack: a master and three peers in their own network
//! namespaces on a bridge; one peer's link goes down mid-run (`ip link set ... down`, a partition
//! rather than a crash). The master's heartbeats notice, the survivors' collectives fail naming
//! the lost peer, and they carry on without it. Needs root and iproute2: elsewhere it skips,
//! saying why.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `<p>1..<p>n` on bridge `<p>br`, addresses 10.79.<k>.i/24; removed on drop.
struct Cluster {
    prefix: String,
    subnet: u32,
    n: usize,
}

impl Cluster {
    fn up(n: usize) -> Result<Cluster, String> {
        // Distinct per cluster: the tests of this file run in parallel in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n_up = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let k = (std::process::id() + 101 * n_up) % 200 + 20;
        let c = Cluster {
            prefix: format!("cct{k}"),
            subnet: k,
            n,
        };
        let br = format!("{}br", c.prefix);
        sh(&["ip", "link", "add", &br, "type", "bridge"])?;
        sh(&["ip", "link", "set", &br, "up"])?;
        for i in 1..=n {
            let (ns, v, vp) = (c.ns(i), c.veth(i), format!("{}p", c.veth(i)));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &vp])?;
            sh(&["ip", "link", "set", &vp, "netns", &ns])?;
            sh(&["ip", "link", "set", &v, "master", &br])?;
            sh(&["ip", "link", "set", &v, "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", c.addr(i)),
                "dev",
                &vp,
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", &vp, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(c)
    }
    fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }
    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.prefix)
    }
    fn addr(&self, i: usize) -> String {
        format!("10.79.{}.{i}", self.subnet)
    }
    /// A command in namespace `i`, a host of its own: its host id keeps Concord from sharing
    /// memory with the other namespaces' peers, as peers on separate machines could not.
    fn exec(&self, i: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i)]).args(args);
        cmd.env("CONCORD_HOST_ID", self.ns(i));
        cmd
    }
    /// Limits host `i`'s uplink to `rate` (htb, as `benches/links.sh`), and what it sends to
    /// each host of `slow` to `slow_rate`.
    fn shape(&self, i: usize, rate: &str, slow: &[usize], slow_rate: &str) -> Result<(), String> {
        let (ns, dev) = (self.ns(i), format!("{}p", self.veth(i)));
        let tc = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &ns, "tc"];
            all.extend_from_slice(args);
            sh(&all)
        };
        tc(&[
            "qdisc", "add", "dev", &dev, "root", "handle", "1:", "htb", "default", "10",
        ])?;
        for (class, r) in [("1:10", rate), ("1:20", slow_rate)] {
            tc(&[
                "class", "add", "dev", &dev, "parent", "1:", "classid", class, "htb", "rate", r,
                "ceil", r, "burst", "512kb", "cburst", "512kb", "quantum", "60000",
            ])?;
        }
        for j in slow {
            let dst = format!("{}/32", self.addr(*j));
            tc(&[
                "filter", "add", "dev", &dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "dst", &dst, "flowid", "1:20",
            ])?;
        }
        Ok(())
    }
    fn cut(&self, i: usize) -> Result<(), String> {
        sh(&["ip", "link", "set", &self.veth(i), "down"])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "link", "del", &format!("{}br", self.prefix)]);
    }
}

fn collect(mut child: Child) -> (Child, Arc<Mutex<Vec<serde_json::Value>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    (child, lines)
}

#[test]
fn a_cut_link_is_detected_and_the_survivors_carry_on() {
    let cluster = match Cluster::up(4) {
        Ok(c) => c,
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: network namespaces unavailable here (needs root and iproute2): {why}"
            );
            return;
        }
    };
    let bin = env!("CARGO_BIN_EXE_concord");
    let master_addr = format!("{}:48148", cluster.addr(1));
    // Beyond loopback the master needs the run's token; the peers get it from the environment.
    let token = "netns test run token 8c1f0e";
    let token_file =
        std::env::temp_dir().join(format!("concord-netns-{}.token", std::process::id()));
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut master = cluster
        .exec(
            1,
            &[
                bin,
                "master",
                "--listen",
                &master_addr,
                "--heartbeat-timeout-ms",
                "2000",
                "--token-file",
                token_file.to_str().unwrap(),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("master");
    std::thread::sleep(Duration::from_millis(300));
    let peers: Vec<_> = (2..=4)
        .map(|i| {
            let child = cluster
                .exec(
                    i,
                    &[
                        bin,
                        "bench",
                        "--elastic",
                        "--master",
                        &master_addr,
                        "--world",
                        "3",
                        "-n",
                        "200",
                        "-b",
                        "1M",
                        "-m",
                        "2",
                        "-T",
                        "20",
                    ],
                )
                .env("CONCORD_TOKEN", token)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("peer");
            collect(child)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while peers[0].1.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "the group never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.cut(4).expect("cut the link");
    let cut_at = Instant::now();
    // Survivors: a failure naming the cut peer, a retry, then progress with two peers.
    for (child, lines) in &peers[..2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let l = lines.lock().unwrap().clone();
            let recovered = l.iter().any(|x| x["retries"].as_u64().unwrap_or(0) > 0)
                && l.last().is_some_and(|x| x["world"] == 2 && x["ok"] == true);
            if recovered {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "survivor {} did not recover: {:?}",
                child.id(),
                l.last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!(
        "link cut -> survivors recovered after {} ms",
        cut_at.elapsed().as_millis()
    );
    for (mut child, _) in peers {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
}

/// The same command line in every namespace, with a Slurm-style environment (the nodelist names
/// the hosts, in hostlist syntax, resolvable there) and then a torchrun-style one: the group forms
/// across the bridge, rank 0 runs the master in-process, the results are checked, and no
/// process was given `--master` or `--world`.
#[test]
fn launchers_form_a_group_across_hosts_with_no_group_flags() {
    let cluster = match Cluster::up(3) {
        Ok(c) => c,
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: network namespaces unavailable here (needs root and iproute2): {why}"
            );
            return;
        }
    };
    let bin = env!("CARGO_BIN_EXE_concord");
    let prefix = format!("10.79.{}.", cluster.subnet);
    // Host names that resolve inside the namespaces only: `ip netns exec` mounts
    // /etc/netns/NS/hosts over /etc/hosts.
    let names: Vec<String> = (1..=3)
        .map(|i| format!("{}node{i}", cluster.prefix))
        .collect();
    let hosts: String = (1..=3)
        .map(|i| format!("{} {}\n", cluster.addr(i), names[i - 1]))
        .collect();
    let dirs: Vec<std::path::PathBuf> = (1..=3)
        .map(|i| std::path::Path::new("/etc/netns").join(cluster.ns(i)))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("hosts"), format!("127.0.0.1 localhost\n{hosts}")).unwrap();
    }
    struct Cleanup(Vec<std::path::PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    let _cleanup = Cleanup(dirs);
    let nodelist = format!("{}node[1-3]", cluster.prefix);
    let token = "launcher test run token 51aa09";
    type Env = Vec<(&'static str, String)>;
    let slurm = |i: usize| -> Env {
        vec![
            ("SLURM_PROCID", (i - 1).to_string()),
            ("SLURM_NTASKS", "3".into()),
            ("SLURM_LOCALID", "0".into()),
            ("SLURM_JOB_NODELIST", nodelist.clone()),
            ("SLURM_JOB_ID", "31337".into()),
        ]
    };
    let torchrun = |i: usize| -> Env {
        vec![
            ("RANK", (i - 1).to_string()),
            ("WORLD_SIZE", "3".into()),
            ("LOCAL_RANK", "0".into()),
            ("MASTER_ADDR", format!("{prefix}1")),
            ("MASTER_PORT", "29400".into()),
        ]
    };
    for (name, env_of) in [
        ("slurm", &slurm as &dyn Fn(usize) -> Env),
        ("torchrun", &torchrun),
    ] {
        let peers: Vec<Child> = (1..=3)
            .map(|i| {
                cluster
                    .exec(
                        i,
                        &[
                            bin, "bench", "-b", "1M", "-e", "4M", "-n", "3", "-w", "1", "-T", "30",
                        ],
                    )
                    .envs(env_of(i))
                    .env("CONCORD_TOKEN", token)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("peer")
            })
            .collect();
        let outs: Vec<_> = peers
            .into_iter()
            .map(|p| p.wait_with_output().unwrap())
            .collect();
        let all: String = outs
            .iter()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .collect();
        for o in &outs {
            assert!(
                o.status.success(),
                "{name}: {}\n{all}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // Slurm's master is the nodelist's first host, by name; torchrun's is MASTER_ADDR.
        let master_host = if name == "slurm" {
            names[0].clone()
        } else {
            format!("{prefix}1")
        };
        assert!(
            all.contains("# launcher: ") && all.contains(&format!("master {master_host}:")),
            "{name}: {all}"
        );
        assert!(
            all.contains("3 peers") && all.contains("# Out of bounds values : 0 OK"),
            "{name}: {all}"
        );
    }
}

/// `concord bench --topology` over shaped links: uplinks of 1 Gbit/s, host 2 to host 3 at
/// 100 Mbit/s, which the id-order ring crosses (the peers join in host order). The printed matrix
/// matches the shaping within 15%, the chosen ring avoids the slow edge, and its all-reduce (64
/// MiB) reaches three quarters of its predicted busbw and more than twice the id-order ring's
/// (16 MiB: 64 would take half a minute), in the same run.
#[test]
fn a_slow_link_is_measured_and_routed_around() {
    let skip = |why: String| {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: shaped network namespaces unavailable here (needs root, iproute2, tc with htb): {why}"
        );
    };
    let cluster = match Cluster::up(4) {
        Ok(c) => c,
        Err(why) => return skip(why),
    };
    for i in 2..=4 {
        let slow: &[usize] = if i == 2 { &[3] } else { &[] };
        if let Err(why) = cluster.shape(i, "1gbit", slow, "100mbit") {
            return skip(why);
        }
    }
    let bin = env!("CARGO_BIN_EXE_concord");
    let master_addr = format!("{}:48149", cluster.addr(1));
    let mut master = cluster
        .exec(1, &[bin, "master", "--listen", &master_addr, "--insecure"])
        .stderr(Stdio::null())
        .spawn()
        .expect("master");
    std::thread::sleep(Duration::from_millis(300));
    // One group per run; peers join in host order, so ids (and the id-order ring) follow hosts.
    let run = |flags: &[&str]| -> String {
        let mut children = Vec::new();
        for i in 2..=4 {
            let mut args = vec![
                bin,
                "bench",
                "--master",
                &master_addr,
                "--world",
                "3",
                "-c",
                "1",
            ];
            args.extend_from_slice(flags);
            children.push(
                cluster
                    .exec(i, &args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("peer"),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut all = String::new();
        for mut c in children {
            let mut out = String::new();
            std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(c.wait().unwrap().success(), "a peer failed:\n{out}");
            all.push_str(&out);
        }
        all
    };
    let busbw = |out: &str| -> f64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(char::is_numeric))
            .and_then(|l| l.split_whitespace().nth(6)?.parse().ok())
            .unwrap_or_else(|| panic!("no row in:\n{out}"))
    };
    let optimised = run(&["--topology", "-b", "64M", "-e", "64M", "-n", "2", "-w", "1"]);
    let id_order = run(&["-b", "16M", "-e", "16M", "-n", "1", "-w", "1"]);
    let _ = master.kill();
    let _ = master.wait();
    println!("{optimised}\n{id_order}");
    // The matrix, peers 1-3 on hosts 2-4: host 2 to host 3 is the slow edge.
    let rows: Vec<Vec<f64>> = optimised
        .lines()
        .skip_while(|l| !l.contains("GB/s from"))
        .skip(1)
        .take(3)
        .map(|l| {
            l.trim_start_matches('#')
                .split_whitespace()
                .skip(1)
                .map(|c| c.parse().unwrap_or(0.0))
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 3, "{optimised}");
    for (a, row) in rows.iter().enumerate() {
        for (b, &gbs) in row.iter().enumerate() {
            if a == b {
                continue;
            }
            let want = if (a, b) == (0, 1) { 0.0125 } else { 0.125 };
            assert!(
                (gbs - want).abs() <= 0.15 * want,
                "edge {} -> {} measured {gbs} GB/s, shaped {want}",
                a + 1,
                b + 1
            );
        }
    }
    let line = |what: &str| {
        optimised
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
    };
    let predicted: f64 = line("# ring chosen")
        .split("predicted busbw ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .expect("a predicted busbw");
    assert!(
        !line("# ring chosen").contains("1 -> 2"),
        "{}",
        line("# ring chosen")
    );
    let (fast, slow) = (busbw(&optimised), busbw(&id_order));
    println!("optimised ring {fast} GB/s (predicted {predicted}), id-order ring {slow} GB/s");
    // The ring moves at most its slowest edge's bandwidth; over these shaped links the data
    // plane reaches about 80-85% of it (benches/RESULTS.md), which bounds what is asserted.
    assert!(
        fast >= 0.75 * predicted,
        "{fast} of a predicted {predicted}"
    );
    assert!(
        fast >= 2.0 * slow,
        "{fast} against the id-order ring's {slow}"
    );
}
