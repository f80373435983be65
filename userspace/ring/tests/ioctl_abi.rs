//! The Rust rendering of the kernel module's ioctl ABI against the C header
//! itself: a C program built from cbt-module/include/uapi/ferry_cbt_ioctl.h
//! prints the request numbers and struct sizes the module was compiled
//! with, and they must equal ferry_ring::ioctl and the bindgen structs.

use ferry_ring::{generated_ioctl as g, ioctl};
use std::process::Command;

#[test]
fn ioctl_numbers_and_sizes_match_the_c_header() {
    let dir = std::env::temp_dir().join(format!("ferry-ioctl-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cbt-module/include/uapi/ferry_cbt_ioctl.h");
    let src = dir.join("abi.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n#include \"{}\"\nint main(void) {{ printf(\"%lu %lu %lu %lu %lu %lu %lu %zu %zu %zu %zu %zu %zu %zu\\n\", \
             (unsigned long)FERRY_CBT_IOC_ATTACH, (unsigned long)FERRY_CBT_IOC_DETACH, (unsigned long)FERRY_CBT_IOC_STATUS, \
             (unsigned long)FERRY_CBT_IOC_TAG, (unsigned long)FERRY_CBT_IOC_SET_CAP, (unsigned long)FERRY_CBT_IOC_CATCHUP, \
             (unsigned long)FERRY_CBT_IOC_GROUP_TAG, \
             sizeof(struct ferry_cbt_attach), sizeof(struct ferry_cbt_detach), sizeof(struct ferry_cbt_status), \
             sizeof(struct ferry_cbt_tag), sizeof(struct ferry_cbt_cap), sizeof(struct ferry_cbt_catchup), \
             sizeof(struct ferry_cbt_group_tag)); return 0; }}\n",
            header.display()
        ),
    )
    .unwrap();
    let exe = dir.join("abi");
    let cc = Command::new("cc").arg("-Wall").arg("-Werror").arg("-o").arg(&exe).arg(&src).output().expect("run cc");
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().expect("run the ABI program");
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse().unwrap()).collect();
    let want = [
        ioctl::ATTACH,
        ioctl::DETACH,
        ioctl::STATUS,
        ioctl::TAG,
        ioctl::SET_CAP,
        ioctl::CATCHUP,
        ioctl::GROUP_TAG,
        std::mem::size_of::<g::ferry_cbt_attach>() as u64,
        std::mem::size_of::<g::ferry_cbt_detach>() as u64,
        std::mem::size_of::<g::ferry_cbt_status>() as u64,
        std::mem::size_of::<g::ferry_cbt_tag>() as u64,
        std::mem::size_of::<g::ferry_cbt_cap>() as u64,
        std::mem::size_of::<g::ferry_cbt_catchup>() as u64,
        std::mem::size_of::<g::ferry_cbt_group_tag>() as u64,
    ];
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(got, want, "C header (left) and Rust (right): ATTACH DETACH STATUS TAG SET_CAP CATCHUP GROUP_TAG, then struct sizes");
}
