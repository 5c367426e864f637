//! With the `cuda` feature, compiles `kernels/ferrite.cu` to PTX with nvcc (for
//! `CUDA_COMPUTE_CAP`, default 90) into `OUT_DIR/ferrite.ptx`, which `src/cuda.rs` embeds, then
//! assembles that PTX with ptxas (beside nvcc) as the driver will when it loads it: the inline
//! PTX of the tensor-core kernels (`mma.sync`, `ldmatrix`) is checked here, not first on the GPU,
//! and each kernel's registers, shared memory and spills go to `OUT_DIR/ferrite.ptxas.txt`.
//! Without the feature, does nothing: the CPU build needs no CUDA toolkit.

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
    assemble(&nvcc, &out, &cap);
}

/// Assembles `ptx` for sm_`cap` with the ptxas beside `nvcc`, failing the build on its errors;
/// a warning (and no check) where the toolkit has no ptxas.
fn assemble(nvcc: &std::path::Path, ptx: &std::path::Path, cap: &str) {
    let ptxas = nvcc.with_file_name("ptxas");
    let report = ptx.with_extension("ptxas.txt");
    let output = Command::new(&ptxas)
        .arg(format!("-arch=sm_{cap}"))
        .args(["-v", "--warn-on-spills"])
        .arg(ptx)
        .arg("-o")
        .arg(ptx.with_extension("cubin"))
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            println!(
                "cargo:warning=ptxas ({}): {e}; the kernels' PTX is first assembled when the driver loads it",
                ptxas.display()
            );
            return;
        }
    };
    // ptxas writes its -v report and its warnings to stderr
    let text = String::from_utf8_lossy(&output.stderr);
    std::fs::write(&report, text.as_bytes()).expect("writing the ptxas report");
    assert!(
        output.status.success(),
        "ptxas failed on the PTX of kernels/ferrite.cu:\n{text}"
    );
    for line in text.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=ptxas: {line}");
    }
}
