//! `ferry push-install`: install ferry on a machine over SSH, enroll it,
//! protect its disks with `ferry-agent@NAME` units and report each disk's
//! first recovery point. Idempotent: a second run finds everything done and
//! changes nothing.
//!
//! It drives the system `ssh` (BatchMode, host keys accepted on first
//! contact only, a connect timeout) and gives every remote command a
//! deadline, both on the remote side (`timeout`) and here (the ssh process
//! is killed). What to do is decided from one probe of the machine before
//! anything changes ([`Remote`], [`plan`]): every refusal (a missing disk,
//! no systemd, no kernel headers for `--tracker kmod`, another
//! architecture) comes before the first change. docs/operating.md,
//! "Packages and push install".

use super::Usage;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the machine's identity is kept (`ferry enroll --identity`).
const IDENTITY: &str = "/etc/ferry/identity";
/// The agents' configuration files, one per disk (`ferry-agent@NAME`).
const CONF_DIR: &str = "/etc/ferry/agent";
/// The agents' state folders.
const STATE_DIR: &str = "/var/lib/ferry/agent";
/// The connect timeout of every ssh connection, seconds.
const CONNECT_TIMEOUT: u64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PushTracker {
    /// kmod if its module is loaded, else bpf for a block device (with BTF), else scan.
    Auto,
    /// The kernel module: installs ferry-dkms (the machine needs its kernel's headers).
    Kmod,
    /// The eBPF tracker.
    Bpf,
    /// No tracker: checksum passes.
    Scan,
}

impl PushTracker {
    fn as_str(self) -> &'static str {
        match self {
            PushTracker::Auto => "auto",
            PushTracker::Kmod => "kmod",
            PushTracker::Bpf => "bpf",
            PushTracker::Scan => "scan",
        }
    }
}

/// `ferry push-install`'s flags.
#[derive(clap::Args)]
pub struct PushInstall {
    /// The machine to install on: a host name or an address, as ssh takes it.
    #[arg(long)]
    host: String,
    /// The SSH user (default root; another user needs passwordless sudo).
    #[arg(long, value_name = "USER")]
    ssh_user: Option<String>,
    /// The SSH private key (default: ssh's own choice).
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// The SSH port (default: ssh's, 22).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    ssh_port: Option<u16>,
    /// The join token for this machine (`ferry token create --role agent`); used only if it is not enrolled yet.
    #[arg(long)]
    token: String,
    /// A disk to protect, a block device or image file on the machine (repeat the option).
    #[arg(long = "disk", value_name = "PATH", required = true)]
    disks: Vec<String>,
    /// The ferry .deb to install (default: the one for this ferry's version in
    /// target/package, beside the running binary or under the current folder);
    /// ferry-dkms is taken from the same folder.
    #[arg(long, value_name = "DEB")]
    package: Option<PathBuf>,
    /// The agents' next hop(s), HOST:PORT[,HOST:PORT…] (a process server or a master target);
    /// needed for a disk not protected yet.
    #[arg(long, value_name = "ADDR[,ADDR…]")]
    target: Option<String>,
    /// The CA server (`ferry ca serve`), HOST:PORT; needed if the machine is not enrolled yet.
    #[arg(long, value_name = "ADDR")]
    ca: Option<String>,
    /// How the agents find changes (default: auto, or what a disk's configuration already says).
    #[arg(long, value_enum)]
    tracker: Option<PushTracker>,
    /// How long to wait for the first recovery point of every disk (the initial sync).
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    wait: String,
}

// ---- the pure part: names, configurations, decisions -------------------------

/// A 32-bit FNV-1a: a short, stable suffix for names that had to be cut.
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The disk's name on the master target (and the unit's instance) for a
/// disk not protected yet: the host and the disk's path without `/dev/`,
/// `/` as `-`, any other character outside `[A-Za-z0-9._-]` as `_`; longer
/// than 64, cut and given a hash of the whole so two long names stay apart.
pub fn derive_name(host: &str, disk: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
                '/' => '-',
                _ => '_',
            })
            .collect()
    };
    let path = disk.strip_prefix("/dev/").unwrap_or(disk).trim_start_matches('/');
    let mut name = format!("{}-{}", clean(host), clean(path));
    if name.starts_with('.') {
        name.replace_range(0..1, "_");
    }
    if name.len() > 64 {
        let tag = format!("-{:08x}", fnv1a(&format!("{host}|{disk}")));
        name.truncate(64 - tag.len());
        name.push_str(&tag);
    }
    name
}

/// A value that can go into a systemd environment file and a shell word
/// unharmed: no quotes, backslashes, `$`, white space or control characters.
fn plain_value(what: &str, v: &str) -> Result<(), Usage> {
    let ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+' | ':' | '@' | '=' | ',' | '~' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(Usage(format!("{what} {v:?}: only letters, digits and / . _ - + : @ = , ~ [ ] are taken")))
    }
}

/// `HOST:PORT` (an IPv6 host in brackets), checked for form only: the name
/// is resolved on the machine, not here.
fn addr_form(opt: &str, a: &str) -> Result<(), Usage> {
    let bad = || Usage(format!("--{opt} {a:?}: expected HOST:PORT, e.g. 10.0.0.2:7700"));
    let (h, p) = a.rsplit_once(':').ok_or_else(bad)?;
    if h.is_empty() || (h.contains(':') && !(h.starts_with('[') && h.ends_with(']'))) {
        return Err(bad());
    }
    match p.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad()),
    }
}

