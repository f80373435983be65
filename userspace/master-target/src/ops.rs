//! The operations behind the CLI on a master target's data folder: each
//! takes the operator's choices and returns a view, a plain serializable
//! value (what `--json` prints, and what a configuration server's API
//! would return). [`render`] turns the views into the CLI's text; the
//! `ferry` binary only parses flags, calls these, and prints.
//!
//! | command | operation | view |
//! |---------|-----------|------|
//! | `ferry points` | [`points`] | [`PointsView`] |
//! | `ferry group-points` | [`group_points`] | [`GroupPointsView`] |
//! | `ferry recover` | [`recover`] | [`RecoverView`] |
//! | `ferry export` | [`export`] then [`Export::serve`] | [`ExportView`] |
//! | `ferry retention` | [`retention_set`] then [`retention_apply`] | [`RetentionView`], [`Pass`] |
//! | `ferry failover` | [`failover`], [`failover_finish`], [`start_qemu`] | [`FailoverView`], [`FinishView`] |
//! | `ferry status --data` | [`disk_status`] | [`DiskStatus`] |
//! | `ferry verify` | [`verify`] | [`Outcome`] |
//! | `ferry repair` | [`repair`] | [`Report`] |
//! | `ferry master-target --scrub-every` | [`start_scrub`] | — |

pub mod render;

use crate::store::catalog::{self, Point};
use crate::store::failover::{self as failover_state, Phase};
use crate::store::folder::{read_meta, DiskError, Paths};
use crate::store::lock::{RecoveryLock, WriterLock};
use crate::store::recover::{self as rec, Format, RecoverError, Selector};
use crate::store::retention::{self, Pass, Policy, Reason};
use crate::store::sums::Sums;
use crate::store::view::{PointView, ViewError};
use crate::store::{disk, reserve, verify as scrub};
use ferry_common::durable::StateError;
use ferry_common::health::Health;
use ferry_common::units::{parse_size, rfc3339};
use ferry_proto::PointKind;
use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::store::repair::Report;
pub use crate::store::verify::Outcome;

