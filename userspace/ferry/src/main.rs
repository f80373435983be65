//! The `ferry` command: parses flags, calls the role crates' operations
//! (`ferry_target::ops`, `ferry_agent`), and prints their views (as JSON, or
//! as the text their `render` modules make). Nothing else lives here.
//! The command-line surface is ../shared/CONTRACT.md (docs/operating.md).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ferry_agent::{Options, Tracker};
use ferry_common::report::RoleReport;
use ferry_common::units::parse_size;
use ferry_target::ops::{self, render};
use ferry_target::store::recover::Format;
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
        /// This machine's identity (from `ferry enroll`): mutual TLS with agents of the same CA; needed to listen outside loopback.
        #[arg(long, value_name = "DIR")]
        identity: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT); loopback only without --identity.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Report to this configuration server (HOST:PORT) and apply its policy; HTTPS with --identity.
        #[arg(long, value_name = "ADDR")]
        config_server: Option<String>,
    },
    /// Relay agents' streams to master targets through a durable spool (acknowledged once spooled).
    ProcessServer {
        /// Address agents connect to, HOST:PORT; loopback only without --identity.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7710")]
        listen: String,
        /// Folder of the spool: one folder per disk, its changes until the master target holds them (created if missing).
        #[arg(long, value_name = "DIR")]
        spool: PathBuf,
        /// Most the spool may hold (e.g. 20G); past it, agents are held back (nothing is lost).
        #[arg(long, value_name = "SIZE")]
        spool_max: String,
        /// The master target(s), HOST:PORT[,HOST:PORT…], tried in order.
        #[arg(long, value_name = "ADDR[,ADDR…]")]
        upstream: String,
        /// This machine's identity (role process-server, from `ferry enroll`): mutual TLS both ways.
        #[arg(long, value_name = "DIR")]
        identity: Option<PathBuf>,
        /// Bandwidth towards the master target for all disks together, e.g. 100Mbit or 10MB (0: no limit).
        #[arg(long, value_name = "RATE", default_value = "0")]
        limit: String,
        /// A weekly schedule of the global limit, local time, first match wins, e.g. 'mon-fri 08:00-18:00=20Mbit; sat,sun 00:00-24:00=0'.
        #[arg(long, value_name = "RULES")]
        limit_schedule: Option<String>,
        /// A limit for one disk, NAME=RATE (repeat for more disks).
        #[arg(long, value_name = "NAME=RATE")]
        limit_disk: Vec<String>,
        /// Entries of the index of content each master target holds (about 200 bytes of memory each, one per 64 KiB unit; 0 turns dedup off).
        #[arg(long, value_name = "N", default_value_t = 1 << 18)]
        dedup_entries: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT); loopback only without --identity.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Report to this configuration server (HOST:PORT) and apply its policy; HTTPS with --identity.
        #[arg(long, value_name = "ADDR")]
        config_server: Option<String>,
    },
    /// Protect one block device or image file.
    Agent {
        /// The block device or image file to protect.
        #[arg(long, value_name = "PATH")]
        disk: PathBuf,
        /// The disk's name on the master target (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// The next hop, HOST:PORT (e.g. 127.0.0.1:7700): a master target or a process server; a comma-separated list is tried in order on every (re)connect.
        #[arg(long, value_name = "ADDR[,ADDR…]")]
        target: String,
        /// This machine's identity (from `ferry enroll`): mutual TLS to the master target; needed for a target outside loopback.
        #[arg(long, value_name = "DIR")]
        identity: Option<PathBuf>,
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
        /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT); loopback only without --identity.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Report to this configuration server (HOST:PORT) and apply its policy; HTTPS with --identity.
        #[arg(long, value_name = "ADDR")]
        config_server: Option<String>,
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
        /// Address to listen on, HOST:PORT (e.g. 127.0.0.1:10809); loopback only unless --identity.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Accept writes, into a scratch overlay that is discarded at exit.
        #[arg(long)]
        writable: bool,
        /// Folder of the scratch files (pre-images and overlay; unlinked).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// This master target's identity: TLS only (NBD STARTTLS), clients need a certificate of the site's CA (qemu: tls-creds-x509 dir=THEIR_IDENTITY).
        #[arg(long, value_name = "DIR")]
        identity: Option<PathBuf>,
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
        #[arg(long, value_name = "DIR", required_unless_present_any = ["data", "identity", "process_server"], conflicts_with_all = ["data", "identity", "process_server"])]
        state: Option<PathBuf>,
        /// A process server, HOST:PORT: where each disk's bytes wait (spool, age, rate, state); with --identity over mutual TLS.
        #[arg(long, value_name = "ADDR", conflicts_with = "data")]
        process_server: Option<String>,
        /// The master target's data folder (with --name).
        #[arg(long, value_name = "DIR", requires = "name")]
        data: Option<PathBuf>,
        /// The disk's name, with --data.
        #[arg(long, requires = "data")]
        name: Option<String>,
        /// An identity folder: its certificate, when it renews, and a warning within 7 days of an expiry.
        #[arg(long, value_name = "DIR", conflicts_with = "data")]
        identity: Option<PathBuf>,
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
    /// The site's certificate authority (run where the CA key is kept).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// One-time join tokens for enrolling machines.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Let an identity write a disk of this master target (the disk's previous owner may no longer).
    Grant {
        /// The master target's data folder.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
        /// The identity, ROLE/NAME as its certificate names it (e.g. agent/db1).
        #[arg(long, value_name = "ROLE/NAME")]
        to: String,
    },
    /// Unbind a disk from its identity: it then refuses every identity until `ferry grant` names an owner.
    Revoke {
        /// The master target's data folder.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The disk's name.
        #[arg(long)]
        name: String,
    },
    /// Enroll this machine with a join token: its key is made here, its certificate comes from `ferry ca serve`.
    Enroll {
        /// The CA server (`ferry ca serve`), HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        server: String,
        /// The join token printed by `ferry token create` (it pins the CA).
        #[arg(long)]
        token: String,
        /// Folder to store the key, certificate, chain and CA in (created 0700; must not hold an identity).
        #[arg(long, value_name = "DIR")]
        identity: PathBuf,
    },
    /// The configuration server: inventory, policies, alerts, recovery plans, REST API, website, metrics.
    ConfigServer(control_cmd::ConfigServer),
    /// The configuration server's API, for scripts (JSON on stdout).
    Ctl(control_cmd::Ctl),
    /// Install ferry on a machine over SSH, enroll it, protect its disks and report their first recovery points.
    PushInstall(push::PushInstall),
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Protects disks (ferry agent).
    Agent,
    /// Caches, compresses and forwards streams (ferry process-server).
    ProcessServer,
    /// Holds replicas and points (ferry master-target).
    MasterTarget,
    /// Hosts the CA, the API and the website (ferry config-server).
    ConfigServer,
}

