//! Sizes and times as people read and write them: what every role's
//! rendering of its views and every size flag share.

/// A byte count for people: `512 B`, `1.5 KiB`, `3.0 GiB` (powers of 1024).
pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A byte size: a number with an optional K, M, G or T (powers of 1024), or `none` (0).
pub fn parse_size(s: &str) -> Option<u64> {
    if s == "none" {
        return Some(0);
    }
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// A wall-clock time (ns since the epoch) as RFC 3339, UTC, with nanoseconds.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_print_in_powers_of_1024() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("none"), Some(0));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(human(100), "100 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
    }
}