/// An agent's configuration file, as `VAR=value` lines in order (comments
/// and blank lines dropped).
pub fn parse_conf(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// What an agent's configuration should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConf {
    pub disk: String,
    pub target: String,
    pub tracker: String,
    /// Other variables of an existing file (FERRY_AGENT_ARGS…), kept.
    pub extra: BTreeMap<String, String>,
}

/// The keys push-install writes; the rest of a file is the user's.
const OWN_KEYS: [&str; 4] = ["DISK", "TARGET", "TRACKER", "IDENTITY"];

/// The file for `name`.
pub fn render_conf(name: &str, c: &AgentConf) -> String {
    let mut s = format!(
        "# ferry-agent@{name}: written by ferry push-install (systemd EnvironmentFile, see\n\
         # /usr/share/doc/ferry/examples/agent.conf). A rerun rewrites DISK, TARGET, TRACKER\n\
         # and IDENTITY and keeps other lines' values.\n\
         DISK={}\nTARGET={}\nTRACKER={}\nIDENTITY={IDENTITY}\n",
        c.disk, c.target, c.tracker
    );
    for (k, v) in &c.extra {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

/// What is on the machine, from one probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Remote {
    pub arch: String,
    pub kernel: String,
    pub root: bool,
    pub systemd: bool,
    /// Installed versions (`None`: not installed).
    pub ferry: Option<String>,
    pub ferry_dkms: Option<String>,
    pub headers: bool,
    pub kmod_loaded: bool,
    pub enrolled: bool,
    /// Per disk asked for: "block", "file" or "missing".
    pub disks: BTreeMap<String, String>,
    /// The agents' configuration files, by name.
    pub confs: BTreeMap<String, BTreeMap<String, String>>,
    /// `systemctl is-active` of each configured agent.
    pub active: BTreeMap<String, String>,
}

/// The probe: a shell script whose output [`parse_probe`] reads.
fn probe_script(disks: &[String]) -> String {
    let mut s = String::from(
        "echo \"arch=$(dpkg --print-architecture)\"\n\
         echo \"kernel=$(uname -r)\"\n\
         echo \"uid=$(id -u)\"\n\
         [ -d /run/systemd/system ] && echo systemd=yes\n\
         for p in ferry ferry-dkms; do\n\
         \x20 v=$(dpkg-query -W -f='${Status} ${Version}' \"$p\" 2>/dev/null | sed -n 's/^install ok installed //p')\n\
         \x20 [ -n \"$v\" ] && echo \"pkg.$p=$v\"\n\
         done\n\
         [ -e \"/lib/modules/$(uname -r)/build/include\" ] && echo headers=yes\n\
         [ -e /dev/ferry-cbt ] && echo kmod=yes\n\
         [ -s /etc/ferry/identity/cert.pem ] && echo enrolled=yes\n\
         for f in /etc/ferry/agent/*.conf; do\n\
         \x20 [ -f \"$f\" ] || continue\n\
         \x20 n=$(basename \"$f\" .conf)\n\
         \x20 sed -n \"s/^/conf.$n=/p\" \"$f\"\n\
         \x20 echo \"active.$n=$(systemctl is-active \"ferry-agent@$n.service\" 2>/dev/null)\"\n\
         done\n",
    );
    for d in disks {
        let q = sq(d);
        s.push_str(&format!(
            "if [ -b {q} ]; then echo disk.block={q}; elif [ -f {q} ]; then echo disk.file={q}; else echo disk.missing={q}; fi\n"
        ));
    }
    s
}

/// Read the probe's output.
pub fn parse_probe(out: &str) -> Remote {
    let mut r = Remote::default();
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "arch" => r.arch = v.into(),
            "kernel" => r.kernel = v.into(),
            "uid" => r.root = v == "0",
            "systemd" => r.systemd = true,
            "pkg.ferry" => r.ferry = Some(v.into()),
            "pkg.ferry-dkms" => r.ferry_dkms = Some(v.into()),
            "headers" => r.headers = true,
            "kmod" => r.kmod_loaded = true,
            "enrolled" => r.enrolled = true,
            _ => {
                if let Some(kind) = k.strip_prefix("disk.") {
                    r.disks.insert(v.into(), kind.into());
                } else if let Some(n) = k.strip_prefix("conf.") {
                    let c = r.confs.entry(n.into()).or_default();
                    let l = v.trim();
                    if let Some((ck, cv)) = l.split_once('=').filter(|_| !l.starts_with('#')) {
                        c.insert(ck.trim().into(), cv.trim().into());
                    }
                } else if let Some(n) = k.strip_prefix("active.") {
                    r.active.insert(n.into(), v.into());
                }
            }
        }
    }
    r
}

/// What to do with a package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PkgAction {
    /// This version is installed: nothing to do.
    Already,
    Install,
    /// Another version is installed (`from`); dpkg replaces it and keeps /var/lib/ferry.
    Upgrade {
        from: String,
    },
}

