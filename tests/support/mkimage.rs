//! `ferry-mkimage`: the sample images of the tests, for the demo and the
//! benchmark.
//!
//! ```text
//! ferry-mkimage mixed PATH SIZE_MIB SEED    quarter zeros/text/random/repeated blocks
//! ferry-mkimage change PATH FRACTION SEED   overwrite that fraction of 4 KiB blocks
//! ferry-mkimage workload PATH BLOCKS SEED LOG [COUNT [PAUSE_US]]
//!     versioned-block writes (tests/support versioned), one at a time with
//!     O_DIRECT|O_DSYNC, each logged to LOG (one block index per line) after
//!     it completes; runs COUNT writes, or until killed, pausing PAUSE_US
//!     microseconds after each
//! ferry-mkimage workload-rate PATH BLOCKS SEED LOG COUNT IOPS [DEPTH]
//!     the same, COUNT writes at about IOPS a second with up to DEPTH (1)
//!     in flight, write i issued once every write up to i - DEPTH completed
//!     (the log is written once all completed); prints the rate achieved
//! ferry-mkimage workload2 PATH_A PATH_B BLOCKS SEED LOG [COUNT [PAUSE_US]]
//!     the same over two disks (a consistency group), logged as `DISK BLOCK`
//! ferry-mkimage check2 IMAGE_A IMAGE_B LOG BLOCKS
//!     the checker for workload2: both images after one prefix of the log
//! ferry-mkimage check IMAGE LOG BLOCKS [DEPTH]
//!     the checker: prints the length of the log prefix IMAGE equals (with
//!     DEPTH, of a workload-rate log: the newest write in IMAGE, every write
//!     settled before it present), or says why it equals none (exit 1)
//! ```

use std::path::Path;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: ferry-mkimage mixed PATH SIZE_MIB SEED | change PATH FRACTION SEED | workload PATH BLOCKS SEED LOG [COUNT [PAUSE_US]] | check IMAGE LOG BLOCKS");
        std::process::exit(2)
    };
    if a.len() >= 6 && a[1] == "workload" {
        let blocks: u64 = a[3].parse().unwrap_or_else(|_| usage());
        let seed: u64 = a[4].parse().unwrap_or_else(|_| usage());
        let count: u64 = a.get(6).map_or(u64::MAX, |c| c.parse().unwrap_or_else(|_| usage()));
        let pause_us: u64 = a.get(7).map_or(0, |c| c.parse().unwrap_or_else(|_| usage()));
        let pause = std::time::Duration::from_micros(pause_us);
        if let Err(e) = ferry_tests::versioned::run_workload(Path::new(&a[2]), blocks, seed, Path::new(&a[5]), count, pause) {
            eprintln!("ferry-mkimage workload: {e}");
            std::process::exit(1);
        }
        return;
    }
    if (a.len() == 8 || a.len() == 9) && a[1] == "workload-rate" {
        let n = |i: usize| -> u64 { a[i].parse().unwrap_or_else(|_| usage()) };
        let depth = if a.len() == 9 { n(8) } else { 1 };
        match ferry_tests::versioned::run_workload_rate(Path::new(&a[2]), n(3), n(4), Path::new(&a[5]), n(6), n(7), depth) {
            Ok(r) => println!("{r:.0}"),
            Err(e) => {
                eprintln!("ferry-mkimage workload-rate: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if a.len() >= 7 && a[1] == "workload2" {
        let blocks: u64 = a[4].parse().unwrap_or_else(|_| usage());
        let seed: u64 = a[5].parse().unwrap_or_else(|_| usage());
        let count: u64 = a.get(7).map_or(u64::MAX, |c| c.parse().unwrap_or_else(|_| usage()));
        let pause = std::time::Duration::from_micros(a.get(8).map_or(0, |c| c.parse().unwrap_or_else(|_| usage())));
        if let Err(e) =
            ferry_tests::versioned::run_workload2([Path::new(&a[2]), Path::new(&a[3])], blocks, seed, Path::new(&a[6]), count, pause)
        {
            eprintln!("ferry-mkimage workload2: {e}");
            std::process::exit(1);
        }
        return;
    }
    if a.len() == 6 && a[1] == "check2" {
        let blocks: u64 = a[5].parse().unwrap_or_else(|_| usage());
        match ferry_tests::versioned::check2([Path::new(&a[2]), Path::new(&a[3])], Path::new(&a[4]), blocks) {
            Ok(k) => println!("{k}"),
            Err(e) => {
                eprintln!("ferry-mkimage check2: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if (a.len() == 5 || a.len() == 6) && a[1] == "check" {
        let blocks: u64 = a[4].parse().unwrap_or_else(|_| usage());
        let depth: u64 = a.get(5).map_or(1, |d| d.parse().unwrap_or_else(|_| usage()));
        let log = ferry_tests::versioned::read_log(Path::new(&a[3]));
        match ferry_tests::versioned::check_window(Path::new(&a[2]), &log, blocks, depth) {
            Ok(k) => println!("{k}"),
            Err(e) => {
                eprintln!("ferry-mkimage check {}: {e}", a[2]);
                std::process::exit(1);
            }
        }
        return;
    }
    if a.len() != 5 {
        usage();
    }
    let seed: u64 = a[4].parse().unwrap_or_else(|_| usage());
    match a[1].as_str() {
        "mixed" => {
            let mib: u64 = a[3].parse().unwrap_or_else(|_| usage());
            if mib == 0 || !mib.is_multiple_of(4) {
                eprintln!("ferry-mkimage: SIZE_MIB must be a positive multiple of 4");
                std::process::exit(2);
            }
            ferry_tests::mixed_image(Path::new(&a[2]), mib << 20, seed);
        }
        "change" => {
            let f: f64 = a[3].parse().unwrap_or_else(|_| usage());
            let n = ferry_tests::change_blocks(Path::new(&a[2]), f, seed);
            println!("{n}");
        }
        _ => usage(),
    }
}
