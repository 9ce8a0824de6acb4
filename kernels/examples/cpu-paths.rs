//! Prints every CPU kernel path, one a line: its name, then `ok` where this CPU runs it, else
//! `missing` and the CPU features it lacks. `ci/kernel-paths.sh` reads it.

fn main() {
    for path in concord_kernels::CpuPath::ALL {
        let missing = path.missing_features();
        if missing.is_empty() {
            println!("{path} ok");
        } else {
            println!("{path} missing {}", missing.join(","));
        }
    }
}
