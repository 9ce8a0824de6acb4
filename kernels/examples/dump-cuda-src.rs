//! Prints the complete CUDA source of the reduction kernels (for `ci/cuda-compile.sh`).
//!
//! `cargo run -p concord-kernels --example dump-cuda-src > kernels.cu`

fn main() {
    print!("{}", concord_kernels::cuda::kernel_source());
}