pub fn plan_package(installed: Option<&str>, version: &str) -> PkgAction {
    match installed {
        Some(v) if v == version => PkgAction::Already,
        Some(v) => PkgAction::Upgrade { from: v.into() },
        None => PkgAction::Install,
    }
}

/// What to do for one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskAction {
    /// Its configuration is as asked and its agent runs.
    Already,
    /// As asked, but its agent does not run: enable and start it.
    Start,
    /// A new configuration: write it, enable and start.
    Protect,
    /// A different configuration (`changed` names what): rewrite it, restart.
    Update { changed: Vec<&'static str> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    pub disk: String,
    pub name: String,
    pub conf: AgentConf,
    pub action: DiskAction,
}

/// The decision for one disk: its name (the existing configuration of the
/// same DISK wins over a derived one), what its file should say, and what
/// to do about it.
pub fn plan_disk(remote: &Remote, host: &str, disk: &str, target: Option<&str>, tracker: Option<PushTracker>) -> Result<DiskPlan, Usage> {
    let existing = remote.confs.iter().find(|(_, c)| c.get("DISK").map(String::as_str) == Some(disk));
    let name = match existing {
        Some((n, _)) => n.clone(),
        None => {
            let n = derive_name(host, disk);
            if let Some(c) = remote.confs.get(&n) {
                return Err(Usage(format!(
                    "{disk}: its name {n} is taken by {CONF_DIR}/{n}.conf for DISK={}",
                    c.get("DISK").map(String::as_str).unwrap_or("(none)")
                )));
            }
            n
        }
    };
    if !ferry_proto::valid_name(&name) {
        return Err(Usage(format!("{disk}: {name:?} is not a disk name (1-64 of A-Z a-z 0-9 . _ -)")));
    }
    let old = existing.map(|(_, c)| c);
    let target = match (target, old.and_then(|c| c.get("TARGET"))) {
        (Some(t), _) => t.to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => {
            return Err(Usage(format!("{disk} is not protected yet: give --target ADDR (a process server or a master target)")))
        }
    };
    let tracker = match (tracker, old.and_then(|c| c.get("TRACKER"))) {
        (Some(t), _) => t.as_str().to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => "auto".into(),
    };
    let extra: BTreeMap<String, String> = old
        .map(|c| c.iter().filter(|(k, _)| !OWN_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let conf = AgentConf { disk: disk.into(), target, tracker, extra };
    let action = match old {
        None => DiskAction::Protect,
        Some(c) => {
            let mut changed = Vec::new();
            let want = [("TARGET", conf.target.as_str()), ("TRACKER", conf.tracker.as_str()), ("IDENTITY", IDENTITY)];
            for (k, v) in want {
                if c.get(k).map(String::as_str) != Some(v) {
                    changed.push(k);
                }
            }
            if !changed.is_empty() {
                DiskAction::Update { changed }
            } else if remote.active.get(&name).map(String::as_str) == Some("active") {
                DiskAction::Already
            } else {
                DiskAction::Start
            }
        }
    };
    Ok(DiskPlan { disk: disk.into(), name, conf, action })
}

/// Single-quote a string for a POSIX shell.
pub fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---- ssh -----------------------------------------------------------------------

struct Ssh {
    host: String,
    user: Option<String>,
    key: Option<PathBuf>,
    port: Option<u16>,
    /// Prefix commands with `sudo -n` (not logged in as root).
    sudo: bool,
}

impl Ssh {
    fn command(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]);
        c.args(["-o", &format!("ConnectTimeout={CONNECT_TIMEOUT}"), "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]);
        if let Some(p) = self.port {
            c.args(["-p", &p.to_string()]);
        }
        if let Some(k) = &self.key {
            c.arg("-i").arg(k).args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(u) = &self.user {
            c.args(["-l", u]);
        }
        c.arg("--").arg(&self.host);
        c
    }

    /// Run `script` with `sh` on the machine (as root), at most `limit`;
    /// `input` is its stdin. Its stdout, or an error naming the host and
    /// the last line it wrote on stderr.
    fn run(&self, what: &str, script: &str, input: Option<&Path>, limit: Duration) -> Result<String> {
        let remote = format!("{}timeout {} sh -c {}", if self.sudo { "sudo -n " } else { "" }, limit.as_secs().max(1), sq(script));
        let mut child = self
            .command()
            .arg(remote)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run ssh (install openssh-client)")?;
        let feeder = match (input, child.stdin.take()) {
            (Some(p), Some(mut w)) => {
                let mut f = std::fs::File::open(p).with_context(|| format!("{}", p.display()))?;
                Some(std::thread::spawn(move || std::io::copy(&mut f, &mut w).map(|_| ())))
            }
            _ => None,
        };
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = out_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = err_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        // Our own deadline: the remote `timeout`, plus the connection's.
        let deadline = Instant::now() + limit + Duration::from_secs(CONNECT_TIMEOUT + 5);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        if let Some(f) = feeder {
            if let Ok(Err(e)) = f.join() {
                if status.is_some_and(|s| !s.success()) {
                    bail!("{}: {what}: sending the file: {e}", self.host);
                }
            }
        }
        let last = err.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("").to_string();
        match status {
            None => bail!("{}: {what}: no answer within {}s", self.host, limit.as_secs()),
            Some(s) if s.success() => Ok(out),
            Some(s) => match s.code() {
                Some(255) => {
                    bail!("{}: ssh: {}", self.host, if last.is_empty() { "cannot connect" } else { last.trim_start_matches("ssh: ") })
                }
                Some(124) => bail!("{}: {what}: gave up after {}s", self.host, limit.as_secs()),
                Some(1) if self.sudo && last.contains("sudo") => {
                    bail!("{}: {what}: {last} (the SSH user needs passwordless sudo, or use --ssh-user root)", self.host)
                }
                c => bail!(
                    "{}: {what} failed (status {}){}",
                    self.host,
                    c.map_or("killed".into(), |c| c.to_string()),
                    if last.is_empty() { String::new() } else { format!(": {last}") }
                ),
            },
        }
    }
}

// ---- the run -------------------------------------------------------------------

/// `dpkg-deb -f DEB FIELD…`: the package's name, version and architecture.
fn deb_fields(deb: &Path) -> Result<(String, String, String)> {
    let o = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(["Package", "Version", "Architecture"])
        .output()
        .context("cannot run dpkg-deb (to read the package's version)")?;
    if !o.status.success() {
        bail!("{}: not a Debian package: {}", deb.display(), String::from_utf8_lossy(&o.stderr).trim());
    }
    let f = parse_conf(&String::from_utf8_lossy(&o.stdout).replace(": ", "="));
    let get = |k: &str| f.get(k).cloned().ok_or_else(|| anyhow!("{}: no {k} field", deb.display()));
    Ok((get("Package")?, get("Version")?, get("Architecture")?))
}

/// The ferry .deb of this version: beside the running binary
/// (target/release/ferry → target/package) or under ./target/package.
fn default_package() -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent().and_then(Path::parent) {
            dirs.push(d.join("package"));
        }
    }
    dirs.push(PathBuf::from("target/package"));
    let prefix = format!("ferry_{}-", env!("CARGO_PKG_VERSION"));
    for d in &dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        let mut found: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    Err(Usage(format!(
        "no ferry_{}-*.deb in target/package: build it with scripts/package, or give --package DEB",
        env!("CARGO_PKG_VERSION")
    ))
    .into())
}

/// The ferry-dkms package beside `deb`, of the same version.
fn dkms_package(deb: &Path, version: &str) -> PathBuf {
    deb.with_file_name(format!("ferry-dkms_{version}_all.deb"))
}

fn say(host: &str, line: &str) {
    super::out_line(format_args!("{host}: {line}"));
}

pub fn run(a: PushInstall) -> Result<()> {
    // ---- checks on this side: bad usage before any connection.
    if a.host.is_empty() || a.host.starts_with('-') || a.host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Usage(format!("--host {:?}: expected a host name or address", a.host)).into());
    }
    if let Some(u) = &a.ssh_user {
        if u.is_empty() || u.starts_with('-') || !u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(Usage(format!("--ssh-user {u:?}: expected a user name")).into());
        }
    }
    if let Some(k) = &a.ssh_key {
        if !k.is_file() {
            return Err(Usage(format!("--ssh-key {}: no such file", k.display())).into());
        }
    }
    ferry_identity::ca::Token::parse(&a.token).map_err(|e| Usage(format!("--token: {e}")))?;
    for d in &a.disks {
        plain_value("--disk", d)?;
        if !d.starts_with('/') {
            return Err(Usage(format!("--disk {d:?}: expected an absolute path on the machine")).into());
        }
    }
    if let Some(t) = &a.target {
        plain_value("--target", t)?;
        for x in t.split(',') {
            addr_form("target", x)?;
        }
    }
    if let Some(c) = &a.ca {
        plain_value("--ca", c)?;
        addr_form("ca", c)?;
    }
    let wait = humantime::parse_duration(&a.wait)
        .ok()
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| Usage(format!("--wait {:?}: expected a duration like 30m", a.wait)))?;
    let deb = match &a.package {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => return Err(Usage(format!("--package {}: no such file", p.display())).into()),
        None => default_package()?,
    };
    let (pkg, version, arch) = deb_fields(&deb)?;
    if pkg != "ferry" {
        return Err(Usage(format!("--package {}: this is {pkg}, not ferry", deb.display())).into());
    }
    let ssh = Ssh {
        host: a.host.clone(),
        user: a.ssh_user.clone(),
        key: a.ssh_key.clone(),
        port: a.ssh_port,
        sudo: a.ssh_user.as_deref().is_some_and(|u| u != "root"),
    };
    let h = a.host.as_str();

    // ---- the probe, and every refusal before the first change.
    let remote = parse_probe(&ssh.run("probing", &probe_script(&a.disks), None, Duration::from_secs(60))?);
    if !remote.root {
        bail!("{h}: commands do not run as root there (log in as root, or give a --ssh-user with passwordless sudo)");
    }
    if !remote.systemd {
        bail!("{h}: systemd is not running there: ferry's agents run as systemd units");
    }
    if remote.arch != arch {
        bail!("{h}: the machine is {} but {} is for {arch}", remote.arch, deb.display());
    }
    for d in &a.disks {
        if remote.disks.get(d).map(String::as_str) != Some("block") && remote.disks.get(d).map(String::as_str) != Some("file") {
            bail!("{h}: {d}: no such block device or file");
        }
    }
    let mut plans = Vec::new();
    for d in &a.disks {
        plans.push(plan_disk(&remote, h, d, a.target.as_deref(), a.tracker)?);
    }
    let kmod = plans.iter().any(|p| p.conf.tracker == "kmod");
    let dkms_deb = dkms_package(&deb, &version);
    let dkms_action = if kmod {
        let act = plan_package(remote.ferry_dkms.as_deref(), &version);
        if act != PkgAction::Already {
            if !remote.headers && !remote.kmod_loaded {
                bail!(
                    "{h}: --tracker kmod: no kernel headers for {} there: install linux-headers-{} on it, or use --tracker auto",
                    remote.kernel,
                    remote.kernel
                );
            }
            if !dkms_deb.is_file() {
                return Err(Usage(format!(
                    "--tracker kmod needs {} (scripts/package makes it beside the ferry package)",
                    dkms_deb.display()
                ))
                .into());
            }
        }
        Some(act)
    } else {
        None
    };
    if !remote.enrolled && a.ca.is_none() {
        return Err(Usage(format!("{h} is not enrolled yet: give --ca ADDR (the `ferry ca serve` address) with the token")).into());
    }

    // ---- the packages.
    let install = |deb: &Path, pkg: &str, act: &PkgAction| -> Result<()> {
        match act {
            PkgAction::Already => {
                say(h, &format!("{pkg} {version} already installed"));
                return Ok(());
            }
            PkgAction::Install => {}
            PkgAction::Upgrade { .. } => {}
        }
        let dir = ssh.run("making a scratch folder", "mktemp -d /tmp/ferry-push.XXXXXX", None, Duration::from_secs(30))?;
        let dir = dir.trim();
        if !dir.starts_with("/tmp/ferry-push.") {
            bail!("{h}: mktemp answered {dir:?}");
        }
        let file = format!("{dir}/{pkg}.deb");
        let r = (|| {
            ssh.run(&format!("copying {}", deb.display()), &format!("cat > {}", sq(&file)), Some(deb), Duration::from_secs(600))?;
            // dpkg first; dependencies it lacks come from apt.
            let script = format!(
                "export DEBIAN_FRONTEND=noninteractive; dpkg -i {f} >/dev/null 2>&1 || apt-get install -y -q -f >/dev/null || exit 1; \
                 v=$(dpkg-query -W -f='${{Status}} ${{Version}}' {pkg} | sed -n 's/^install ok installed //p'); \
                 [ \"$v\" = {v} ] || {{ echo \"{pkg} is at '$v' after dpkg -i\" >&2; exit 1; }}",
                f = sq(&file),
                v = sq(&version)
            );
            ssh.run(&format!("installing {pkg}"), &script, None, Duration::from_secs(900))
        })();
        let _ = ssh.run("cleaning up", &format!("rm -rf {}", sq(dir)), None, Duration::from_secs(30));
        r?;
        match act {
            PkgAction::Upgrade { from } => {
                say(h, &format!("{pkg} upgraded from {from} to {version} (agents restarted, /var/lib/ferry kept)"))
            }
            _ => say(h, &format!("{pkg} {version} installed")),
        }
        Ok(())
    };
    install(&deb, "ferry", &plan_package(remote.ferry.as_deref(), &version))?;
    if let Some(act) = &dkms_action {
        install(&dkms_deb, "ferry-dkms", act)?;
        // The postinst builds without failing the install, and a reboot
        // may have left it unloaded: check the module (no change if loaded).
        ssh.run("loading ferry_cbt", "[ -e /dev/ferry-cbt ] || modprobe ferry_cbt", None, Duration::from_secs(60)).map_err(|e| {
            anyhow!("{e} (the kernel module tracker is not available: see `dkms status` and /var/lib/dkms/ferry-cbt on {h})")
        })?;
    }

    // ---- enrollment.
    if remote.enrolled {
        say(h, &format!("already enrolled ({IDENTITY})"));
    } else {
        let ca = a.ca.as_deref().unwrap_or_default();
        ssh.run(
            "ferry enroll",
            &format!("ferry enroll --server {} --token {} --identity {IDENTITY}", sq(ca), sq(&a.token)),
            None,
            Duration::from_secs(120),
        )?;
        say(h, &format!("enrolled with the CA at {ca} ({IDENTITY})"));
    }

    // ---- the disks. Those whose agent (re)starts wait below for a point
    // newer than the one they have now.
    let moving: Vec<&str> = plans.iter().filter(|p| p.action != DiskAction::Already).map(|p| p.name.as_str()).collect();
    let before: BTreeMap<String, Option<u64>> = if moving.is_empty() {
        BTreeMap::new()
    } else {
        parse_status_round(&ssh.run("ferry status", &status_script(&moving), None, Duration::from_secs(60))?)
            .into_iter()
            .map(|(n, s)| (n, s.point.map(|p| p.id)))
            .collect()
    };
    for p in &plans {
        let unit = format!("ferry-agent@{}.service", p.name);
        let conf = format!("{CONF_DIR}/{}.conf", p.name);
        let write = format!(
            "mkdir -p {CONF_DIR} && cat > {t} <<'FERRY_CONF_END'\n{}FERRY_CONF_END\nmv -f {t} {c}",
            render_conf(&p.name, &p.conf),
            t = sq(&format!("{conf}.tmp")),
            c = sq(&conf)
        );
        match &p.action {
            DiskAction::Already => say(h, &format!("{} already protected as {} ({unit})", p.disk, p.name)),
            DiskAction::Start => {
                ssh.run("starting the agent", &format!("systemctl enable --now {}", sq(&unit)), None, Duration::from_secs(120))?;
                say(h, &format!("{} protected as {}: {unit} started again", p.disk, p.name));
            }
            DiskAction::Protect => {
                ssh.run("starting the agent", &format!("{write} && systemctl enable --now {}", sq(&unit)), None, Duration::from_secs(120))?;
                say(h, &format!("protecting {} as {} ({unit}, {conf})", p.disk, p.name));
            }
            DiskAction::Update { changed } => {
                ssh.run(
                    "restarting the agent",
                    &format!("{write} && systemctl enable {u} && systemctl restart {u}", u = sq(&unit)),
                    None,
                    Duration::from_secs(120),
                )?;
                say(h, &format!("{} protected as {}: {} changed, {unit} restarted", p.disk, p.name, changed.join(", ")));
            }
        }
    }

    // ---- the first recovery points.
    let start = Instant::now();
    let mut left: Vec<&DiskPlan> = plans.iter().collect();
    let mut last_state = BTreeMap::new();
    while !left.is_empty() {
        let names: Vec<&str> = left.iter().map(|p| p.name.as_str()).collect();
        let seen = parse_status_round(&ssh.run("ferry status", &status_script(&names), None, Duration::from_secs(60))?);
        let mut done = Vec::new();
        for p in &left {
            let name = p.name.as_str();
            let Some(s) = seen.get(name) else { continue };
            // A disk whose agent was just (re)started waits for a point newer than the one before.
            let newer = |id: u64| before.get(name).copied().flatten().is_none_or(|b| id > b);
            if let Some(pt) = s.point.as_ref().filter(|pt| newer(pt.id)) {
                say(h, &format!("{name}: recovery point {} at {} ({})", pt.id, pt.time, pt.kind));
                done.push(name.to_string());
            } else if s.active == "failed" || s.restarts >= 3 {
                // Why: the agent's last `ferry:` line in the journal, else what its status says.
                let logged = ssh
                    .run(
                        "reading the agent's log",
                        &format!("journalctl -q -u {} -n 50 -o cat | grep '^ferry:' | tail -1", sq(&format!("ferry-agent@{name}.service"))),
                        None,
                        Duration::from_secs(30),
                    )
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                let why = if logged.is_empty() { s.error.clone().unwrap_or_else(|| "see its log".into()) } else { logged };
                bail!("{h}: {name}: the agent failed: {why} (systemctl status ferry-agent@{name} there)");
            } else {
                last_state.insert(name.to_string(), s.health.clone());
            }
        }
        left.retain(|p| !done.contains(&p.name));
        if left.is_empty() {
            break;
        }
        if start.elapsed() >= wait {
            let p = left[0];
            let state = last_state.get(&p.name).cloned().flatten().unwrap_or_else(|| "no status yet".into());
            bail!(
                "{h}: {}: no recovery point within {} ({state}); it goes on: `ferry status --state {STATE_DIR}/{}` there",
                p.name,
                humantime::format_duration(wait),
                p.name
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// A shell script printing, per agent, `== NAME ACTIVE RESTARTS` and its
/// `ferry status --json` line.
fn status_script(names: &[&str]) -> String {
    let mut script = String::new();
    for n in names {
        script.push_str(&format!(
            "echo \"== {n} $(systemctl is-active {u} 2>/dev/null) $(systemctl show -p NRestarts --value {u} 2>/dev/null)\"; \
             ferry status --state {s} --json 2>&1 || true; echo\n",
            u = sq(&format!("ferry-agent@{n}.service")),
            s = sq(&format!("{STATE_DIR}/{n}")),
        ));
    }
    script
}

/// A recovery point as `ferry status --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointSeen {
    pub id: u64,
    pub time: String,
    pub kind: String,
}

/// One agent in a status round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// `systemctl is-active`: active, activating, failed, inactive…
    pub active: String,
    /// systemd's NRestarts (Restart=on-failure hides a failing agent as
    /// "activating": a few restarts without a point are a failure too).
    pub restarts: u32,
    pub point: Option<PointSeen>,
    pub health: Option<String>,
    /// Why it stopped, or its last error.
    pub error: Option<String>,
}

/// Read a status round ([`status_script`]'s output).
pub fn parse_status_round(out: &str) -> BTreeMap<String, Seen> {
    let mut m = BTreeMap::new();
    for block in out.split("== ").skip(1) {
        let (head, body) = block.split_once('\n').unwrap_or((block, ""));
        let mut words = head.split_whitespace();
        let Some(name) = words.next() else { continue };
        let active = words.next().unwrap_or_default().to_string();
        let restarts = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let v: Option<serde_json::Value> =
            body.lines().find_map(|l| serde_json::from_str(l).ok()).filter(|v: &serde_json::Value| v.is_object());
        let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let point = v.as_ref().and_then(|v| v.get("last_point")).and_then(|p| {
            Some(PointSeen {
                id: p.get("id")?.as_u64()?,
                time: text(p, "time").unwrap_or_default(),
                kind: text(p, "kind").unwrap_or_default(),
            })
        });
        let health = v.as_ref().and_then(|v| text(v, "health_reason"));
        let error = v.as_ref().and_then(|v| text(v, "last_error").or_else(|| text(v, "stopped_reason")));
        m.insert(name.to_string(), Seen { active, restarts, point, health, error });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_host_and_disk() {
        assert_eq!(derive_name("web1", "/dev/vdb"), "web1-vdb");
        assert_eq!(derive_name("web1.example.com", "/dev/disk/by-id/virtio-abc"), "web1.example.com-disk-by-id-virtio-abc");
        assert_eq!(derive_name("fe80::1", "/srv/img 1.raw"), "fe80__1-srv-img_1.raw");
        assert_eq!(derive_name(".hidden", "/dev/sda"), "_hidden-sda");
        let long = derive_name("a-very-long-host-name.in.a.deep.domain.example.com", "/dev/disk/by-path/pci-0000:00:04.0-scsi-0:0:0:1");
        assert_eq!(long.len(), 64);
        assert!(ferry_proto::valid_name(&long), "{long}");
        let other = derive_name("a-very-long-host-name.in.a.deep.domain.example.com", "/dev/disk/by-path/pci-0000:00:04.0-scsi-0:0:0:2");
        assert_ne!(long, other, "cut names stay apart");
        for (h, d) in [("h", "/dev/vda"), ("x:y", "/a/b/c"), ("ünï", "/dev/ü")] {
            assert!(ferry_proto::valid_name(&derive_name(h, d)), "{h} {d}");
        }
        // Stable: the same machine and disk give the same name on every run.
        assert_eq!(derive_name("web1", "/dev/vdb"), derive_name("web1", "/dev/vdb"));
    }

    #[test]
    fn conf_renders_and_reads_back() {
        let mut extra = BTreeMap::new();
        extra.insert("FERRY_AGENT_ARGS".to_string(), "--point-every 300".to_string());
        let c = AgentConf { disk: "/dev/vdb".into(), target: "10.0.0.2:7710,10.0.0.3:7700".into(), tracker: "kmod".into(), extra };
        let text = render_conf("web1-vdb", &c);
        let back = parse_conf(&text);
        assert_eq!(back.get("DISK").unwrap(), "/dev/vdb");
        assert_eq!(back.get("TARGET").unwrap(), "10.0.0.2:7710,10.0.0.3:7700");
        assert_eq!(back.get("TRACKER").unwrap(), "kmod");
        assert_eq!(back.get("IDENTITY").unwrap(), IDENTITY);
        assert_eq!(back.get("FERRY_AGENT_ARGS").unwrap(), "--point-every 300");
        assert!(text.lines().all(|l| l.starts_with('#') || l.contains('=')), "{text}");
    }

    fn probe_out() -> String {
        "arch=amd64\nkernel=6.1.0-28-amd64\nuid=0\nsystemd=yes\npkg.ferry=0.1.0-1\nheaders=yes\nenrolled=yes\n\
         conf.web1-vdb=# written by ferry push-install\nconf.web1-vdb=DISK=/dev/vdb\nconf.web1-vdb=TARGET=10.0.0.2:7700\n\
         conf.web1-vdb=TRACKER=auto\nconf.web1-vdb=IDENTITY=/etc/ferry/identity\nconf.web1-vdb=FERRY_AGENT_ARGS=--point-every 60\n\
         active.web1-vdb=active\ndisk.block=/dev/vdb\ndisk.missing=/dev/vdz\ndisk.file=/srv/a=b.img\n"
            .into()
    }

    #[test]
    fn probe_output_is_read() {
        let r = parse_probe(&probe_out());
        assert_eq!(r.arch, "amd64");
        assert!(r.root && r.systemd && r.headers && r.enrolled && !r.kmod_loaded);
        assert_eq!(r.ferry.as_deref(), Some("0.1.0-1"));
        assert_eq!(r.ferry_dkms, None);
        assert_eq!(r.disks.get("/dev/vdb").unwrap(), "block");
        assert_eq!(r.disks.get("/dev/vdz").unwrap(), "missing");
        assert_eq!(r.disks.get("/srv/a=b.img").unwrap(), "file");
        let c = r.confs.get("web1-vdb").unwrap();
        assert_eq!(c.get("DISK").unwrap(), "/dev/vdb");
        assert_eq!(c.get("FERRY_AGENT_ARGS").unwrap(), "--point-every 60");
        assert_eq!(c.len(), 5, "the comment is not a variable");
        assert_eq!(r.active.get("web1-vdb").unwrap(), "active");
        assert!(!parse_probe("uid=1000\ngarbage\n=x\n").root);
    }

    #[test]
    fn packages_install_once() {
        assert_eq!(plan_package(None, "0.1.0-1"), PkgAction::Install);
        assert_eq!(plan_package(Some("0.1.0-1"), "0.1.0-1"), PkgAction::Already);
        assert_eq!(plan_package(Some("0.0.9-1"), "0.1.0-1"), PkgAction::Upgrade { from: "0.0.9-1".into() });
    }

    #[test]
    fn a_second_run_changes_nothing() {
        let mut r = parse_probe(&probe_out());
        // The same flags as the first run: already protected.
        let p = plan_disk(&r, "web1", "/dev/vdb", Some("10.0.0.2:7700"), Some(PushTracker::Auto)).unwrap();
        assert_eq!(p.name, "web1-vdb");
        assert_eq!(p.action, DiskAction::Already);
        // Without --target and --tracker: the file's values are kept.
        let p = plan_disk(&r, "web1", "/dev/vdb", None, None).unwrap();
        assert_eq!(p.action, DiskAction::Already);
        assert_eq!(p.conf.target, "10.0.0.2:7700");
        assert_eq!(p.conf.extra.get("FERRY_AGENT_ARGS").unwrap(), "--point-every 60", "the user's flags are kept");
        // Reached by another address: the existing file of the same disk wins.
        let p = plan_disk(&r, "10.1.1.5", "/dev/vdb", None, None).unwrap();
        assert_eq!((p.name.as_str(), &p.action), ("web1-vdb", &DiskAction::Already));
        // The agent stopped: start it, write nothing.
        r.active.insert("web1-vdb".into(), "inactive".into());
        assert_eq!(plan_disk(&r, "web1", "/dev/vdb", None, None).unwrap().action, DiskAction::Start);
        // Another target or tracker: rewrite and restart.
        let p = plan_disk(&r, "web1", "/dev/vdb", Some("10.0.0.9:7710"), Some(PushTracker::Kmod)).unwrap();
        assert_eq!(p.action, DiskAction::Update { changed: vec!["TARGET", "TRACKER"] });
        assert_eq!(p.conf.extra.len(), 1);
    }

    #[test]
    fn a_new_disk() {
        let r = parse_probe(&probe_out());
        let p = plan_disk(&r, "web1", "/dev/vdc", Some("10.0.0.2:7700"), None).unwrap();
        assert_eq!((p.name.as_str(), &p.action, p.conf.tracker.as_str()), ("web1-vdc", &DiskAction::Protect, "auto"));
        assert!(p.conf.extra.is_empty());
        // No --target for a disk never protected: bad usage.
        let e = plan_disk(&r, "web1", "/dev/vdc", None, None).unwrap_err();
        assert!(e.0.contains("--target"), "{}", e.0);
        // A derived name that another disk's file holds is refused.
        let mut r2 = r.clone();
        r2.confs.get_mut("web1-vdb").unwrap().insert("DISK".into(), "/dev/other".into());
        let e = plan_disk(&r2, "web1", "/dev/vdb", Some("10.0.0.2:7700"), None).unwrap_err();
        assert!(e.0.contains("taken"), "{}", e.0);
    }

    #[test]
    fn status_rounds_are_read() {
        let out = "== web1-vdb active 0\n{\"health_reason\":\"ok\",\"last_point\":{\"id\":7,\"kind\":\"crash\",\"seq\":9,\"time\":\"2026-12-01T04:00:00Z\"},\"last_error\":null}\n\n\
                   == web1-vdc activating 4\nferry: no agent state in /var/lib/ferry/agent/web1-vdc\n\n\
                   == web1-vdd failed 0\n{\"last_point\":null,\"last_error\":null,\"stopped_reason\":\"bad disk\"}\n";
        let m = parse_status_round(out);
        let b = &m["web1-vdb"];
        assert_eq!((b.active.as_str(), b.restarts), ("active", 0));
        assert_eq!(b.point, Some(PointSeen { id: 7, time: "2026-12-01T04:00:00Z".into(), kind: "crash".into() }));
        assert_eq!(b.health.as_deref(), Some("ok"));
        let c = &m["web1-vdc"];
        assert_eq!((c.active.as_str(), c.restarts, &c.point), ("activating", 4, &None));
        let d = &m["web1-vdd"];
        assert_eq!((d.active.as_str(), d.point.is_none(), d.error.as_deref()), ("failed", true, Some("bad disk")));
        assert!(parse_status_round("").is_empty());
        // The names the script asks about are the names read back.
        let s = status_script(&["a-b", "c"]);
        assert!(s.contains("ferry-agent@a-b.service") && s.contains("/var/lib/ferry/agent/c"), "{s}");
    }

    #[test]
    fn flags_are_checked_for_form() {
        assert!(addr_form("target", "10.0.0.2:7700").is_ok());
        assert!(addr_form("target", "[fd00::2]:7700").is_ok());
        assert!(addr_form("target", "mt.example.com:7700").is_ok());
        for bad in ["10.0.0.2", "10.0.0.2:0", ":7700", "fd00::2:7700", "h:99999"] {
            assert!(addr_form("target", bad).is_err(), "{bad}");
        }
        assert!(plain_value("--disk", "/dev/disk/by-path/pci-0000:00:04.0").is_ok());
        for bad in ["/dev/a b", "/dev/$x", "/dev/a\"", "/dev/a\nb", "/dev/a'b", ""] {
            assert!(plain_value("--disk", bad).is_err(), "{bad:?}");
        }
        assert_eq!(sq("a'b"), r"'a'\''b'");
    }
}
