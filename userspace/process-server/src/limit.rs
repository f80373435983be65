//! Bandwidth towards the master target: a global limit that may follow a
//! weekly schedule, per-disk limits, and fair sharing between the disks
//! that have something to send.
//!
//! Every forwarder asks [`Limiter::take`] for the bytes of each frame before
//! it sends it. Tokens refill at the rate in force; the global bucket holds
//! at most [`BURST`] of them, and a frame larger than what is there drives
//! it negative (the next frames wait), so the long-run rate is exact.
//! Fairness: of the disks waiting, the one that has been served the fewest
//! bytes goes first; a disk that starts waiting is counted from the least
//! any waiting disk has been served, so a disk that was alone for an hour
//! does not starve a newcomer, nor the newcomer it.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Most tokens a bucket keeps (bytes): what may go out at once after a pause.
pub const BURST: f64 = 256.0 * 1024.0;

/// A rate in bytes a second; `None` is unlimited.
pub type Rate = Option<f64>;

/// Parse a rate: `0`, `none` or `unlimited` for no limit; a number with an
/// optional K/M/G prefix (powers of 1000 for bits, of 1024 for bytes) and
/// `bit` (bits a second, e.g. `20Mbit`) or `B` (bytes a second, e.g.
/// `5MB`); a bare number is bytes a second.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let bad = || format!("rate {s:?}: expected e.g. 20Mbit, 5MB, 500K or 0 for no limit");
    let l = t.to_ascii_lowercase();
    if matches!(l.as_str(), "0" | "none" | "unlimited") {
        return Ok(None);
    }
    let (num, unit) = l.split_at(l.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(l.len()));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().trim_end_matches("/s").trim_end_matches("ps");
    let (mul, bits) = match unit {
        "" | "b" => (1.0, false),
        "k" | "kb" | "kib" => (1024.0, false),
        "m" | "mb" | "mib" => (1024.0 * 1024.0, false),
        "g" | "gb" | "gib" => (1024.0 * 1024.0 * 1024.0, false),
        "bit" => (1.0, true),
        "kbit" => (1e3, true),
        "mbit" => (1e6, true),
        "gbit" => (1e9, true),
        _ => return Err(bad()),
    };
    let v = if bits { n * mul / 8.0 } else { n * mul };
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(Some(v))
}

/// One rule of a weekly schedule: on `days` (bit 0 = Monday), from
/// `from` to `to` (minutes since midnight, local time; `to` may be 24:00),
/// the global limit is `rate`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub days: u8,
    pub from: u16,
    pub to: u16,
    pub rate: Rate,
}

/// Parse a schedule: rules separated by `;`, each `DAYS HH:MM-HH:MM=RATE`
/// with DAYS `mon`..`sun`, a range `mon-fri`, a list `sat,sun`, or `*`. The
/// first rule that matches the local time wins; outside every rule, the
/// global limit (`--limit`) holds. Example: `mon-fri 08:00-18:00=20Mbit`.
pub fn parse_schedule(s: &str) -> Result<Vec<Rule>, String> {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |d: &str| DAYS.iter().position(|x| *x == d).ok_or_else(|| format!("schedule: unknown day {d:?} (mon..sun)"));
    let hm = |t: &str| -> Result<u16, String> {
        let (h, m) = t.split_once(':').ok_or_else(|| format!("schedule: time {t:?}: expected HH:MM"))?;
        let (h, m): (u16, u16) =
            (h.parse().map_err(|_| format!("schedule: time {t:?}"))?, m.parse().map_err(|_| format!("schedule: time {t:?}"))?);
        if h > 24 || m > 59 || (h == 24 && m > 0) {
            return Err(format!("schedule: time {t:?} is not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let mut out = Vec::new();
    for r in s.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (when, rate) = r.rsplit_once('=').ok_or_else(|| format!("schedule rule {r:?}: expected DAYS HH:MM-HH:MM=RATE"))?;
        let (days_s, span) = when.trim().split_once(' ').ok_or_else(|| format!("schedule rule {r:?}: expected DAYS HH:MM-HH:MM=RATE"))?;
        let mut days = 0u8;
        for part in days_s.split(',') {
            let part = part.trim().to_ascii_lowercase();
            if part == "*" {
                days = 0x7f;
            } else if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (day(a)?, day(b)?);
                if a > b {
                    return Err(format!("schedule rule {r:?}: day range {part} runs backwards"));
                }
                for d in a..=b {
                    days |= 1 << d;
                }
            } else {
                days |= 1 << day(&part)?;
            }
        }
        let (a, b) = span.trim().split_once('-').ok_or_else(|| format!("schedule rule {r:?}: expected HH:MM-HH:MM"))?;
        let (from, to) = (hm(a.trim())?, hm(b.trim())?);
        if from >= to {
            return Err(format!("schedule rule {r:?}: {a} is not before {b} (split a span over midnight into two rules)"));
        }
        out.push(Rule { days, from, to, rate: parse_rate(rate)? });
    }
    Ok(out)
}

/// Local day of week (0 = Monday) and minute of the day, now.
fn local_now() -> (u8, u16) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `t` and `tm` are valid for the call; localtime_r is the
    // thread-safe variant and writes only into `tm`.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        return (0, 0);
    }
    (((tm.tm_wday + 6) % 7) as u8, (tm.tm_hour * 60 + tm.tm_min) as u16)
}

