//! Embeds the XDP object built by `cargo xtask build-ebpf` (or named by ZDD_EBPF_OBJECT).
//! Without it the agent still builds (so `cargo check`/clippy work on a fresh clone) and says
//! at start what to run.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(zdd_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=ZDD_EBPF_OBJECT");
    let path = std::env::var_os("ZDD_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/ebpf/zdd.bpf.o")
        });
    println!("cargo::rerun-if-changed={}", path.display());
    if path.is_file() {
        let path = path.canonicalize().unwrap();
        println!("cargo::rustc-env=ZDD_EBPF_OBJECT_PATH={}", path.display());
        println!("cargo::rustc-cfg=zdd_ebpf_embedded");
    } else {
        println!(
            "cargo::warning=XDP object {} not found: run `cargo xtask build-ebpf` first; this build of zdd-agent cannot load it",
            path.display()
        );
    }
}
