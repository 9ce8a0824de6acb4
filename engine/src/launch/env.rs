//! Which launcher started this process, and what it says: rank, world, local rank, and where the
//! master is. Read from the environment in a fixed order (the first launcher whose variables are
//! present wins): `CONCORD_*`, torchrun, Slurm, Open MPI, PMI.
//!
//! | launcher | rank / world | local | master |
//! |---|---|---|---|
//! | Concord | `CONCORD_RANK`, `CONCORD_WORLD_SIZE` | `CONCORD_LOCAL_RANK` | `CONCORD_MASTER` (host:port) |
//! | torchrun | `RANK`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | `MASTER_ADDR`, port `MASTER_PORT + 1` (torchrun's own store holds `MASTER_PORT`) |
//! | Slurm | `SLURM_PROCID`, `SLURM_NTASKS` | `SLURM_LOCALID` | the first host of `SLURM_JOB_NODELIST`, port `10000 + SLURM_JOB_ID mod 20000` |
//! | Open MPI | `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE` | `CONCORD_MASTER` or `MASTER_ADDR`/`MASTER_PORT` (Open MPI names no host) |
//! | PMI | `PMI_RANK`, `PMI_SIZE` | — | as Open MPI |
//!
//! `CONCORD_MASTER` always names an external master that nobody here starts; without it the
//! process of rank 0 starts the master in-process at the launcher's address, and
//! `CONCORD_MASTER_PORT` replaces the derived port.

use super::hostlist;
use crate::Error;

/// The launcher a process was started by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `CONCORD_RANK` / `CONCORD_WORLD_SIZE` set by hand or by a script.
    Concord,
    /// PyTorch's `torchrun` (or anything that sets its variables).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
    /// Open MPI's `mpirun`.
    OpenMpi,
    /// A PMI launcher (MPICH's Hydra, Intel MPI).
    Pmi,
}

impl Launcher {
    /// Its name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Concord => "CONCORD_* variables",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "Slurm",
            Launcher::OpenMpi => "Open MPI",
            Launcher::Pmi => "PMI",
        }
    }
}

/// What the launcher's environment says about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Which launcher.
    pub launcher: Launcher,
    /// This process's rank as the launcher counts (not its ring position, which the master
    /// assigns).
    pub rank: usize,
    /// Processes in the job.
    pub world: usize,
    /// Rank among the processes of this host, where the launcher says.
    pub local_rank: Option<usize>,
    /// Processes on this host, where the launcher says.
    pub local_world: Option<usize>,
    /// The master's address (`host:port`).
    pub master: String,
    /// Whether this process starts the master (rank 0, and no `CONCORD_MASTER`).
    pub starts_master: bool,
    /// What was read, as `NAME=value`, for the first lines of `concord bench`.
    pub took: Vec<String>,
}

impl LaunchEnv {
    /// One line: the launcher and what was taken from it.
    pub fn describe(&self) -> String {
        format!(
            "{}: rank {} of {}, master {}{} (from {})",
            self.launcher.name(),
            self.rank,
            self.world,
            self.master,
            if self.starts_master {
                ", started by this process"
            } else {
                ""
            },
            self.took.join(", ")
        )
    }
}

/// Reads variables through `var` and records what it read.
struct Reader<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
    took: Vec<String>,
}

impl Reader<'_> {
    fn get(&mut self, name: &str) -> Option<String> {
        let v = (self.var)(name).filter(|v| !v.trim().is_empty())?;
        self.took.push(format!("{name}={v}"));
        Some(v.trim().to_string())
    }

    fn has(&self, name: &str) -> bool {
        (self.var)(name).is_some_and(|v| !v.trim().is_empty())
    }

    fn number(&mut self, name: &str) -> Result<Option<usize>, Error> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::InvalidArgument(format!("{name}={v:?}: expected a whole number"))
            }),
        }
    }

    fn required(&mut self, name: &str, launcher: Launcher) -> Result<usize, Error> {
        self.number(name)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} sets some of its variables but not {name}: set it, or unset the others",
                launcher.name()
            ))
        })
    }
}