/// The limits in force.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub global: Rate,
    pub schedule: Vec<Rule>,
    pub per_disk: HashMap<String, f64>,
}

impl Limits {
    /// The global rate at local time (`day`, `minute`).
    pub fn global_at(&self, day: u8, minute: u16) -> Rate {
        self.schedule.iter().find(|r| r.days & (1 << day) != 0 && (r.from..r.to).contains(&minute)).map_or(self.global, |r| r.rate)
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket { tokens: BURST, last: Instant::now() }
    }
    fn refill(&mut self, rate: f64, now: Instant) {
        self.tokens = (self.tokens + rate * now.duration_since(self.last).as_secs_f64()).min(BURST);
        self.last = now;
    }
}

struct State {
    global: Bucket,
    disks: HashMap<String, Bucket>,
    /// Bytes served per disk, on the fairness clock.
    served: HashMap<String, f64>,
    /// Disks inside `take`, with the tokens each needs.
    waiting: HashMap<String, f64>,
    /// Disks with something to send (from their first `take` to `idle`).
    active: std::collections::HashSet<String>,
    /// The global rate, re-read from the schedule every second.
    rate: Rate,
    rate_at: Option<Instant>,
    /// Per-disk rates from the configuration server's policies (a
    /// `--limit-disk` of the same disk wins).
    policy: HashMap<String, f64>,
}

/// The process server's limiter, shared by every forwarder.
pub struct Limiter {
    limits: Limits,
    m: Mutex<State>,
    cv: Condvar,
    /// Some policy rate is set (read without the lock by `limits_anything`).
    has_policy: std::sync::atomic::AtomicBool,
}

