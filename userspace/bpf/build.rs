//! Compile cbt-module/bpf/ferry_cbt.bpf.c with clang and generate its
//! libbpf-rs skeleton (needs clang and the libbpf headers: scripts/install-deps).

use libbpf_cargo::SkeletonBuilder;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("../../cbt-module");
    let src = dir.join("bpf/ferry_cbt.bpf.c");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("ferry_cbt.skel.rs");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => panic!("BPF tracker: unsupported architecture {other}"),
        Err(_) => "x86",
    };
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into()));
    SkeletonBuilder::new()
        .source(&src)
        .clang_args([format!("-D__TARGET_ARCH_{arch}"), multiarch, "-Wall".into()])
        .build_and_generate(&out)
        .unwrap_or_else(|e| panic!("building the BPF program {}: {e:#}", src.display()));
    for f in ["bpf/ferry_cbt.bpf.c", "bpf/core_fixes.bpf.h", "include/uapi/ferry_cbt.h"] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
}