/// The launcher's view of this process, or `None` when no launcher's variables are set.
/// `var` reads one variable (`|k| std::env::var(k).ok()` for the process's environment).
pub fn detect(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, Error> {
    let mut r = Reader {
        var,
        took: Vec::new(),
    };
    let launcher = if r.has("CONCORD_RANK") || r.has("CONCORD_WORLD_SIZE") {
        Launcher::Concord
    } else if r.has("RANK") && r.has("WORLD_SIZE") || r.has("MASTER_ADDR") && r.has("RANK") {
        Launcher::Torchrun
    } else if r.has("SLURM_PROCID") {
        Launcher::Slurm
    } else if r.has("OMPI_COMM_WORLD_RANK") {
        Launcher::OpenMpi
    } else if r.has("PMI_RANK") {
        Launcher::Pmi
    } else {
        return Ok(None);
    };
    let (rank_var, world_var, local_var, local_world_var) = match launcher {
        Launcher::Concord => (
            "CONCORD_RANK",
            "CONCORD_WORLD_SIZE",
            Some("CONCORD_LOCAL_RANK"),
            None,
        ),
        Launcher::Torchrun => (
            "RANK",
            "WORLD_SIZE",
            Some("LOCAL_RANK"),
            Some("LOCAL_WORLD_SIZE"),
        ),
        Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS", Some("SLURM_LOCALID"), None),
        Launcher::OpenMpi => (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            Some("OMPI_COMM_WORLD_LOCAL_RANK"),
            Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
        ),
        Launcher::Pmi => ("PMI_RANK", "PMI_SIZE", None, None),
    };
    let rank = r.required(rank_var, launcher)?;
    let world = r.required(world_var, launcher)?;
    if world == 0 {
        return Err(Error::InvalidArgument(format!(
            "{world_var}=0: a job has at least one process"
        )));
    }
    if rank >= world {
        return Err(Error::InvalidArgument(format!(
            "{rank_var}={rank} is outside {world_var}={world} (ranks 0..{world})"
        )));
    }
    let local_rank = local_var.map(|v| r.number(v)).transpose()?.flatten();
    let local_world = local_world_var.map(|v| r.number(v)).transpose()?.flatten();
    if let (Some(l), Some(n)) = (local_rank, local_world) {
        if l >= n {
            return Err(Error::InvalidArgument(format!(
                "{}={l} is outside {}={n}",
                local_var.unwrap_or_default(),
                local_world_var.unwrap_or_default()
            )));
        }
    }
    let port_override = r.number("CONCORD_MASTER_PORT")?;
    let (master, external) = match r.get("CONCORD_MASTER") {
        Some(m) => (m, true),
        None => (launcher_master(&mut r, launcher, port_override)?, false),
    };
    check_host_port("the master address", &master)?;
    Ok(Some(LaunchEnv {
        launcher,
        rank,
        world,
        local_rank,
        local_world,
        master,
        starts_master: rank == 0 && !external,
        took: r.took,
    }))
}

/// The master's address as the launcher implies it.
fn launcher_master(
    r: &mut Reader<'_>,
    launcher: Launcher,
    port_override: Option<usize>,
) -> Result<String, Error> {
    let port = |p: usize, from: &str| -> Result<u16, Error> {
        let p = port_override.unwrap_or(p);
        u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the master port {p} (from {from}) is not a TCP port: set CONCORD_MASTER_PORT"
            ))
        })
    };
    match launcher {
        Launcher::Concord => Err(Error::InvalidArgument(
            "CONCORD_RANK / CONCORD_WORLD_SIZE are set but CONCORD_MASTER is not: set it to the master's host:port"
                .into(),
        )),
        Launcher::Slurm => {
            let list = r.get("SLURM_JOB_NODELIST").or_else(|| r.get("SLURM_NODELIST"));
            let list = list.ok_or_else(|| {
                Error::InvalidArgument(
                    "Slurm sets SLURM_PROCID but not SLURM_JOB_NODELIST: set CONCORD_MASTER=host:port".into(),
                )
            })?;
            let host = hostlist::first(&list)
                .map_err(|e| Error::InvalidArgument(format!("SLURM_JOB_NODELIST: {e}")))?;
            let job = r.number("SLURM_JOB_ID")?.or(r.number("SLURM_JOBID")?);
            let job = match (job, port_override) {
                (Some(j), _) => j,
                (None, Some(_)) => 0,
                (None, None) => {
                    return Err(Error::InvalidArgument(
                        "Slurm sets no SLURM_JOB_ID to derive the master's port from: set CONCORD_MASTER_PORT".into(),
                    ))
                }
            };
            Ok(join_host_port(&host, port(10_000 + job % 20_000, "SLURM_JOB_ID")?))
        }
        Launcher::Torchrun | Launcher::OpenMpi | Launcher::Pmi => {
            let (Some(host), Some(p)) = (r.get("MASTER_ADDR"), r.number("MASTER_PORT")?) else {
                return Err(Error::InvalidArgument(format!(
                    "{} names no master: set CONCORD_MASTER=host:port (or MASTER_ADDR and MASTER_PORT)",
                    launcher.name()
                )));
            };
            // torchrun's own store listens on MASTER_PORT: the master takes the next one.
            Ok(join_host_port(&host, port(p + 1, "MASTER_PORT + 1")?))
        }
    }
}