impl Limiter {
    pub fn new(limits: Limits) -> Limiter {
        Limiter {
            limits,
            m: Mutex::new(State {
                global: Bucket::new(),
                disks: HashMap::new(),
                served: HashMap::new(),
                waiting: HashMap::new(),
                active: Default::default(),
                rate: None,
                rate_at: None,
                policy: HashMap::new(),
            }),
            cv: Condvar::new(),
            has_policy: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether any limit is set at all (none: `take` returns at once).
    pub fn limits_anything(&self) -> bool {
        self.limits.global.is_some()
            || !self.limits.schedule.is_empty()
            || !self.limits.per_disk.is_empty()
            || self.has_policy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-disk rates the configuration server's policies set (bytes a
    /// second), replacing the previous ones.
    pub fn set_policy_rates(&self, rates: HashMap<String, f64>) {
        let mut st = self.m.lock().unwrap_or_else(|p| p.into_inner());
        self.has_policy.store(!rates.is_empty(), std::sync::atomic::Ordering::Relaxed);
        st.policy = rates;
        self.cv.notify_all();
    }

    fn disk_rate(&self, st: &State, disk: &str) -> Option<f64> {
        self.limits.per_disk.get(disk).or_else(|| st.policy.get(disk)).copied()
    }

    /// Wait until `disk` may send `n` bytes; returns how long it waited.
    pub fn take(&self, disk: &str, n: u64) -> Duration {
        if !self.limits_anything() {
            return Duration::ZERO;
        }
        let start = Instant::now();
        let mut st = self.m.lock().unwrap_or_else(|p| p.into_inner());
        if !st.active.contains(disk) {
            // A disk that had nothing to send joins at the fairness clock of
            // the busy ones: no credit for the time it was idle.
            let floor = st.active.iter().filter_map(|d| st.served.get(d)).cloned().fold(f64::INFINITY, f64::min);
            let floor = if floor.is_finite() { floor } else { 0.0 };
            let s = st.served.entry(disk.to_string()).or_insert(0.0);
            *s = s.max(floor);
            st.active.insert(disk.to_string());
        }
        let need = (n as f64).min(BURST);
        st.waiting.insert(disk.to_string(), need);
        loop {
            let now = Instant::now();
            if st.rate_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                let (d, m) = local_now();
                st.rate = self.limits.global_at(d, m);
                st.rate_at = Some(now);
            }
            let rate = st.rate;
            if let Some(r) = rate {
                st.global.refill(r, now);
            }
            let per = self.disk_rate(&st, disk);
            if let Some(r) = per {
                st.disks.entry(disk.to_string()).or_insert_with(Bucket::new).refill(r, now);
            }
            // My turn: the fewest bytes served among the waiting disks that
            // their own limit lets send now.
            let mine = st.served.get(disk).copied().unwrap_or(0.0);
            let ahead = st.waiting.iter().any(|(d, &need_d)| {
                // A disk its own limit holds back does not block the others.
                d != disk
                    && st.served.get(d).copied().unwrap_or(0.0) < mine
                    && (self.disk_rate(&st, d).is_none() || st.disks.get(d).is_some_and(|b| b.tokens >= need_d))
            });
            let global_ok = rate.is_none() || st.global.tokens >= need;
            let own_ok = per.is_none() || st.disks.get(disk).is_some_and(|b| b.tokens >= need);
            if !ahead && global_ok && own_ok {
                if rate.is_some() {
                    st.global.tokens -= n as f64;
                }
                if per.is_some() {
                    if let Some(b) = st.disks.get_mut(disk) {
                        b.tokens -= n as f64;
                    }
                }
                *st.served.entry(disk.to_string()).or_insert(0.0) += n as f64;
                st.waiting.remove(disk);
                self.cv.notify_all();
                return start.elapsed();
            }
            st = self.cv.wait_timeout(st, Duration::from_millis(5)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// `disk` has nothing more to send for now: it stops holding its place.
    pub fn idle(&self, disk: &str) {
        let mut st = self.m.lock().unwrap_or_else(|p| p.into_inner());
        st.active.remove(disk);
        if st.waiting.remove(disk).is_some() {
            self.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn policy_rates_apply_unless_the_command_line_names_the_disk() {
        let mut per = HashMap::new();
        per.insert("cli".to_string(), 1e6);
        let l = Limiter::new(Limits { global: None, schedule: Vec::new(), per_disk: HashMap::new() });
        assert!(!l.limits_anything());
        l.set_policy_rates([("a".to_string(), 2e6)].into_iter().collect());
        assert!(l.limits_anything());
        let st = l.m.lock().unwrap();
        assert_eq!(l.disk_rate(&st, "a"), Some(2e6));
        assert_eq!(l.disk_rate(&st, "b"), None);
        drop(st);
        l.set_policy_rates(HashMap::new());
        assert!(!l.limits_anything(), "cleared policies limit nothing");
        let l = Limiter::new(Limits { global: None, schedule: Vec::new(), per_disk: per });
        l.set_policy_rates([("cli".to_string(), 5e6)].into_iter().collect());
        let st = l.m.lock().unwrap();
        assert_eq!(l.disk_rate(&st, "cli"), Some(1e6), "--limit-disk wins");
    }

    #[test]
    fn rates_and_schedules_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_rate("0"), Ok(None));
        assert_eq!(parse_rate("20Mbit"), Ok(Some(2.5e6)));
        assert_eq!(parse_rate("5MB"), Ok(Some(5.0 * 1024.0 * 1024.0)));
        assert_eq!(parse_rate("500K"), Ok(Some(500.0 * 1024.0)));
        for bad in ["", "fast", "-1M", "5Q"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let s = parse_schedule("mon-fri 08:00-18:00=20Mbit; sat,sun 00:00-24:00=0").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].days, 0b0011111);
        assert_eq!(s[1].days, 0b1100000);
        let l = Limits { global: Some(1e9), schedule: s, per_disk: HashMap::new() };
        assert_eq!(l.global_at(0, 9 * 60), Some(2.5e6), "Monday 09:00: business hours");
        assert_eq!(l.global_at(0, 19 * 60), Some(1e9), "Monday 19:00: the global limit");
        assert_eq!(l.global_at(6, 9 * 60), None, "Sunday: unlimited");
        for bad in ["mon 08:00=1M", "xyz 08:00-09:00=1M", "mon 18:00-08:00=1M", "mon 08:00-25:00=1M"] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_busy_disks_share_the_limit_equally_and_the_rate_holds() {
        let l = Arc::new(Limiter::new(Limits { global: Some(4.0 * 1024.0 * 1024.0), ..Default::default() }));
        let start = Instant::now();
        let until = start + Duration::from_millis(1500);
        let run = |name: &'static str, frame: u64| {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while Instant::now() < until {
                    l.take(name, frame);
                    sent += frame;
                }
                sent
            })
        };
        // Unequal frame sizes: shares are by bytes, not by frames.
        let a = run("a", 64 << 10);
        let b = run("b", 16 << 10);
        let (a, b) = (a.join().unwrap() as f64, b.join().unwrap() as f64);
        let secs = start.elapsed().as_secs_f64();
        let rate = (a + b) / secs;
        assert!((rate - 4.0 * 1048576.0).abs() < 0.15 * 4.0 * 1048576.0, "rate {rate}");
        assert!((a / b - 1.0).abs() < 0.15, "shares {a} {b}");
    }

    #[test]
    fn a_disk_under_its_own_limit_does_not_hold_the_others_back() {
        let mut per = HashMap::new();
        per.insert("slow".to_string(), 256.0 * 1024.0);
        let l = Arc::new(Limiter::new(Limits { global: Some(8.0 * 1024.0 * 1024.0), schedule: Vec::new(), per_disk: per }));
        let until = Instant::now() + Duration::from_millis(1000);
        let run = |name: &'static str| {
            let l = Arc::clone(&l);
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while Instant::now() < until {
                    l.take(name, 64 << 10);
                    sent += 64 << 10;
                }
                sent
            })
        };
        let (s, f) = (run("slow"), run("fast"));
        let (s, f) = (s.join().unwrap() as f64, f.join().unwrap() as f64);
        assert!(s < 1.0 * 1048576.0, "the slow disk keeps to its limit: {s}");
        assert!(f > 4.0 * 1048576.0, "the other disk is not held back: {f}");
    }
}
