//! The `ferry` command: parses flags and calls into the role crates.
//! The command-line surface is ../shared/CONTRACT.md (docs/operating.md).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_agent::{Options, Tracker};
use ferry_target::recover::{self, Format, Selector};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Continuous block-level disaster-recovery replication",
    after_help = "Logging: RUST_LOG sets what is logged on stderr: error, warn, info (the default), debug or trace, \
                  for all of ferry or per module (e.g. RUST_LOG=info,ferry_agent=debug). \
                  Exit status: 0 success, 1 failure (one line on stderr says why), 2 bad usage."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum TrackerArg {
    /// kmod if its module is loaded, else bpf for a block device (with BTF), else scan.
    Auto,
    /// The kernel module (cbt-module/kmod): every write's payload, in order.
    Kmod,
    /// The eBPF tracker: pinned, keeps tracking while the agent restarts.
    Bpf,
    /// No tracker: checksum passes find what changed.
    Scan,
    /// (testing) Records another program pushes into STATE/ring.
    Ring,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// A raw disk image.
    Raw,
    /// A qcow2 image (made with qemu-img).
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve replication streams; DIR holds one folder per protected disk.
    MasterTarget {
        /// Address to listen on, HOST:PORT; loopback only (127.0.0.0/8, ::1) until ferry authenticates its peers.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
        listen: String,
        /// Folder of the protected disks' replicas, journals and points (created if missing).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Verify every disk (ferry verify) this often, e.g. 24h; results in `ferry status --data`.
        #[arg(long, value_name = "DURATION")]
        scrub_every: Option<String>,
        /// Read at most this much a second while scrubbing (e.g. 100M; 0 for no limit).
        #[arg(long, value_name = "SIZE", default_value = "100M")]
        scrub_rate: String,
        /// Drop a stream silent this long and release its disk (agents ping after 10 s of silence).
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        idle_timeout: String,
        /// Connections served at once; more are refused as busy.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        max_connections: usize,
    },
    /// Protect one block device or image file.
    Agent {
        /// The block device or image file to protect.
        #[arg(long, value_name = "PATH")]
        disk: PathBuf,
        /// The disk's name on the master target (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// The master target, HOST:PORT (e.g. 127.0.0.1:7700).
        #[arg(long, value_name = "ADDR")]
        target: String,
        /// How changes are found.
        #[arg(long, value_enum, default_value = "auto")]
        tracker: TrackerArg,
        /// Agent state folder (default /var/lib/ferry/agent/NAME).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Ship until the replica equals the source at a consistent point, then exit.
        #[arg(long)]
        once: bool,
        /// With --once: print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Seconds between recovery points.
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        point_every: f64,
        /// Shell command run before each app-consistent cut (before the filesystem freeze).
        #[arg(long, value_name = "CMD")]
        freeze_cmd: Option<String>,
        /// Shell command run after each app-consistent cut (after the thaw).
        #[arg(long, value_name = "CMD")]
        thaw_cmd: Option<String>,
        /// Slots in STATE/ring when the agent creates it (power of two).
        #[arg(long, value_name = "N", default_value_t = ferry_agent::DEFAULT_RING)]
        ring_capacity: u64,
        /// With --once: give up after this many seconds without the master target.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        connect_timeout: u64,
        /// Longest a filesystem freeze may last before it is abandoned.
        #[arg(long, value_name = "SECS", default_value_t = 5.0)]
        freeze_cap: f64,
        /// Size of the bpf tracker's ring buffer (records beyond it fall back to its bitmap).
        #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
        bpf_ring_bytes: u32,
        /// Memory the kernel module may hold write payloads in (data mode), in MiB:
        /// a power of two up to 1024, or 0 for metadata mode only.
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kmod_data_mib: u64,
        /// Ship until a point (as --once), then compare the whole source with the replica by
        /// checksum (online verify), sending nothing; exit 1 when they differ.
        #[arg(long)]
        verify: bool,
        /// With --verify: send exactly the ranges that differ, then cut a point.
        #[arg(long, requires = "verify")]
        repair: bool,
    },
    /// (internal) Thaw filesystems if the agent that froze them dies or overruns.
    #[command(hide = true)]
    FreezeGuard {
        /// Thaw when this many milliseconds have passed.
        #[arg(long)]
        deadline_ms: u64,
        /// Run after the thaw.
        #[arg(long)]
        thaw_cmd: Option<String>,
        /// The frozen mount points.
        mounts: Vec<PathBuf>,
    },
    /// Stop protecting a disk: detach the tracker, keep the replica and its points.
    Unprotect {
        /// The agent's state folder (its --state).
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Detach the tracker even if it belongs to another state folder.
        #[arg(long)]
        force: bool,
    },
    /// List recovery points, oldest first, with why retention keeps each.
    Points {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// Print a JSON array of {"id", "time", "kind", "seq", "kept"}.
        #[arg(long)]
        json: bool,
    },
    /// Materialize a recovery point as an image.
    Recover {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// A point id, `latest`, or an RFC 3339 time (the newest point at or before it).
        #[arg(long, value_name = "ID|latest|TIME")]
        point: String,
        /// A new file (written beside it, then renamed into place), or a block device
        /// that is not mounted or in use and holds the whole disk.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Image format (default: from the extension, .qcow2 or .img/.raw; else raw).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Serve a recovery point over NBD (export name NAME) while replication continues.
    Export {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name (also the NBD export name).
        #[arg(long)]
        name: String,
        /// A point id, `latest`, or an RFC 3339 time (the newest point at or before it).
        #[arg(long, value_name = "ID|latest|TIME")]
        point: String,
        /// Address to listen on, HOST:PORT (e.g. 127.0.0.1:10809); loopback only, the export has no authentication.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Accept writes, into a scratch overlay that is discarded at exit.
        #[arg(long)]
        writable: bool,
        /// Folder of the scratch files (pre-images and overlay; unlinked).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
    },
    /// Fail a disk over: refuse its stream, write a point as a bootable image, print how to start it.
    /// Run again with another point until --commit; --cancel resumes replication.
    #[command(
        override_usage = "ferry failover --data DIR --name NAME --point ID|latest|TIME --out PATH [--format raw|qcow2] [--force] [--start]\n       \
                                ferry failover --data DIR --name NAME --commit\n       \
                                ferry failover --data DIR --name NAME --cancel"
    )]
    Failover {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// Required unless --commit or --cancel: a point id, `latest`, or an RFC 3339 time
        /// (the newest point at or before it).
        #[arg(long, value_name = "ID|latest|TIME", required_unless_present_any = ["commit", "cancel"])]
        point: Option<String>,
        /// Required unless --commit or --cancel: the image to write (the rules of `ferry recover --out`;
        /// the image an earlier failover of this disk wrote may be rewritten without --force).
        #[arg(long, value_name = "PATH", required_unless_present_any = ["commit", "cancel"])]
        out: Option<PathBuf>,
        /// Image format (default: from the extension, .qcow2 or .img/.raw; else raw).
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Start the image with QEMU (the printed command line) once written.
        #[arg(long)]
        start: bool,
        /// Make the failover final.
        #[arg(long, conflicts_with_all = ["point", "out", "cancel", "start", "force", "format"])]
        commit: bool,
        /// Undo the failover: the disk's stream is accepted again (a running agent resumes by itself).
        #[arg(long, conflicts_with_all = ["point", "out", "start", "force", "format"])]
        cancel: bool,
    },
    /// Set (or show) a disk's retention: how long points are kept, how they thin out, how much journal.
    /// A disk with none set has the default: keep 3 days; every point for 1 h, one an hour up to
    /// 24 h, then one a day; a journal of at most the disk's size.
    Retention {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// Drop points older than this (e.g. 7d, 12h); `none` keeps them all.
        #[arg(long, value_name = "DURATION")]
        keep: Option<String>,
        /// Keep every point younger than this (`none`: every point in the window).
        #[arg(long, value_name = "DURATION")]
        keep_all: Option<String>,
        /// Keep one point an hour up to this age, one a day beyond (`none`: hourly in the whole window).
        #[arg(long, value_name = "DURATION")]
        keep_hourly: Option<String>,
        /// Largest journal after the oldest kept point (e.g. 50G); `none` for no limit.
        #[arg(long, value_name = "SIZE")]
        journal_cap: Option<String>,
    },
    /// Cut a consistency group's shared point: one TAG at the same instant in every disk's stream
    /// (kernel module tracker; each disk's agent running). Prints the cut's id (its time, ns).
    GroupTag {
        /// A disk of the group (2 to 8; repeat the option).
        #[arg(long = "disk", value_name = "PATH", required = true)]
        disks: Vec<PathBuf>,
    },
    /// A consistency group's points: the cuts every named disk has a point for.
    GroupPoints {
        /// The master target's data folder (its --data).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// A disk of the group (repeat the option).
        #[arg(long = "name", value_name = "NAME", required = true)]
        names: Vec<String>,
        /// Print a JSON array of {"time", "time_ns", "points": {NAME: ID}}.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a damaged disk folder, keeping what it can: files given up are moved into
    /// DIR/NAME/damaged-TIME/, and what each step cost is printed.
    Repair {
        /// The master target's data folder.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name (its folder under DIR).
        #[arg(long)]
        name: String,
    },
    /// The agent's view: tracker, mode, lag, bytes pending, last point.
    /// With --data and --name: the master target's view of a disk instead (points, journal,
    /// free space, the last verify).
    Status {
        /// The agent's state folder.
        #[arg(long, value_name = "DIR", required_unless_present = "data", conflicts_with = "data")]
        state: Option<PathBuf>,
        /// The master target's data folder (with --name).
        #[arg(long, value_name = "DIR", requires = "name")]
        data: Option<PathBuf>,
        /// The disk's name, with --data.
        #[arg(long, requires = "data")]
        name: Option<String>,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check a disk folder end to end (a scrub): the replica against its chunk sums, the
    /// journal's records and chain, the catalog and the metadata. Runs while a master target
    /// serves the disk. Exit 1 when it finds damage.
    Verify {
        /// The master target's data folder.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// Read at most this much a second (e.g. 200M; 0 for no limit).
        #[arg(long, value_name = "SIZE", default_value = "0")]
        rate: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Bad usage found after parsing (an address, a value out of range): exit 2.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

impl From<ferry_common::net::AddrError> for Usage {
    fn from(e: ferry_common::net::AddrError) -> Usage {
        Usage(e.to_string())
    }
}

/// Every line ferry prints on stdout goes through this `println!`, which
/// shadows std's: a reader that went away (`ferry status | head -1`) ends
/// ferry quietly with status 0 (what it wanted was printed), where std's
/// would panic; another write error ends it with a one-line error.
macro_rules! println {
    () => {
        out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        out_line(format_args!($($arg)*))
    };
}

fn out_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("ferry: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// The one line of an error: each cause once. Library errors carry their
/// cause in their own message (so that a log line shows it too) and also
/// expose it as their source; a cause whose text is already said is skipped.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for c in e.chain() {
        let t = c.to_string();
        if msg.contains(&t) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&t);
    }
    msg.replace('\n', " ")
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("ferry: internal error: {info}; please report this");
    }));
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .format_target(false)
        .init();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry: {}", one_line(&e));
            if e.downcast_ref::<Usage>().is_some() {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::MasterTarget { listen, data, scrub_every, scrub_rate, idle_timeout, max_connections } => {
            let idle = humantime::parse_duration(&idle_timeout)
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| anyhow::anyhow!("--idle-timeout {idle_timeout:?}: expected a duration of at least 1s, e.g. 60s"))?;
            if max_connections == 0 {
                anyhow::bail!("--max-connections must be at least 1");
            }
            let listen = ferry_common::net::listen_addr("listen", &listen).map_err(Usage::from)?;
            let rate =
                parse_size(&scrub_rate).ok_or_else(|| anyhow::anyhow!("--scrub-rate {scrub_rate:?}: expected a size like 100M, or 0"))?;
            let scrub = match &scrub_every {
                Some(v) => Some(humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("--scrub-every {v:?}: {e} (e.g. 24h, 30min)"))?),
                None => None,
            };
            let l = ferry_target::server::bind(listen, &data)?;
            if let Some(every) = scrub {
                let d = data.clone();
                std::thread::spawn(move || ferry_target::verify::scrub_loop(&d, every, rate));
            }
            log::info!("master target listening on {listen}, data in {}", data.display());
            let limits = ferry_target::server::Limits { idle, max_connections };
            ferry_target::server::serve_with(l, &data, limits).context("serving")?;
            Ok(())
        }
        Cmd::Agent {
            disk,
            name,
            target,
            tracker,
            state,
            once,
            json,
            point_every,
            freeze_cmd,
            thaw_cmd,
            ring_capacity,
            connect_timeout,
            freeze_cap,
            bpf_ring_bytes,
            kmod_data_mib,
            verify,
            repair,
        } => {
            // Before anything is opened or attached: a bad address is bad usage.
            ferry_common::net::check_target(&target).map_err(Usage::from)?;
            if !(point_every.is_finite() && point_every > 0.0) {
                anyhow::bail!("--point-every must be a positive number of seconds");
            }
            if !(freeze_cap.is_finite() && freeze_cap > 0.0) {
                anyhow::bail!("--freeze-cap must be a positive number of seconds");
            }
            if !(4096..=1 << 30).contains(&bpf_ring_bytes) {
                anyhow::bail!("--bpf-ring-bytes must be between 4096 and 1073741824");
            }
            if kmod_data_mib != 0 && !(kmod_data_mib.is_power_of_two() && kmod_data_mib <= 1024) {
                anyhow::bail!("--kmod-data-mib must be 0 or a power of two up to 1024");
            }
            let tracker = match tracker {
                TrackerArg::Auto => Tracker::Auto,
                TrackerArg::Kmod => Tracker::Kmod,
                TrackerArg::Bpf => Tracker::Bpf,
                TrackerArg::Scan => Tracker::Scan,
                TrackerArg::Ring => Tracker::Ring,
            };
            let state = state.unwrap_or_else(|| PathBuf::from("/var/lib/ferry/agent").join(&name));
            let opts = Options {
                disk,
                name,
                target,
                tracker,
                state,
                once: once || verify,
                point_every: Duration::from_secs_f64(point_every),
                freeze_cmd,
                thaw_cmd,
                ring_capacity,
                connect_timeout: Duration::from_secs(connect_timeout),
                freeze_cap: Duration::from_secs_f64(freeze_cap),
                bpf_ring_bytes,
                kmod_data_bytes: kmod_data_mib << 20,
                progress: !json && std::io::stderr().is_terminal(),
                verify: verify.then_some(repair),
            };
            let agent = ferry_agent::Agent::new(opts)?;
            // A failed run says what it leaves attached.
            let attached = agent.left_attached();
            let s = match agent.run() {
                Err(ferry_agent::AgentError::Stopped(sig)) => {
                    eprintln!("ferry: agent stopped by {sig}");
                    return Ok(());
                }
                r => r.map_err(|e| match &attached {
                    Some(a) => anyhow::anyhow!("{e}; {a}"),
                    None => e.into(),
                })?,
            };
            if let Some(a) = attached.filter(|_| once) {
                log::info!("{a} (kept on purpose: the next run reads only what changed)");
            }
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{}: recovery point {} ({}) at seq {}; read {} sent {} in {:.1}s (tracker {})",
                    s.name,
                    s.point_id,
                    s.point_kind,
                    s.seq,
                    human(s.bytes_read),
                    human(s.bytes_sent),
                    s.seconds,
                    s.tracker
                );
                if let Some(d) = &s.verify_differing {
                    for (a, b) in d {
                        println!("{}: the replica differed from the source in [{a}, {b}) ({} bytes)", s.name, b - a);
                    }
                    match s.repaired_bytes {
                        Some(n) => println!("{}: {n} bytes re-sent; the replica equals the source at point {}", s.name, s.point_id),
                        None if d.is_empty() => println!("{}: verify: the replica equals the source", s.name),
                        None => {}
                    }
                }
            }
            if let (Some(d), None) = (&s.verify_differing, s.repaired_bytes) {
                if !d.is_empty() {
                    anyhow::bail!(
                        "verify: the replica of {} differs from the source in {} range(s) ({} bytes); --repair re-sends them",
                        s.name,
                        d.len(),
                        d.iter().map(|(a, b)| b - a).sum::<u64>()
                    );
                }
            }
            Ok(())
        }
        Cmd::Points { data, name, json } => {
            let pts = recover::points(&data, &name)?;
            // The failover state: a line above the table, or on stderr
            // with --json (the array stays as it is).
            if let Some(f) = ferry_target::failover::state(&data, &name)? {
                let state = if f.state == "committed" { "committed" } else { "pending" };
                let line = format!("failed over to point {} ({state}) since {}", f.point, recover::rfc3339(f.since_ns));
                if json {
                    eprintln!("{name}: {line}");
                } else {
                    println!("{line}");
                }
            }
            let meta = ferry_target::disk::read_meta(&data, &name)?;
            // Why each point is kept: the decision a retention pass makes now
            // (None: the next pass drops it).
            let why = ferry_target::retention::reasons(&ferry_target::disk::Paths::new(&data, &name), meta.size, &pts)?;
            if json {
                let v: Vec<_> = pts
                    .iter()
                    .zip(&why)
                    .map(|(p, w)| serde_json::json!({"id": p.id, "time": recover::rfc3339(p.time_ns), "kind": p.kind.as_str(), "seq": p.seq, "kept": w.map(|r| r.as_str())}))
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{:>6}  {:<32}  {:<5}  {:>12}  {}", "ID", "TIME", "KIND", "SEQ", "KEPT");
                for (p, w) in pts.iter().zip(&why) {
                    let w = w.map_or("expiring", |r| r.as_str());
                    println!("{:>6}  {:<32}  {:<5}  {:>12}  {w}", p.id, recover::rfc3339(p.time_ns), p.kind.as_str(), p.seq);
                }
            }
            Ok(())
        }
        Cmd::Recover { data, name, point, out, format, force } => {
            let sel: Selector = point.parse()?;
            let pts = recover::points(&data, &name)?;
            let p = recover::select(&name, &pts, &sel, &point)?;
            let output = recover::prepare(&data, &name, &out, format.map(Format::from), force)?;
            let fmt = output.format();
            recover::write(&data, &name, &p, output)?;
            eprintln!(
                "recovered {name} point {} ({}, {}) to {} ({})",
                p.id,
                p.kind.as_str(),
                recover::rfc3339(p.time_ns),
                out.display(),
                fmt.as_str()
            );
            Ok(())
        }
        Cmd::Export { data, name, point, listen, writable, scratch } => {
            let addr = ferry_common::net::listen_addr("listen", &listen).map_err(Usage::from)?;
            let sel: Selector = point.parse()?;
            let pts = recover::points(&data, &name)?;
            let p = recover::select(&name, &pts, &sel, &point)?;
            let scratch = scratch.unwrap_or_else(std::env::temp_dir);
            // Pinned before it is opened: retention keeps a pinned point; it
            // must still be listed once the pin is there.
            let paths = ferry_target::disk::Paths::new(&data, &name);
            let _pin = ferry_target::retention::Pin::new(&paths, p.id)?;
            {
                // Under the shared recovery lock: a retention pass either
                // saw the pin or finished before this look.
                let _g = ferry_target::disk::lock_recoveries(&paths, libc::LOCK_SH).ok();
                if !recover::points(&data, &name)?.iter().any(|q| q.id == p.id) {
                    anyhow::bail!("point {} of {name} was dropped by retention just now; choose another", p.id);
                }
            }
            let view = ferry_target::view::PointView::open(&data, &name, p, writable, &scratch)?;
            let listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            eprintln!(
                "serving {name} point {} ({}, {}) as NBD export {name:?} on nbd://{}/{name}{}",
                p.id,
                p.kind.as_str(),
                recover::rfc3339(p.time_ns),
                listener.local_addr()?,
                if writable { " (writable: writes go to a scratch overlay, discarded at exit)" } else { " (read-only)" }
            );
            ferry_target::nbd::serve(listener, name, view)?;
            Ok(())
        }
        Cmd::Retention { data, name, keep, keep_all, keep_hourly, journal_cap } => {
            let paths = ferry_target::disk::Paths::new(&data, &name);
            let meta = ferry_target::disk::read_meta(&data, &name)?;
            let (mut pol, set) = ferry_target::retention::effective(&paths, meta.size)?;
            // `none` lifts the limit: no age limit for --keep (0), every
            // point or one an hour forever for the others (u64::MAX).
            let dur = |what: &str, v: &str| -> Result<u64> {
                if v == "none" {
                    return Ok(if what == "keep" { 0 } else { u64::MAX });
                }
                let d = humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("--{what} {v:?}: {e} (e.g. 90s, 2h, 7days)"))?;
                Ok(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            };
            let changed = keep.is_some() || keep_all.is_some() || keep_hourly.is_some() || journal_cap.is_some();
            if let Some(v) = &keep {
                pol.keep_ns = dur("keep", v)?;
            }
            if let Some(v) = &keep_all {
                pol.all_ns = dur("keep-all", v)?;
            }
            if let Some(v) = &keep_hourly {
                pol.hourly_ns = dur("keep-hourly", v)?;
            }
            if let Some(v) = &journal_cap {
                pol.journal_cap =
                    parse_size(v).ok_or_else(|| anyhow::anyhow!("--journal-cap {v:?}: expected a size like 512M, 50G, or none"))?;
            }
            if changed {
                ferry_target::retention::store(&paths, &pol)?;
            }
            println!("{name}: {}{}", policy_text(&pol), if set || changed { "" } else { " (the default for a disk with no policy set)" });
            // Apply now if no master target is writing the disk (else it does
            // at its next point).
            match ferry_target::retention::apply_offline(&data, &name) {
                Ok(Some(p)) => eprintln!("{name}: {} points dropped, {} kept", p.dropped, p.kept),
                Ok(None) => eprintln!("{name}: a master target is serving this disk; it applies the policy at the next point"),
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
        Cmd::GroupTag { disks } => {
            let id = ferry_agent::kmod::group_tag(&disks)?;
            println!("{id}");
            Ok(())
        }
        Cmd::GroupPoints { data, names, json } => {
            let mut per: Vec<Vec<ferry_target::catalog::Point>> = Vec::new();
            for n in &names {
                per.push(recover::points(&data, n)?);
            }
            let mut rows = Vec::new();
            for p in &per[0] {
                if p.kind != ferry_proto::PointKind::Group {
                    continue;
                }
                let ids: Option<Vec<u64>> = per
                    .iter()
                    .map(|v| v.iter().find(|q| q.kind == ferry_proto::PointKind::Group && q.time_ns == p.time_ns).map(|q| q.id))
                    .collect();
                if let Some(ids) = ids {
                    rows.push((p.time_ns, ids));
                }
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(t, ids)| {
                        let m: serde_json::Map<String, serde_json::Value> =
                            names.iter().zip(ids).map(|(n, id)| (n.clone(), serde_json::json!(id))).collect();
                        serde_json::json!({"time": recover::rfc3339(*t), "time_ns": t, "points": m})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                for (t, ids) in &rows {
                    let parts: Vec<String> = names.iter().zip(ids).map(|(n, id)| format!("{n}={id}")).collect();
                    println!("{}  {}", recover::rfc3339(*t), parts.join(" "));
                }
            }
            Ok(())
        }
        Cmd::Failover { data, name, point, out, format, force, start, commit, cancel } => {
            if commit || cancel {
                ferry_target::failover::finish(&data, &name, commit)?;
                eprintln!(
                    "{name}: {}",
                    if commit {
                        "failover committed: its stream is refused for good (a waiting agent stops); \
                         to replicate this disk again, protect it under a new name"
                    } else {
                        "failover cancelled: its stream is accepted again; a running agent resumes by itself \
                         within a few seconds (one that exited must be started again)"
                    }
                );
                return Ok(());
            }
            let (point, out) = (point.expect("clap requires --point"), out.expect("clap requires --out"));
            let sel: Selector = point.parse()?;
            let pts = recover::points(&data, &name)?;
            let p = recover::select(&name, &pts, &sel, &point)?;
            let (_, fmt) = ferry_target::failover::failover(&data, &name, &p, &out, format.map(Format::from), force)?;
            let cmd = ferry_target::failover::qemu_command(&out, fmt);
            eprintln!(
                "{name}: failed over to point {} ({}, {}), written to {}; its stream is refused until \
                 `ferry failover --commit` (final) or `--cancel` (a running agent waits, then resumes); \
                 another --point may still be chosen",
                p.id,
                p.kind.as_str(),
                recover::rfc3339(p.time_ns),
                out.display()
            );
            println!("{cmd}");
            if start {
                let st = std::process::Command::new("sh").arg("-c").arg(&cmd).status().context("starting qemu-system-x86_64")?;
                if !st.success() {
                    anyhow::bail!("qemu-system-x86_64 exited with {st}");
                }
            }
            Ok(())
        }
        Cmd::FreezeGuard { deadline_ms, thaw_cmd, mounts } => {
            ferry_agent::freeze::run_guard(Duration::from_millis(deadline_ms), thaw_cmd.as_deref(), &mounts);
            Ok(())
        }
        Cmd::Repair { data, name } => {
            let rep = ferry_target::repair::repair(&data, &name)?;
            for s in &rep.steps {
                println!("{name}: {s}");
            }
            if let Some(a) = &rep.aside {
                println!("{name}: files given up are in {}", a.display());
            }
            Ok(())
        }
        Cmd::Unprotect { state, force } => {
            let name = ferry_agent::unprotect(&state, force)?;
            eprintln!("{name}: tracking stopped; the replica and its recovery points are kept");
            Ok(())
        }
        Cmd::Status { state: None, data: Some(data), name: Some(name), json } => {
            let s = ferry_target::verify::disk_status(&data, &name)?;
            if json {
                outln(format_args!("{}", serde_json::to_string(&s)?));
                return Ok(());
            }
            outln(format_args!("health     {}: {}", s.health, s.health_reason));
            outln(format_args!("disk       {} ({}){}", s.name, human(s.size), if s.streaming { ", a stream is open" } else { "" }));
            match (s.newest_point, s.newest_point_age_seconds) {
                (Some(id), Some(age)) => outln(format_args!("points     {} kept, newest {id} ({age:.0}s old)", s.points)),
                _ => outln(format_args!("points     none")),
            }
            outln(format_args!(
                "journal    {} on disk{}",
                human(s.journal_bytes),
                s.durable_seq.map(|d| format!(", replica durable to seq {d}")).unwrap_or_default()
            ));
            if let (Some(f), Some(t)) = (s.free_bytes, s.fs_bytes) {
                outln(format_args!("space      {} free of {}", human(f), human(t)));
            }
            match &s.last_verify {
                Some(v) => outln(format_args!(
                    "verify     {} at {}: {} chunks in {:.1}s",
                    if v.ok() { "clean".to_string() } else { format!("{} damaged range(s)", v.damage.len()) },
                    recover::rfc3339(v.time_ns),
                    v.chunks_checked,
                    v.seconds
                )),
                None => outln(format_args!("verify     never run (ferry verify, or master-target --scrub-every)")),
            }
            if let Some(v) = &s.last_verify {
                for d in &v.damage {
                    outln(format_args!("DAMAGE     {} at byte {} (+{}): {}", d.file, d.offset, d.len, d.what));
                }
            }
            if let Some(d) = &s.damage {
                outln(format_args!("DAMAGED    {d}"));
            }
            if let Some(f) = &s.failover {
                outln(format_args!("failover   {f}"));
            }
            Ok(())
        }
        Cmd::Status { state: None, .. } => unreachable!("clap requires --state or --data with --name"),
        Cmd::Verify { data, name, rate, json } => {
            let rate = parse_size(rate.trim_end_matches("/s"))
                .ok_or_else(|| anyhow::anyhow!("--rate {rate:?}: expected a size a second like 200M, or 0"))?;
            let o = ferry_target::verify::verify(&data, &name, rate)?;
            if json {
                outln(format_args!("{}", serde_json::to_string(&o)?));
            } else {
                for d in &o.damage {
                    let pts = if d.points.is_empty() { String::new() } else { format!("; points affected: {:?}", d.points) };
                    outln(format_args!("{name}: DAMAGE {} at byte {} (+{} bytes): {}{pts}", d.file, d.offset, d.len, d.what));
                }
                outln(format_args!(
                    "{name}: {} chunks of the replica and the journal checked in {:.1}s ({} read): {}",
                    o.chunks_checked,
                    o.seconds,
                    human(o.bytes_read),
                    if o.ok() { "no damage".to_string() } else { format!("{} damaged range(s)", o.damage.len()) }
                ));
            }
            if !o.ok() {
                anyhow::bail!("verify found {} damaged range(s) in disk {name} (listed above)", o.damage.len());
            }
            Ok(())
        }
        Cmd::Status { state: Some(state), json, .. } => {
            let (st, ring) = ferry_agent::status(&state)?;
            let now = now_ns();
            let live = ferry_agent::liveness(&state, &st, now);
            let lag_s = if st.last_ack_ns > 0 { (now.saturating_sub(st.last_ack_ns)) as f64 / 1e9 } else { f64::NAN };
            let pending = ring.map(|r| r.pending).unwrap_or(0);
            if json {
                let v = serde_json::json!({
                    "name": st.name, "disk": st.disk, "tracker": st.tracker, "mode": live.mode,
                    "running": live.running, "pid": live.pid, "connected": live.connected,
                    "disconnected_seconds": live.disconnected_seconds, "last_error": st.last_error,
                    "stopped_reason": live.stopped_reason,
                    "health": live.health, "health_reason": live.health_reason,
                    "rpo_seconds": live.rpo_seconds, "point_every_seconds": st.point_every_s,
                    "target": st.target,
                    "initial_sync_cursor": st.sync_cursor, "resync_required": st.resync_required,
                    "acked_seq": st.acked_seq,
                    "seconds_since_last_ack": if lag_s.is_finite() { serde_json::json!(lag_s) } else { serde_json::Value::Null },
                    "records_pending": pending,
                    "ring_overflows": ring.map(|r| r.overflows),
                    "last_point": st.last_point.as_ref().map(|p| serde_json::json!({"id": p.id, "seq": p.seq, "kind": p.kind, "time": recover::rfc3339(p.time_ns)})),
                    "bytes_sent_total": st.bytes_sent_total, "bytes_read_total": st.bytes_read_total,
                    "bpf_drops": st.bpf_drops,
                    "bpf_recovered": st.bpf_recovered,
                    "bpf_unguarded": st.bpf_unguarded,
                    "kmod_mode": st.kmod_mode,
                    "kmod_catchups": st.kmod_catchups,
                    "cut_problem": st.cut_problem,
                    "failover": st.failover,
                    "lag_ms_p50": pct(&st.lag_ms_recent, 0.5),
                    "lag_ms_p99": pct(&st.lag_ms_recent, 0.99),
                    "freeze_ms_p50": pct(&st.freeze_ms_recent, 0.5),
                    "freeze_ms_p99": pct(&st.freeze_ms_recent, 0.99),
                });
                outln(format_args!("{v}"));
            } else {
                outln(format_args!("health     {}: {}", live.health.as_str(), live.health_reason));
                outln(format_args!("disk       {} ({}, {})", st.name, st.disk, human(st.size)));
                let agent = match (live.running, live.pid) {
                    (true, Some(p)) if p > 0 => format!("agent running (pid {p})"),
                    (true, _) => "agent running".to_string(),
                    (false, _) => format!("agent not running: {}", live.stopped_reason.as_deref().unwrap_or("-")),
                };
                outln(format_args!("tracker    {}   mode {}   {agent}", st.tracker, live.mode));
                match (live.connected, live.disconnected_seconds) {
                    (true, _) => outln(format_args!("target     {} (connected)", st.target)),
                    (false, Some(d)) => outln(format_args!(
                        "target     {} (disconnected for {d:.0}s: {})",
                        st.target,
                        st.last_error.as_deref().unwrap_or("connecting")
                    )),
                    (false, None) => outln(format_args!("target     {}", st.target)),
                }
                if let Some(c) = st.sync_cursor {
                    outln(format_args!("sync       {:.1}% of the initial sync durable", c as f64 * 100.0 / st.size as f64));
                }
                if let Some(r) = &st.resync_required {
                    outln(format_args!("RESYNC     required: {r}"));
                }
                match (&st.last_point, live.rpo_seconds) {
                    (Some(p), Some(r)) => {
                        outln(format_args!("last point {} ({}) at {}, {r:.1}s ago (RPO)", p.id, p.kind, recover::rfc3339(p.time_ns)))
                    }
                    _ => outln(format_args!("last point none yet")),
                }
                outln(format_args!(
                    "acked      seq {}{}; sent {}, read {}",
                    st.acked_seq,
                    if lag_s.is_finite() { format!(", {lag_s:.1}s ago") } else { String::new() },
                    human(st.bytes_sent_total),
                    human(st.bytes_read_total)
                ));
                if let Some(r) = ring {
                    outln(format_args!("ring       {} of {} records pending, {} overflows", r.pending, r.capacity, r.overflows));
                }
                if let Some(m) = &st.kmod_mode {
                    outln(format_args!("kmod       {m} mode, {} catch-up(s) from bitmap mode", st.kmod_catchups));
                }
                if let Some(p) = &st.cut_problem {
                    outln(format_args!("POINTS     {p}"));
                }
                if let Some(f) = &st.failover {
                    println!("FAILOVER   {f}");
                }
                if let (Some(a), Some(b)) = (pct(&st.lag_ms_recent, 0.5), pct(&st.lag_ms_recent, 0.99)) {
                    outln(format_args!(
                        "lag        p50 {a:.1} ms, p99 {b:.1} ms (write to durable, last {} batches)",
                        st.lag_ms_recent.len()
                    ));
                }
                if let (Some(a), Some(b)) = (pct(&st.freeze_ms_recent, 0.5), pct(&st.freeze_ms_recent, 0.99)) {
                    outln(format_args!("freeze     p50 {a:.1} ms, p99 {b:.1} ms over the last {} freezes", st.freeze_ms_recent.len()));
                }
                if st.tracker == "bpf" {
                    outln(format_args!("bpf        {} records fell back to the bitmap", st.bpf_drops));
                    if st.bpf_recovered > 0 {
                        outln(format_args!(
                            "bpf        {} completions the kernel did not run the tracker for were caught at reissue",
                            st.bpf_recovered
                        ));
                    }
                    if st.bpf_unguarded > 0 {
                        outln(format_args!(
                            "bpf        {} writes issued on tags outside the in-flight table (a missed completion of one needs a resync)",
                            st.bpf_unguarded
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Print a line on stdout; a reader that went away (`ferry status | head`)
/// ends the command quietly with exit 0 instead of a panic.
fn outln(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ferry: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// The `q` quantile (nearest rank) of `v`.
fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i])
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn human(b: u64) -> String {
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

/// A retention policy as a sentence, e.g. "keep points for 3days: every
/// point for 1h, then one an hour up to 1day, then one a day; journal at
/// most 512.0 MiB after the oldest kept point".
fn policy_text(p: &ferry_target::retention::Policy) -> String {
    let d = |ns: u64| humantime::format_duration(Duration::from_secs(ns / 1_000_000_000)).to_string();
    let limit = if p.keep_ns == 0 { u64::MAX } else { p.keep_ns };
    let mut tiers: Vec<String> = Vec::new();
    if p.all_ns >= limit {
        tiers.push("every point".into());
    } else {
        if p.all_ns > 0 {
            tiers.push(format!("every point for {}", d(p.all_ns)));
        }
        if p.hourly_ns > p.all_ns {
            tiers.push(if p.hourly_ns >= limit { "one an hour".into() } else { format!("one an hour up to {}", d(p.hourly_ns)) });
        }
        if p.hourly_ns < limit {
            tiers.push("one a day".into());
        }
    }
    let window = if p.keep_ns == 0 { "keep points forever".to_string() } else { format!("keep points for {}", d(p.keep_ns)) };
    let cap = if p.journal_cap == 0 {
        "no journal cap".to_string()
    } else {
        format!("journal at most {} after the oldest kept point", human(p.journal_cap))
    };
    format!("{window}: {}; {cap}; the newest point is always kept", tiers.join(", then "))
}

/// A byte size: a number with an optional K, M, G or T (powers of 1024), or `none` (0).
fn parse_size(s: &str) -> Option<u64> {
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
