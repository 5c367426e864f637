//! With the `cuda` feature, compiles `kernels/ferrite.cu` to PTX with nvcc (for
//! `CUDA_COMPUTE_CAP`, default 90) into `OUT_DIR/ferrite.ptx`, which `src/cuda.rs` embeds.
//! Without it, does nothing: the CPU build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/ferrite.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("ferrite.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("kernels/ferrite.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (source ../shared/cuda/setup.sh)",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on kernels/ferrite.cu");
}