impl From<RoleArg> for ferry_identity::Role {
    fn from(r: RoleArg) -> ferry_identity::Role {
        use ferry_identity::Role;
        match r {
            RoleArg::Agent => Role::Agent,
            RoleArg::ProcessServer => Role::ProcessServer,
            RoleArg::MasterTarget => Role::MasterTarget,
            RoleArg::ConfigServer => Role::ConfigServer,
        }
    }
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA in DIR (made 0700; the key 0600): ECDSA P-256, 10 years.
    Init {
        /// The CA's folder (must not hold a CA).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Answer enrollments, renewals and revocation-list requests (TLS; the token's pin proves the CA).
    Serve {
        /// The CA's folder.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Address to listen on, HOST:PORT.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Lifetime of the certificates it issues (renewed after two thirds).
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        cert_ttl: String,
    },
    /// Offline: make a key and a certificate for a machine into an identity folder here.
    Issue {
        /// The CA's folder.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// What the machine does.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The machine's name (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// Where to write the identity (created 0700).
        #[arg(long, value_name = "DIR")]
        identity: PathBuf,
        /// Lifetime of the certificate.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        ttl: String,
        /// Host names or IP addresses the certificate also names, comma-separated (for NBD clients that check them).
        #[arg(long, value_name = "HOST,…", value_delimiter = ',')]
        san: Vec<String>,
    },
    /// Revoke a certificate by serial, or every certificate of a machine (NAME or ROLE/NAME).
    Revoke {
        /// The CA's folder.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A serial (hex, as `ferry ca list` shows it), NAME or ROLE/NAME.
        what: String,
    },
    /// The certificates the CA issued.
    List {
        /// The CA's folder.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a one-time join token for one machine (the last line of stdout).
    Create {
        /// The CA's folder.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// What the machine will do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The machine's name (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// How long the token may be used.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        ttl: String,
        /// Host names or IP addresses its certificate will also name, comma-separated (a master target's, for NBD clients that check them).
        #[arg(long, value_name = "HOST,…", value_delimiter = ',')]
        san: Vec<String>,
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

mod control_cmd;
mod identity_cmd;
mod push;
mod role_control;

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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,rustls=error"))
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

/// `ferry status --process-server ADDR`: ask it (STATUS_REQ, protocol v3)
/// and print each disk's state.
fn process_status(addr: &str, identity: Option<&std::path::Path>, json: bool) -> Result<()> {
    let a = ferry_common::net::resolve("process-server", addr, false).map_err(Usage::from)?;
    let tcp = ferry_link::connect_tcp(addr, ferry_link::client::CONNECT_TIMEOUT).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sock = match identity {
        None => {
            if let Some(x) = a.iter().find(|x| !x.ip().is_loopback()) {
                return Err(Usage(format!("--process-server {addr}: {} is not a loopback address: give --identity DIR", x.ip())).into());
            }
            ferry_link::AnyStream::Tcp(tcp)
        }
        Some(dir) => {
            let held = ferry_identity::enroll::Held::load(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
            let v = ferry_identity::tls::PeerVerifier::new(held.trust.clone(), &[ferry_identity::Role::ProcessServer], true);
            let config = ferry_identity::tls::client_config(Some(held.creds.clone()), v).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = ferry_link::TlsStream::connect(tcp, config, ferry_link::client::CONNECT_TIMEOUT)
                .map_err(|e| anyhow::anyhow!("{addr}: TLS handshake: {e}"))?;
            ferry_link::AnyStream::Tls(t)
        }
    };
    let cfg = ferry_link::ClientConfig::new(format!("ferry-status {}", env!("CARGO_PKG_VERSION")));
    let text = ferry_link::client::status(sock, &cfg).map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    if json {
        println!("{text}");
        return Ok(());
    }
    let v: ferry_relay::relay::RelayView =
        serde_json::from_str(&text).with_context(|| format!("{addr}: a status this ferry cannot read"))?;
    use ferry_common::units::human;
    println!(
        "process server {addr} (ferry {}): spool {} of {} in {}, upstream {}",
        v.version,
        human(v.spool_bytes),
        human(v.spool_max),
        v.spool,
        v.upstreams.join(",")
    );
    println!(
        "{:<24} {:<14} {:>10} {:>10} {:>8} {:>10} {:>6} {:>6}  WHY",
        "DISK", "STATE", "SPOOL", "WAITING", "OLDEST", "UP/s", "ZSTD", "AGENT"
    );
    for d in &v.disks {
        println!(
            "{:<24} {:<14} {:>10} {:>10} {:>8} {:>10} {:>5.2}x {:>5.2}x {:>6}  {}",
            d.name,
            d.state,
            human(d.spool_bytes),
            human(d.pending_bytes),
            d.oldest_unsent_s.map_or("-".into(), |s| format!("{s:.1}s")),
            human(d.upstream_rate),
            d.compression_ratio,
            d.dedup_ratio,
            if d.agent_connected { "yes" } else { "no" },
            d.why.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `--metrics ADDR`, checked before anything starts: the listening policy
/// of `--listen` (loopback only without an identity).
fn metrics_addr(addr: Option<&str>, authenticated: bool) -> Result<Option<std::net::SocketAddr>> {
    match addr {
        None => Ok(None),
        Some(a) => Ok(Some(ferry_common::metrics_http::listen_addr(a, authenticated).map_err(Usage::from)?)),
    }
}

/// Serve `report` at http://ADDR/metrics from a thread of its own.
fn start_metrics(addr: std::net::SocketAddr, report: impl Fn() -> RoleReport + Send + Sync + 'static) -> Result<()> {
    let bound = ferry_common::metrics_http::serve(addr, ferry_common::metrics_http::from_report(report))?;
    log::info!("metrics at http://{bound}/metrics");
    Ok(())
}

/// A role's report named as its identity names the machine, with the
/// certificate's expiry (read at each report: renewals change it).
fn with_identity(mut r: RoleReport, creds: Option<&ferry_identity::tls::Credentials>) -> RoleReport {
    if let Some(c) = creds {
        let id = c.identity();
        r.name = id.name;
        r.cert_expires_unix = Some(id.not_after);
    }
    r
}

/// The agent's report; before its state can be read (or if it cannot),
/// its disk with the state `unknown` and why.
fn agent_report(state: &std::path::Path, name: &str) -> RoleReport {
    match ferry_agent::status::report(state, ferry_common::now_ns()) {
        Ok(r) => r,
        Err(e) => {
            let mut r = RoleReport::new("agent");
            r.disks.push(ferry_common::report::DiskReport {
                name: name.into(),
                state: "unknown".into(),
                reason: Some(e.to_string()),
                ..Default::default()
            });
            r
        }
    }
}

/// A comma-separated list of addresses (`--target`, `--upstream`), each
/// checked.
fn split_targets(opt: &'static str, list: &str) -> Result<Vec<String>> {
    let v: Vec<String> = list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if v.is_empty() {
        return Err(Usage(format!("--{opt} {list:?}: expected HOST:PORT[,HOST:PORT…]")).into());
    }
    for t in &v {
        ferry_common::net::resolve(opt, t, false).map_err(Usage::from)?;
    }
    Ok(v)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Ca { cmd } => identity_cmd::ca(cmd),
        Cmd::Token { cmd } => identity_cmd::token(cmd),
        Cmd::Enroll { server, token, identity } => identity_cmd::enroll(&server, &token, &identity),
        Cmd::PushInstall(a) => push::run(a),
        Cmd::ConfigServer(a) => control_cmd::config_server(a),
        Cmd::Ctl(a) => control_cmd::ctl(a),
        Cmd::Grant { data, name, to } => identity_cmd::grant(&data, &name, &to),
        Cmd::Revoke { data, name } => identity_cmd::revoke(&data, &name),
        Cmd::MasterTarget { listen, data, scrub_every, scrub_rate, idle_timeout, max_connections, identity, metrics, config_server } => {
            let idle = humantime::parse_duration(&idle_timeout)
                .ok()
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| anyhow::anyhow!("--idle-timeout {idle_timeout:?}: expected a duration of at least 1s, e.g. 60s"))?;
            if max_connections == 0 {
                anyhow::bail!("--max-connections must be at least 1");
            }
            let listen = match &identity {
                Some(_) => ferry_common::net::resolve("listen", &listen, true).map_err(Usage::from)?[0],
                None => ferry_common::net::listen_addr("listen", &listen).map_err(Usage::from)?,
            };
            let metrics = metrics_addr(metrics.as_deref(), identity.is_some())?;
            let held = identity_cmd::held(identity.as_deref(), ferry_identity::Role::MasterTarget)?;
            let rate =
                parse_size(&scrub_rate).ok_or_else(|| anyhow::anyhow!("--scrub-rate {scrub_rate:?}: expected a size like 100M, or 0"))?;
            let scrub = match &scrub_every {
                Some(v) => Some(humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("--scrub-every {v:?}: {e} (e.g. 24h, 30min)"))?),
                None => None,
            };
            let l = ferry_target::server::bind(listen, &data, held.is_some())?;
            if let Some(every) = scrub {
                ops::start_scrub(&data, every, rate);
            }
            match &held {
                Some(h) => log::info!(
                    "master target {} listening on {listen} (mutual TLS), data in {}",
                    h.creds.identity().label(),
                    data.display()
                ),
                None => log::info!("master target listening on {listen}, data in {}", data.display()),
            }
            let limits = ferry_target::server::Limits { idle, max_connections };
            let live = std::sync::Arc::new(ferry_target::server::Live::default());
            if let Some(a) = metrics {
                let (live, data, creds) = (std::sync::Arc::clone(&live), data.clone(), held.as_ref().map(|h| h.creds.clone()));
                start_metrics(a, move || with_identity(ops::report(&data, &live), creds.as_deref()))?;
            }
            if let Some(cs) = &config_server {
                let (l2, d2, creds) = (std::sync::Arc::clone(&live), data.clone(), held.as_ref().map(|h| h.creds.clone()));
                role_control::start(
                    cs,
                    identity.as_deref(),
                    move || with_identity(ops::report(&d2, &l2), creds.as_deref()),
                    Default::default(),
                    None,
                    role_control::master_target_hooks(data.clone()),
                )?;
            }
            ferry_target::server::serve_live(l, &data, limits, held, live).context("serving")?;
            Ok(())
        }
        Cmd::ProcessServer {
            listen,
            spool,
            spool_max,
            upstream,
            identity,
            limit,
            limit_schedule,
            limit_disk,
            dedup_entries,
            metrics,
            config_server,
        } => {
            use ferry_relay::limit;
            let mut limits =
                limit::Limits { global: limit::parse_rate(&limit).map_err(|e| Usage(format!("--limit: {e}")))?, ..Default::default() };
            if let Some(r) = &limit_schedule {
                limits.schedule = limit::parse_schedule(r).map_err(|e| Usage(format!("--limit-schedule: {e}")))?;
            }
            for d in &limit_disk {
                let (n, r) = d.split_once('=').ok_or_else(|| Usage(format!("--limit-disk {d:?}: expected NAME=RATE")))?;
                if !ferry_proto::valid_name(n) {
                    return Err(Usage(format!("--limit-disk {d:?}: {n:?} is not a disk name")).into());
                }
                if let Some(v) = limit::parse_rate(r).map_err(|e| Usage(format!("--limit-disk: {e}")))? {
                    limits.per_disk.insert(n.to_string(), v);
                }
            }
            let max = parse_size(&spool_max)
                .filter(|&m| m > 0)
                .ok_or_else(|| Usage(format!("--spool-max {spool_max:?}: expected a size like 20G")))?;
            let upstreams = split_targets("upstream", &upstream)?;
            let listen = match &identity {
                Some(_) => ferry_common::net::resolve("listen", &listen, true).map_err(Usage::from)?[0],
                None => ferry_common::net::listen_addr("listen", &listen).map_err(Usage::from)?,
            };
            let metrics = metrics_addr(metrics.as_deref(), identity.is_some())?;
            let held = identity_cmd::held(identity.as_deref(), ferry_identity::Role::ProcessServer)?;
            if held.is_none() {
                for u in &upstreams {
                    let addrs = ferry_common::net::resolve("upstream", u, false).map_err(Usage::from)?;
                    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                        return Err(Usage(format!(
                            "--upstream {u}: {} is not a loopback address; ferry sends nothing in plaintext off this machine: give --identity DIR",
                            a.ip()
                        ))
                        .into());
                    }
                }
            }
            std::fs::create_dir_all(&spool).with_context(|| format!("spool folder {}", spool.display()))?;
            let l = std::net::TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
            log::info!(
                "process server listening on {listen}, spool in {} (at most {spool_max}), upstream {}",
                spool.display(),
                upstreams.join(",")
            );
            let cfg = ferry_relay::relay::RelayConfig { spool, spool_max: max, upstreams, limits, dedup_entries };
            let creds = held.as_ref().map(|h| h.creds.clone());
            let ps = ferry_relay::ProcessServer::open(cfg, held).context("serving")?;
            if let Some(a) = metrics {
                let relay = ps.relay();
                let creds = creds.clone();
                start_metrics(a, move || with_identity(relay.report(), creds.as_deref()))?;
            }
            if let Some(cs) = &config_server {
                let relay = ps.relay();
                role_control::start(
                    cs,
                    identity.as_deref(),
                    move || with_identity(relay.report(), creds.as_deref()),
                    Default::default(),
                    None,
                    role_control::process_server_hooks(ps.relay()),
                )?;
            }
            ps.serve(l).context("serving")?;
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
            identity,
            metrics,
            config_server,
        } => {
            // Before anything is opened or attached: a bad address is bad usage.
            let targets = split_targets("target", &target)?;
            let metrics = metrics_addr(metrics.as_deref(), identity.is_some())?;
            let mut creds = None;
            match identity_cmd::held(identity.as_deref(), ferry_identity::Role::Agent)? {
                Some(h) => {
                    creds = Some(h.creds.clone());
                    ferry_agent::session::use_identity(h)?
                }
                None => {
                    let mut addrs = Vec::new();
                    for t in &targets {
                        addrs.extend(ferry_common::net::resolve("target", t, false).map_err(Usage::from)?);
                    }
                    let allowed = |ip: std::net::IpAddr| ip.is_loopback() || ferry_common::testing::get().plaintext_target == Some(ip);
                    if let Some(a) = addrs.iter().find(|a| !allowed(a.ip())) {
                        return Err(Usage(format!(
                            "--target {target}: {} is not a loopback address; ferry sends nothing in plaintext off this machine: \
                             give --identity DIR (enroll first: `ferry enroll --server ADDR --token TOKEN --identity DIR`)",
                            a.ip()
                        ))
                        .into());
                    }
                }
            }
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
            let name_for_metrics = name.clone();
            let live: std::sync::Arc<ferry_common::control::Live> = Default::default();
            let opts = Options {
                disk,
                name,
                target,
                tracker,
                state,
                once: once || verify,
                point_every: Duration::from_secs_f64(point_every),
                live: live.clone(),
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
            let state_dir = opts.state.clone();
            let agent = ferry_agent::Agent::new(opts)?;
            if let Some(a) = metrics {
                let disk_name = name_for_metrics.clone();
                let (state_dir, creds) = (state_dir.clone(), creds.clone());
                start_metrics(a, move || with_identity(agent_report(&state_dir, &disk_name), creds.as_deref()))?;
            }
            if let Some(cs) = &config_server {
                let disk_name = name_for_metrics.clone();
                let cache = state_dir.join("policy.state");
                let sd = state_dir.clone();
                role_control::start(
                    cs,
                    identity.as_deref(),
                    move || with_identity(agent_report(&sd, &disk_name), creds.as_deref()),
                    live,
                    Some(cache),
                    Default::default(),
                )?;
            }
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
                for l in ferry_agent::status::render::summary(&s) {
                    println!("{l}");
                }
            }
            if let Some(e) = ferry_agent::status::render::verify_failure(&s) {
                anyhow::bail!(e);
            }
            Ok(())
        }
        Cmd::Points { data, name, json } => {
            let v = ops::points(&data, &name)?;
            // The failover state: a line above the table, or on stderr with
            // --json (the array stays as it is).
            if let Some(line) = render::points_failover(&v) {
                if json {
                    eprintln!("{name}: {line}");
                } else {
                    println!("{line}");
                }
            }
            if json {
                println!("{}", serde_json::to_string(&v.points)?);
            } else {
                for l in render::points_table(&v) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        Cmd::Recover { data, name, point, out, format, force } => {
            let v = ops::recover(&data, &name, &point, &out, format.map(Format::from), force)?;
            eprintln!("{}", render::recovered(&v));
            Ok(())
        }
        Cmd::Export { data, name, point, listen, writable, scratch, identity } => {
            let addr = match &identity {
                Some(_) => ferry_common::net::resolve("listen", &listen, true).map_err(Usage::from)?[0],
                None => ferry_common::net::listen_addr("listen", &listen).map_err(Usage::from)?,
            };
            let tls = match identity_cmd::held(identity.as_deref(), ferry_identity::Role::MasterTarget)? {
                Some(h) => Some(identity_cmd::export_tls(&h)?),
                None => None,
            };
            let export = ops::export(&data, &name, &point, addr, writable, scratch.as_deref())?;
            eprintln!("{}", render::exporting(&export.view));
            export.serve(tls)?;
            Ok(())
        }
        Cmd::Retention { data, name, keep, keep_all, keep_hourly, journal_cap } => {
            let edit =
                ops::RetentionEdit::from_flags(keep.as_deref(), keep_all.as_deref(), keep_hourly.as_deref(), journal_cap.as_deref())?;
            let v = ops::retention_set(&data, &name, &edit)?;
            println!("{}", render::retention(&v));
            // Applied now if no master target is writing the disk (else it
            // does at its next point).
            let pass = ops::retention_apply(&data, &name)?;
            eprintln!("{}", render::retention_applied(&name, pass));
            Ok(())
        }
        Cmd::GroupTag { disks } => {
            let id = ferry_agent::kmod::group_tag(&disks)?;
            println!("{id}");
            Ok(())
        }
        Cmd::GroupPoints { data, names, json } => {
            let v = ops::group_points(&data, &names)?;
            if json {
                println!("{}", serde_json::to_string(&v.rows)?);
            } else {
                for l in render::group_points(&v) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        Cmd::Failover { data, name, point, out, format, force, start, commit, cancel } => {
            if commit || cancel {
                let v = ops::failover_finish(&data, &name, commit)?;
                eprintln!("{}", render::failover_finished(&v));
                return Ok(());
            }
            let (point, out) = (point.expect("clap requires --point"), out.expect("clap requires --out"));
            let v = ops::failover(&data, &name, &point, &out, format.map(Format::from), force)?;
            eprintln!("{}", render::failed_over(&v));
            println!("{}", v.command);
            if start {
                ops::start_qemu(&v.command)?;
            }
            Ok(())
        }
        Cmd::FreezeGuard { deadline_ms, thaw_cmd, mounts } => {
            ferry_agent::freeze::run_guard(Duration::from_millis(deadline_ms), thaw_cmd.as_deref(), &mounts);
            Ok(())
        }
        Cmd::Repair { data, name } => {
            let rep = ops::repair(&data, &name)?;
            for l in render::repair(&name, &rep) {
                println!("{l}");
            }
            Ok(())
        }
        Cmd::Unprotect { state, force } => {
            let name = ferry_agent::unprotect(&state, force)?;
            eprintln!("{name}: tracking stopped; the replica and its recovery points are kept");
            Ok(())
        }
        Cmd::Status { process_server: Some(addr), identity, json, .. } => process_status(&addr, identity.as_deref(), json),
        Cmd::Status { identity: Some(dir), json, .. } => identity_cmd::status(&dir, json),
        Cmd::Status { state: None, data: Some(data), name: Some(name), json, .. } => {
            let s = ops::disk_status(&data, &name)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                for l in render::disk_status(&s) {
                    println!("{l}");
                }
            }
            Ok(())
        }
        Cmd::Status { state: None, .. } => unreachable!("clap requires --state or --data with --name"),
        Cmd::Verify { data, name, rate, json } => {
            let rate = parse_size(rate.trim_end_matches("/s"))
                .ok_or_else(|| anyhow::anyhow!("--rate {rate:?}: expected a size a second like 200M, or 0"))?;
            let o = ops::verify(&data, &name, rate)?;
            if json {
                println!("{}", serde_json::to_string(&o)?);
            } else {
                for l in render::verify(&name, &o) {
                    println!("{l}");
                }
            }
            if let Some(e) = render::verify_failure(&name, &o) {
                anyhow::bail!(e);
            }
            Ok(())
        }
        Cmd::Status { state: Some(state), json, .. } => {
            let s = ferry_agent::status::agent_status(&state, ferry_common::now_ns())?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                for l in ferry_agent::status::render::status(&s) {
                    println!("{l}");
                }
            }
            Ok(())
        }
    }
}
