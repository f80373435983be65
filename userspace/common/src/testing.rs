//! Test and benchmark switches: the only environment variables that change
//! what ferry does, kept out of the production configuration (flags and
//! state files). Each is read once, the first time any is asked for, and
//! none is meant for a production system (docs/testing.md, "Test-only
//! switches").
//!
//! | variable | effect | used by |
//! |----------|--------|---------|
//! | `FERRY_BPF_TEST_SKIP_EVERY=N` | the eBPF tracker ignores every Nth write completion (and then every Nth issue of a tag), to prove a missed completion is still shipped | ferry-bpf, tests/integration/bpf.rs |
//! | `FERRY_BPF_TEST_DISCARD_MULTI` (set) | the eBPF program checks every discard against the multi-range path | ferry-bpf, tests/guest/bpf-test.sh |
//! | `FERRY_NO_COFW=1` | the master target journals every overwrite (no copy on first write per interval), to measure what that saves | master target disk.rs, scripts/bench-mt |
//! | `FERRY_NO_SUMS=1` | the master target keeps and checks no replica sums, to measure what they cost | master target settle.rs, scripts/bench-mt |
//! | `FERRY_TEST_PLAINTEXT_TARGET=IP` | `ferry agent` without `--identity` may send plaintext to this one non-loopback address (QEMU's user network maps the host's loopback to 10.0.2.2 in a guest) | ferry main.rs, tests/guest/lib.sh |

use std::sync::OnceLock;

/// The switches as read from the environment at first use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// `FERRY_BPF_TEST_SKIP_EVERY`: ignore every Nth completion (N > 0).
    pub bpf_skip_every: Option<u32>,
    /// `FERRY_BPF_TEST_DISCARD_MULTI` is set (to anything).
    pub bpf_discard_multi: bool,
    /// `FERRY_NO_COFW=1`.
    pub no_cofw: bool,
    /// `FERRY_NO_SUMS=1`.
    pub no_sums: bool,
    /// `FERRY_TEST_PLAINTEXT_TARGET=IP`: the guest harness's host address.
    pub plaintext_target: Option<std::net::IpAddr>,
}

impl Switches {
    /// Read them from the environment now.
    pub fn from_env() -> Switches {
        let one = |k: &str| std::env::var_os(k).is_some_and(|v| v == "1");
        Switches {
            bpf_skip_every: std::env::var("FERRY_BPF_TEST_SKIP_EVERY").ok().and_then(|v| v.parse::<u32>().ok()),
            bpf_discard_multi: std::env::var_os("FERRY_BPF_TEST_DISCARD_MULTI").is_some(),
            no_cofw: one("FERRY_NO_COFW"),
            no_sums: one("FERRY_NO_SUMS"),
            plaintext_target: std::env::var("FERRY_TEST_PLAINTEXT_TARGET").ok().and_then(|v| v.parse().ok()),
        }
    }
}

/// The switches of this process (read once).
pub fn get() -> &'static Switches {
    static S: OnceLock<Switches> = OnceLock::new();
    S.get_or_init(Switches::from_env)
}
