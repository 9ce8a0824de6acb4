//! Launch from the cluster tools users already have: which launcher started this process
//! (`env`), Slurm's hostlist syntax (`hostlist`), the master that the launcher's rank 0 runs
//! in-process on a thread of its own (`embedded`), and the interface the data plane uses
//! (`interfaces`).

pub mod embedded;
pub mod env;
pub mod hostlist;
pub mod interfaces;