/// `host:port`, bracketing an IPv6 literal.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Checks that `addr` reads as `host:port` (the host is resolved when connecting).
fn check_host_port(what: &str, addr: &str) -> Result<(), Error> {
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {addr:?} is not host:port"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect_in(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        detect(&|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_no_launcher() {
        assert_eq!(detect_in(&[("HOME", "/root")]).unwrap(), None);
    }

    #[test]
    fn torchrun() {
        let e = detect_in(&[
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("WORLD_SIZE", "8"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Torchrun);
        assert_eq!(
            (e.rank, e.world, e.local_rank, e.local_world),
            (0, 8, Some(0), Some(4))
        );
        assert_eq!(e.master, "10.0.0.1:29501");
        assert!(e.starts_master);
        assert!(
            e.describe().contains("MASTER_PORT=29500"),
            "{}",
            e.describe()
        );
    }

    #[test]
    fn slurm_takes_the_first_host_and_a_port_from_the_job() {
        let e = detect_in(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[007-009,012]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Slurm);
        assert_eq!((e.rank, e.world, e.local_rank), (3, 4, Some(1)));
        assert_eq!(e.master, format!("gpu007:{}", 10_000 + 123_456 % 20_000));
        assert!(!e.starts_master);
        let e = detect_in(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "n1"),
            ("SLURM_JOB_ID", "5"),
            ("CONCORD_MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.master, "n1:4000");
    }

    #[test]
    fn open_mpi_pmi_and_concord() {
        let e = detect_in(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("CONCORD_MASTER", "head:9000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.launcher, e.rank, e.world), (Launcher::OpenMpi, 1, 2));
        assert_eq!(e.master, "head:9000");
        let e = detect_in(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "3"),
            ("CONCORD_MASTER", "h:1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, Launcher::Pmi);
        // An external master: rank 0 does not start one.
        assert!(!e.starts_master);
        let e = detect_in(&[
            ("CONCORD_RANK", "0"),
            ("CONCORD_WORLD_SIZE", "1"),
            ("CONCORD_MASTER", "[::1]:5000"),
            // A later launcher's variables lose to the earlier one's.
            ("SLURM_PROCID", "7"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.launcher, e.rank, e.world), (Launcher::Concord, 0, 1));
    }

    #[test]
    fn bad_environments_name_the_variable() {
        for (vars, says) in [
            (
                vec![
                    ("RANK", "4"),
                    ("WORLD_SIZE", "4"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "1"),
                ],
                "RANK=4 is outside WORLD_SIZE=4",
            ),
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "4")],
                "RANK=\"x\": expected a whole number",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2")],
                "set CONCORD_MASTER",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "gpu[1-"),
                    ("SLURM_JOB_ID", "1"),
                ],
                "SLURM_JOB_NODELIST",
            ),
            (vec![("SLURM_PROCID", "0")], "not SLURM_NTASKS"),
            (
                vec![("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")],
                "Open MPI names no master",
            ),
            (
                vec![
                    ("CONCORD_RANK", "0"),
                    ("CONCORD_WORLD_SIZE", "0"),
                    ("CONCORD_MASTER", "h:1"),
                ],
                "CONCORD_WORLD_SIZE=0",
            ),
            (
                vec![
                    ("CONCORD_RANK", "0"),
                    ("CONCORD_WORLD_SIZE", "2"),
                    ("CONCORD_MASTER", "nohost"),
                ],
                "not host:port",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "65535"),
                ],
                "not a TCP port",
            ),
        ] {
            let e = detect_in(&vars).unwrap_err().to_string();
            assert!(e.contains(says), "{vars:?}: {e}");
        }
    }
}