/// Why an operation failed. Each variant says it in one line; a wrapped
/// library error is shown (and chained) as it is.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error(transparent)]
    View(#[from] ViewError),
    #[error(transparent)]
    Failover(#[from] crate::failover::FailoverError),
    #[error(transparent)]
    FailoverState(#[from] failover_state::FailoverError),
    #[error(transparent)]
    State(#[from] StateError),
    /// A flag's value that does not parse (the message names the flag).
    #[error("{0}")]
    Value(String),
    #[error("point {id} of {name} was dropped by retention just now; choose another")]
    Dropped { id: u64, name: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("qemu-system-x86_64 exited with {0}")]
    Qemu(std::process::ExitStatus),
    /// Serving an export failed.
    #[error(transparent)]
    Serve(io::Error),
}

fn kind_str<S: serde::Serializer>(k: &PointKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

/// A point as the views name it.
#[derive(serde::Serialize, Clone, Debug)]
pub struct PointRef {
    pub id: u64,
    #[serde(serialize_with = "kind_str")]
    pub kind: PointKind,
    /// RFC 3339.
    pub time: String,
}

impl From<&Point> for PointRef {
    fn from(p: &Point) -> PointRef {
        PointRef { id: p.id, kind: p.kind, time: rfc3339(p.time_ns) }
    }
}

/// The point `text` names (`ID`, `latest`, or an RFC 3339 time) among
/// `name`'s points.
pub fn select_point(data: &Path, name: &str, text: &str) -> Result<Point, RecoverError> {
    let sel: Selector = text.parse()?;
    let pts = rec::points(data, name)?;
    rec::select(name, &pts, &sel, text)
}

// ---------------------------------------------------------------- points

/// One row of `ferry points`. Fields in the JSON's key order (sorted, as
/// the CLI has always printed them).
#[derive(serde::Serialize, Clone, Debug)]
pub struct PointRow {
    pub id: u64,
    /// Why retention keeps it now; `None`: the next pass drops it.
    pub kept: Option<Reason>,
    #[serde(serialize_with = "kind_str")]
    pub kind: PointKind,
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
}

/// A disk's failover, as `ferry points` notes it.
#[derive(serde::Serialize, Clone, Debug)]
pub struct FailoverNote {
    pub point: u64,
    pub state: Phase,
    pub since: String,
}

/// `ferry points`: the points oldest first, why each is kept, and the
/// failover state. `--json` prints `points`.
#[derive(serde::Serialize, Clone, Debug)]
pub struct PointsView {
    pub name: String,
    pub failover: Option<FailoverNote>,
    pub points: Vec<PointRow>,
}

/// The points of disk `name` and why retention keeps each.
pub fn points(data: &Path, name: &str) -> Result<PointsView, OpsError> {
    let pts = rec::points(data, name)?;
    let failover = failover_state::state(data, name)?.map(|f| FailoverNote { point: f.point, state: f.state, since: rfc3339(f.since_ns) });
    let meta = read_meta(data, name)?;
    // Why each point is kept: the decision a retention pass makes now.
    let why = retention::reasons(&Paths::new(data, name), meta.size, &pts)?;
    let points =
        pts.iter().zip(&why).map(|(p, w)| PointRow { id: p.id, kept: *w, kind: p.kind, seq: p.seq, time: rfc3339(p.time_ns) }).collect();
    Ok(PointsView { name: name.into(), failover, points })
}

// ---------------------------------------------------------- group points

/// One cut every named disk has a point for. Fields in the JSON's key order.
#[derive(serde::Serialize, Clone, Debug)]
pub struct GroupRow {
    /// Each disk's point id at this cut.
    pub points: BTreeMap<String, u64>,
    /// RFC 3339.
    pub time: String,
    pub time_ns: u64,
    /// The ids in the order the disks were named.
    #[serde(skip)]
    pub ids: Vec<u64>,
}

/// `ferry group-points`. `--json` prints `rows`.
#[derive(serde::Serialize, Clone, Debug)]
pub struct GroupPointsView {
    pub names: Vec<String>,
    pub rows: Vec<GroupRow>,
}

/// The consistency group's cuts: the group points of the first disk that
/// every other named disk has a group point of the same time for.
pub fn group_points(data: &Path, names: &[String]) -> Result<GroupPointsView, OpsError> {
    let mut per: Vec<Vec<Point>> = Vec::new();
    for n in names {
        per.push(rec::points(data, n)?);
    }
    let mut rows = Vec::new();
    for p in per.first().into_iter().flatten() {
        if p.kind != PointKind::Group {
            continue;
        }
        let ids: Option<Vec<u64>> =
            per.iter().map(|v| v.iter().find(|q| q.kind == PointKind::Group && q.time_ns == p.time_ns).map(|q| q.id)).collect();
        if let Some(ids) = ids {
            let points = names.iter().cloned().zip(ids.iter().copied()).collect();
            rows.push(GroupRow { points, time: rfc3339(p.time_ns), time_ns: p.time_ns, ids });
        }
    }
    Ok(GroupPointsView { names: names.to_vec(), rows })
}

// --------------------------------------------------------------- recover

/// What `ferry recover` wrote.
#[derive(serde::Serialize, Clone, Debug)]
pub struct RecoverView {
    pub name: String,
    pub point: PointRef,
    pub out: PathBuf,
    pub format: Format,
}

/// Materialize the point `point` names into `out` (see [`rec::prepare`]
/// for the rules on `out`).
pub fn recover(data: &Path, name: &str, point: &str, out: &Path, format: Option<Format>, force: bool) -> Result<RecoverView, OpsError> {
    let p = select_point(data, name, point)?;
    let output = rec::prepare(data, name, out, format, force)?;
    let fmt = output.format();
    rec::write(data, name, &p, output)?;
    Ok(RecoverView { name: name.into(), point: (&p).into(), out: out.to_path_buf(), format: fmt })
}

// ---------------------------------------------------------------- export

/// What `ferry export` serves.
#[derive(serde::Serialize, Clone, Debug)]
pub struct ExportView {
    pub name: String,
    pub point: PointRef,
    /// The address it listens on.
    pub listen: SocketAddr,
    pub writable: bool,
}

/// A point pinned, opened and listened for: [`Export::serve`] serves it.
pub struct Export {
    pub view: ExportView,
    point: PointView,
    listener: TcpListener,
    _pin: retention::Pin,
}

/// Prepare `ferry export`: pick the point, pin it against retention, check
/// it is still there, open its view (scratch files in `scratch`, default
/// the temporary folder) and listen on `addr`.
pub fn export(data: &Path, name: &str, point: &str, addr: SocketAddr, writable: bool, scratch: Option<&Path>) -> Result<Export, OpsError> {
    let p = select_point(data, name, point)?;
    let scratch = scratch.map_or_else(std::env::temp_dir, Path::to_path_buf);
    // Pinned before it is opened: retention keeps a pinned point; it
    // must still be listed once the pin is there.
    let paths = Paths::new(data, name);
    let pin = retention::Pin::new(&paths, p.id).map_err(|source| OpsError::Io { what: paths.dir.display().to_string(), source })?;
    {
        // Under the shared recovery lock: a retention pass either saw the
        // pin or finished before this look.
        let _g = RecoveryLock::shared(&paths).ok();
        if !rec::points(data, name)?.iter().any(|q| q.id == p.id) {
            return Err(OpsError::Dropped { id: p.id, name: name.into() });
        }
    }
    let view = PointView::open(data, name, p, writable, &scratch)?;
    let listener = TcpListener::bind(addr).map_err(|source| OpsError::Listen { addr, source })?;
    let listen = listener.local_addr().map_err(|source| OpsError::Io { what: format!("{addr}"), source })?;
    Ok(Export { view: ExportView { name: name.into(), point: (&p).into(), listen, writable }, point: view, listener, _pin: pin })
}

impl Export {
    /// Serve the point over NBD until the process ends (the pin goes with it).
    /// With `tls`, clients must use TLS (STARTTLS) with a certificate of
    /// the site's CA.
    pub fn serve(self, tls: Option<crate::nbd::Tls>) -> Result<(), OpsError> {
        let Export { view, point, listener, _pin } = self;
        crate::nbd::serve(listener, view.name, point, tls).map_err(OpsError::Serve)
    }
}

// ------------------------------------------------------------- retention

/// The changes `ferry retention` asks for, parsed from its flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionEdit {
    pub keep_ns: Option<u64>,
    pub all_ns: Option<u64>,
    pub hourly_ns: Option<u64>,
    pub journal_cap: Option<u64>,
}

impl RetentionEdit {
    /// From the flags' text: durations like `7d`, sizes like `50G`, and
    /// `none`, which lifts the limit (no age limit for `--keep`, every
    /// point or one an hour forever for the others, no journal cap).
    pub fn from_flags(
        keep: Option<&str>,
        keep_all: Option<&str>,
        keep_hourly: Option<&str>,
        journal_cap: Option<&str>,
    ) -> Result<RetentionEdit, OpsError> {
        let dur = |what: &str, v: &str| -> Result<u64, OpsError> {
            if v == "none" {
                return Ok(if what == "keep" { 0 } else { u64::MAX });
            }
            let d = humantime::parse_duration(v).map_err(|e| OpsError::Value(format!("--{what} {v:?}: {e} (e.g. 90s, 2h, 7days)")))?;
            Ok(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        Ok(RetentionEdit {
            keep_ns: keep.map(|v| dur("keep", v)).transpose()?,
            all_ns: keep_all.map(|v| dur("keep-all", v)).transpose()?,
            hourly_ns: keep_hourly.map(|v| dur("keep-hourly", v)).transpose()?,
            journal_cap: journal_cap
                .map(|v| {
                    parse_size(v).ok_or_else(|| OpsError::Value(format!("--journal-cap {v:?}: expected a size like 512M, 50G, or none")))
                })
                .transpose()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == RetentionEdit::default()
    }
}

/// A disk's retention policy after `ferry retention`.
#[derive(serde::Serialize, Clone, Debug)]
pub struct RetentionView {
    pub name: String,
    pub policy: Policy,
    /// A policy is set for the disk (else it has the default).
    pub set: bool,
    /// This call changed it.
    pub changed: bool,
}

/// Show disk `name`'s retention policy, changed by `edit` (stored) first.
pub fn retention_set(data: &Path, name: &str, edit: &RetentionEdit) -> Result<RetentionView, OpsError> {
    let paths = Paths::new(data, name);
    let meta = read_meta(data, name)?;
    let (mut policy, set) = retention::effective(&paths, meta.size)?;
    let changed = !edit.is_empty();
    policy.keep_ns = edit.keep_ns.unwrap_or(policy.keep_ns);
    policy.all_ns = edit.all_ns.unwrap_or(policy.all_ns);
    policy.hourly_ns = edit.hourly_ns.unwrap_or(policy.hourly_ns);
    policy.journal_cap = edit.journal_cap.unwrap_or(policy.journal_cap);
    if changed {
        retention::store(&paths, &policy)?;
    }
    Ok(RetentionView { name: name.into(), policy, set: set || changed, changed })
}

/// Apply disk `name`'s policy now, if no master target is writing the disk
/// (`None`: one is; it applies the policy at its next point).
pub fn retention_apply(data: &Path, name: &str) -> Result<Option<Pass>, OpsError> {
    Ok(disk::retain_offline(data, name)?)
}

// -------------------------------------------------------------- failover

/// What `ferry failover` handed over.
#[derive(serde::Serialize, Clone, Debug)]
pub struct FailoverView {
    pub name: String,
    pub point: PointRef,
    pub out: PathBuf,
    pub format: Format,
    /// The QEMU command line that boots it.
    pub command: String,
}

/// Fail disk `name` over to the point `point` names, written to `out`
/// (see [`crate::failover::failover`]).
pub fn failover(data: &Path, name: &str, point: &str, out: &Path, format: Option<Format>, force: bool) -> Result<FailoverView, OpsError> {
    let p = select_point(data, name, point)?;
    let (_, fmt) = crate::failover::failover(data, name, &p, out, format, force)?;
    let command = crate::failover::qemu_command(out, fmt);
    Ok(FailoverView { name: name.into(), point: (&p).into(), out: out.to_path_buf(), format: fmt, command })
}

/// How a failover ended.
#[derive(serde::Serialize, Clone, Debug)]
pub struct FinishView {
    pub name: String,
    /// Committed (final); else cancelled (the stream is accepted again).
    pub committed: bool,
}

/// `ferry failover --commit` (`commit`) or `--cancel`.
pub fn failover_finish(data: &Path, name: &str, commit: bool) -> Result<FinishView, OpsError> {
    failover_state::finish(data, name, commit)?;
    Ok(FinishView { name: name.into(), committed: commit })
}

/// `ferry failover --start`: run the QEMU command line a failover printed.
pub fn start_qemu(command: &str) -> Result<(), OpsError> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|source| OpsError::Io { what: "starting qemu-system-x86_64".into(), source })?;
    if !st.success() {
        return Err(OpsError::Qemu(st));
    }
    Ok(())
}

// ---------------------------------------------------- verify, repair, scrub

/// `ferry verify`: check disk `name`, reading at most `rate` bytes a second
/// (0: no limit); the outcome is also recorded for `ferry status --data`.
pub fn verify(data: &Path, name: &str, rate: u64) -> Result<Outcome, OpsError> {
    Ok(scrub::verify(data, name, rate)?)
}

/// `ferry repair`.
pub fn repair(data: &Path, name: &str) -> Result<Report, OpsError> {
    Ok(crate::store::repair::repair(data, name)?)
}

/// `--scrub-every`: verify every disk under `data` every `every`, at
/// `rate`, on a thread of its own.
pub fn start_scrub(data: &Path, every: Duration, rate: u64) {
    let d = data.to_path_buf();
    std::thread::spawn(move || scrub::scrub_loop(&d, every, rate));
}

// ---------------------------------------------------------------- status

/// The master target's view of one disk, for `ferry status --data`.
#[derive(serde::Serialize, Clone, Debug)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    /// A stream holds the disk now (an agent is connected to a master target).
    pub streaming: bool,
    pub points: usize,
    pub newest_point: Option<u64>,
    pub newest_point_age_seconds: Option<f64>,
    /// Bytes the journal takes on disk (punched space excluded).
    pub journal_bytes: u64,
    pub durable_seq: Option<u64>,
    pub free_bytes: Option<u64>,
    pub fs_bytes: Option<u64>,
    pub last_verify: Option<Outcome>,
    pub damage: Option<String>,
    pub failover: Option<String>,
    pub health: Health,
    pub health_reason: String,
}

/// What `ferry status --data DIR --name NAME` shows.
pub fn disk_status(data: &Path, name: &str) -> Result<DiskStatus, OpsError> {
    use std::os::unix::fs::MetadataExt;
    let p = Paths::new(data, name);
    let (meta, damage) = match read_meta(data, name) {
        Ok(m) => (Some(m), None),
        Err(DiskError::Damaged { why, .. }) => (None, Some(why)),
        Err(e) => return Err(e.into()),
    };
    let cat = catalog::scan(&p.points).unwrap_or_default();
    let now = ferry_common::now_ns();
    let newest = cat.points.last().copied();
    // The stream's writer lock is held (tried without waiting, released at once).
    let streaming = p.lock.exists() && matches!(WriterLock::take(&p, name), Err(DiskError::Busy(_)));
    let journal_bytes = std::fs::metadata(&p.journal).map(|m| m.blocks() * 512).unwrap_or(0);
    let durable_seq = meta
        .as_ref()
        .and_then(|m| Sums::open(&p.sums, m.size, false).ok().flatten())
        .and_then(|s| s.mark().ok().flatten())
        .map(|m| m.durable_seq);
    let space = reserve::fs_space(&p.dir);
    let last_verify = scrub::last(data, name);
    let failover = failover_state::refuse_if_failed_over(&p, name).err().map(|e| match e {
        DiskError::FailedOver { why, .. } => why,
        e => e.to_string(),
    });
    let mut health = Health::Ok;
    let mut why: Vec<String> = Vec::new();
    if let Some(d) = &damage {
        health = Health::Crit;
        why.push(format!("damaged: {d}"));
    }
    if let Some(v) = &last_verify {
        if !v.ok() {
            health = Health::Crit;
            why.push(format!("the last verify found {} damaged range(s)", v.damage.len()));
        }
    }
    if let Some((free, total)) = space {
        if free < total / 100 || free < (64 << 20) {
            health = Health::Crit;
            why.push(format!("{} bytes free of {total}: the journal cannot grow; tighten retention (ferry retention --journal-cap)", free));
        } else if free < total / 10 {
            health = health.max(Health::Warn);
            why.push(format!("only {free} bytes free of {total}"));
        }
    }
    if let Some(f) = &failover {
        health = health.max(Health::Warn);
        why.push(format!("failed over: {f}"));
    }
    let health_reason = if why.is_empty() {
        format!(
            "{} points, newest {}",
            cat.points.len(),
            newest.map_or("none".into(), |q| format!("{}s old", now.saturating_sub(q.time_ns) / 1_000_000_000))
        )
    } else {
        why.join("; ")
    };
    Ok(DiskStatus {
        name: name.into(),
        size: meta.as_ref().map_or(0, |m| m.size),
        streaming,
        points: cat.points.len(),
        newest_point: newest.map(|q| q.id),
        newest_point_age_seconds: newest.map(|q| now.saturating_sub(q.time_ns) as f64 / 1e9),
        journal_bytes,
        durable_seq,
        free_bytes: space.map(|s| s.0),
        fs_bytes: space.map(|s| s.1),
        last_verify,
        damage,
        failover,
        health,
        health_reason,
    })
}

// ---------------------------------------------------------------- report

/// The master target's [`RoleReport`] (its /metrics and heartbeat): every
/// disk folder of `data`, with its points (how many, the source time of
/// the newest and of the newest app-consistent one), its journal (bytes on
/// disk, and retention's cap: 0 for none), the bytes applied since this
/// process started (churn, from `live`, the server's handle) and a state:
/// `connected` while a stream writes it, else `idle`; `failed over` and
/// `damaged` (with why) before either. `name` is the host name; a caller
/// with an identity puts its name (and `cert_expires_unix`).
pub fn report(data: &Path, live: &crate::server::Live) -> ferry_common::report::RoleReport {
    use ferry_common::report::{unix_ms, DiskReport, RoleReport};
    use std::os::unix::fs::MetadataExt;
    let mut r = RoleReport::new("master-target");
    let mut names: Vec<String> =
        std::fs::read_dir(data).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    names.retain(|n| ferry_proto::valid_name(n) && Paths::new(data, n).meta.exists());
    names.sort();
    for name in names {
        let p = Paths::new(data, &name);
        let l = live.disk(&name);
        let (meta, damage) = match read_meta(data, &name) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let cat = catalog::scan(&p.points).unwrap_or_default();
        let newest_app = cat.points.iter().rev().find(|q| q.kind == PointKind::App);
        let failover = failover_state::refuse_if_failed_over(&p, &name).err().map(|e| match e {
            DiskError::FailedOver { why, .. } => why,
            e => e.to_string(),
        });
        let cap = meta.as_ref().and_then(|m| retention::effective(&p, m.size).ok()).map(|(pol, _)| pol.journal_cap);
        let (state, reason) = match (&damage, &failover) {
            (Some(d), _) => ("damaged", Some(d.clone())),
            (None, Some(f)) => ("failed over", Some(f.clone())),
            (None, None) if l.streams > 0 => ("connected", None),
            (None, None) => ("idle", None),
        };
        r.disks.push(DiskReport {
            name,
            state: state.into(),
            reason,
            churn_bytes_total: l.applied_bytes,
            points: Some(cat.points.len() as u64),
            last_point_unix_ms: cat.points.last().and_then(|q| unix_ms(q.time_ns)),
            last_app_point_unix_ms: newest_app.and_then(|q| unix_ms(q.time_ns)),
            journal_bytes: Some(std::fs::metadata(&p.journal).map(|m| m.blocks() * 512).unwrap_or(0)),
            journal_max_bytes: cap,
            recent_points: cat.points[cat.points.len().saturating_sub(50)..]
                .iter()
                .map(|q| ferry_common::report::PointInfo {
                    id: q.id.to_string(),
                    time_unix_ms: unix_ms(q.time_ns).unwrap_or(0),
                    kind: q.kind.as_str().into(),
                })
                .collect(),
            ..Default::default()
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Disk, Op};

    fn disk_with_points(data: &Path, name: &str, tags: &[(u64, PointKind)]) {
        let (mut d, _) = Disk::open(data, name, 1 << 20, [1; 16]).unwrap();
        retention::store(&Paths::new(data, name), &Policy::keep_everything()).unwrap();
        let mut seq = 0;
        for &(t, kind) in tags {
            seq += 2;
            d.apply(&[Op::Write { seq: seq - 1, offset: 0, data: vec![seq as u8; 4096] }, Op::Tag { seq, time_ns: t, kind }]).unwrap();
        }
    }

    /// `ferry points --json` and `ferry group-points --json` print what
    /// they always printed: the same keys, in the same (sorted) order.
    #[test]
    fn point_views_serialize_as_the_cli_always_printed_them() {
        let t = tempfile::tempdir().unwrap();
        disk_with_points(t.path(), "a", &[(5, PointKind::Crash), (7, PointKind::Group)]);
        disk_with_points(t.path(), "b", &[(7, PointKind::Group)]);
        let v = points(t.path(), "a").unwrap();
        assert_eq!(
            serde_json::to_string(&v.points).unwrap(),
            r#"[{"id":1,"kept":"window","kind":"crash","seq":2,"time":"1970-01-01T00:00:00.000000005Z"},{"id":2,"kept":"newest","kind":"group","seq":4,"time":"1970-01-01T00:00:00.000000007Z"}]"#
        );
        assert!(render::points_failover(&v).is_none());
        assert_eq!(render::points_table(&v)[0], format!("{:>6}  {:<32}  {:<5}  {:>12}  {}", "ID", "TIME", "KIND", "SEQ", "KEPT"));
        let g = group_points(t.path(), &["b".to_string(), "a".to_string()]).unwrap();
        assert_eq!(
            serde_json::to_string(&g.rows).unwrap(),
            r#"[{"points":{"a":2,"b":1},"time":"1970-01-01T00:00:00.000000007Z","time_ns":7}]"#
        );
        assert_eq!(render::group_points(&g), ["1970-01-01T00:00:00.000000007Z  b=1 a=2"]);
    }

    /// The report lists every disk folder with its points, the newest
    /// app-consistent one, its journal and retention's cap.
    #[test]
    fn the_report_has_every_disk_with_its_points() {
        let t = tempfile::tempdir().unwrap();
        disk_with_points(t.path(), "a", &[(5_000_000, PointKind::App), (7_000_000, PointKind::Crash)]);
        disk_with_points(t.path(), "b", &[]);
        std::fs::create_dir_all(t.path().join("not-a-disk")).unwrap();
        let r = report(t.path(), &crate::server::Live::default());
        assert_eq!(r.role, "master-target");
        let names: Vec<&str> = r.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let a = &r.disks[0];
        assert_eq!((a.state.as_str(), a.points, a.last_point_unix_ms, a.last_app_point_unix_ms), ("idle", Some(2), Some(7), Some(5)));
        assert_eq!(a.journal_max_bytes, Some(0), "keep_everything has no journal cap");
        assert!(a.journal_bytes.is_some_and(|b| b > 0), "{a:?}");
        assert_eq!((r.disks[1].points, r.disks[1].last_point_unix_ms), (Some(0), None));
        let text = r.metrics(ferry_common::report::Format::Prometheus);
        assert!(text.contains("ferry_disk_points{disk=\"a\"} 2\n") && !text.contains("ferry_disk_sent_bytes"), "{text}");
    }

    /// `ferry retention` flags: `none` lifts each limit, and a bad value
    /// names its flag.
    #[test]
    fn retention_flags_parse_with_none_lifting_the_limit() {
        let e = RetentionEdit::from_flags(Some("none"), Some("none"), Some("2h"), Some("none")).unwrap();
        assert_eq!(e, RetentionEdit { keep_ns: Some(0), all_ns: Some(u64::MAX), hourly_ns: Some(7_200_000_000_000), journal_cap: Some(0) });
        let bad = RetentionEdit::from_flags(None, Some("soon"), None, None).unwrap_err().to_string();
        assert!(bad.starts_with("--keep-all \"soon\""), "{bad}");
        assert!(RetentionEdit::from_flags(None, None, None, None).unwrap().is_empty());
    }
}
