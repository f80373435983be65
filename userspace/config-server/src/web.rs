//! The website: server-rendered pages (askama templates in `templates/`,
//! escaped by default), a small stylesheet and one script (`static/`, served
//! from the binary). The pages show the same views the API returns
//! ([`crate::DiskView`], [`db::Machine`], [`db::Group`], …) and change state
//! through the same functions (`api::set_group`, `plans::start`, …).
//!
//! Every page needs a session (else a redirect to `/login`); a form that
//! changes state carries the session's CSRF token in the hidden field `csrf`
//! and is refused (403 page) without it or without the level it needs,
//! whatever the page showed. Every answer carries a Content-Security-Policy
//! that allows scripts from this origin only (no inline script anywhere),
//! `X-Frame-Options: DENY` and `X-Content-Type-Options: nosniff`.
//!
//! Stable hooks for tests: the dashboard's table `#disks` has a row
//! `tr[data-disk=NAME]` per disk whose RPO cell is `td.rpo#rpo-NAME`
//! (`data-ms` the value); a chart is `svg.chart#chart-{lag,rpo,churn}`
//! with a `polyline.series` per unbroken stretch, `rect.gap` for each
//! stretch without samples and `circle.point` per recovery point; a run's
//! state is `#run-state`, its log `#run-log`.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};

use crate::api::{ApiError, RunBody, UserBody};
use crate::auth::{self, Caller, Level};
use crate::db::{self, now_ms, Policy};
use crate::{App, DiskView};

const CSS: &str = include_str!("../static/app.css");
const JS: &str = include_str!("../static/app.js");

/// What every page's answer carries.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'";

type Fields = HashMap<String, String>;
type Page = Result<Response, Response>;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/", get(dashboard))
        .route("/disks/{name}", get(disk_page))
        .route("/machines", get(machines_page))
        .route("/machines/{role}/{name}/group", post(machine_group))
        .route("/groups", get(groups_page).post(group_save))
        .route("/alerts", get(alerts_page))
        .route("/alerts/{id}/ack", post(alert_ack))
        .route("/plans", get(plans_page).post(plan_save))
        .route("/plans/{name}/run", post(plan_run))
        .route("/runs/{id}", get(run_page))
        .route("/runs/{id}/{action}", post(run_action))
        .route("/users", get(users_page).post(user_create))
        .route("/users/{name}/token", post(user_token))
        .route("/account", get(account_page))
        .route("/account/token", post(own_token))
        .route("/static/app.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/static/app.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn asset(ctype: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, ctype), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

// ---- who is asking ----

/// The signed-in user as the templates see them.
#[derive(Clone, Debug, Default)]
pub struct Me {
    pub name: String,
    pub role: String,
    pub csrf: String,
    pub operator: bool,
    pub admin: bool,
}

impl Me {
    fn of(c: &Caller) -> Me {
        Me {
            name: c.user.name.clone(),
            role: c.user.role.clone(),
            csrf: c.csrf(),
            operator: c.can(Level::Operator),
            admin: c.can(Level::Admin),
        }
    }
}

fn render<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(s) => (status, Html(s)).into_response(),
        Err(e) => {
            log::warn!("rendering a page: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage {
    me: Me,
    title: String,
    message: String,
    back: String,
}

/// A page that says what went wrong (or right), with a link back.
fn message(me: &Me, status: StatusCode, title: &str, msg: &str, back: &str) -> Response {
    render(status, &MessagePage { me: me.clone(), title: title.into(), message: msg.into(), back: back.into() })
}

fn forbidden(me: &Me, msg: &str) -> Response {
    message(me, StatusCode::FORBIDDEN, "Not allowed", msg, "/")
}

fn failed(me: &Me, e: ApiError, back: &str) -> Response {
    let title = if e.0.is_client_error() { "Not done" } else { "Error" };
    message(me, e.0, title, &e.1, back)
}

fn internal(me: &Me, e: anyhow::Error) -> Response {
    log::warn!("a page failed: {e:#}");
    message(me, StatusCode::INTERNAL_SERVER_ERROR, "Error", &format!("{e:#}"), "/")
}

/// The caller, or a redirect to the login page.
async fn signed_in(app: &App, headers: &HeaderMap) -> Result<Caller, Response> {
    match auth::caller(&app.db, headers).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(Redirect::to("/login").into_response()),
        Err(e) => Err(internal(&Me::default(), e)),
    }
}

/// A page that needs at least `need`.
async fn viewing(app: &App, headers: &HeaderMap, need: Level) -> Result<(Caller, Me), Response> {
    let c = signed_in(app, headers).await?;
    let me = Me::of(&c);
    if !c.can(need) {
        return Err(forbidden(&me, &format!("{} is a {}; this page needs {}", c.user.name, c.user.role, level_word(need))));
    }
    Ok((c, me))
}

/// A form post: signed in, at least `need`, and the session's CSRF token.
async fn posting(app: &App, headers: &HeaderMap, need: Level, f: &Fields) -> Result<(Caller, Me), Response> {
    let c = signed_in(app, headers).await?;
    let me = Me::of(&c);
    if !c.csrf_ok(f.get("csrf").map(String::as_str)) {
        return Err(forbidden(&me, "missing or wrong CSRF token: reload the page and try again"));
    }
    if !c.can(need) {
        return Err(forbidden(&me, &format!("{} is a {}; this needs {}", c.user.name, c.user.role, level_word(need))));
    }
    Ok((c, me))
}

fn level_word(l: Level) -> &'static str {
    match l {
        Level::Viewer => "viewer",
        Level::Operator => "operator",
        Level::Admin => "admin",
    }
}

fn field<'a>(f: &'a Fields, k: &str) -> &'a str {
    f.get(k).map(|s| s.trim()).unwrap_or("")
}

// ---- formatting ----

/// A duration for people: "4.2 s", "3 min 5 s", "2 h 10 min".
pub fn fmt_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn ago(now: i64, ms: i64) -> String {
    if ms <= 0 {
        "never".into()
    } else {
        format!("{} ago", fmt_ms(now - ms))
    }
}

// ---- login ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: String,
    user: String,
}

async fn login_form(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Ok(Some(_)) = auth::caller(&app.db, &headers).await {
        return Redirect::to("/").into_response();
    }
    render(StatusCode::OK, &LoginPage { error: String::new(), user: String::new() })
}

async fn login(State(app): State<Arc<App>>, Form(f): Form<Fields>) -> Response {
    let user = field(&f, "user").to_string();
    let pw = f.get("password").cloned().unwrap_or_default();
    match auth::login(&app.db, &user, &pw).await {
        Ok(Some((secret, _csrf))) => ([(header::SET_COOKIE, auth::session_cookie(&secret, app.tls))], Redirect::to("/")).into_response(),
        Ok(None) => render(StatusCode::UNAUTHORIZED, &LoginPage { error: "wrong user name or password".into(), user }),
        Err(e) => internal(&Me::default(), e),
    }
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Fields>) -> Page {
    let (c, me) = posting(&app, &headers, Level::Viewer, &f).await?;
    auth::logout(&app.db, &c).await.map_err(|e| internal(&me, e))?;
    Ok(([(header::SET_COOKIE, auth::session_cookie("", app.tls))], Redirect::to("/login")).into_response())
}

// ---- the dashboard ----

/// One disk on the dashboard: the API's view and its cells as text.
pub struct DiskLine {
    pub d: DiskView,
    pub agent: String,
    pub state: String,
    pub rpo: String,
    pub rpo_ms: String,
    pub over: bool,
    pub lag: String,
    pub backlog: String,
    pub alerts: String,
}

impl DiskLine {
    pub fn of(d: DiskView) -> DiskLine {
        DiskLine {
            agent: d.agent.clone().unwrap_or_else(|| "—".into()),
            state: if d.state.is_empty() { "unknown".into() } else { d.state.clone() },
            rpo: opt(d.rpo_ms, fmt_ms),
            rpo_ms: d.rpo_ms.map(|v| v.to_string()).unwrap_or_default(),
            over: d.rpo_ms.is_some_and(|r| r > d.rpo_threshold_s as i64 * 1000),
            lag: opt(d.lag_ms, |v| fmt_ms(v as i64)),
            backlog: opt(d.backlog_bytes, fmt_bytes),
            alerts: d.alerts.join(", "),
            d,
        }
    }
}

/// An alert as the pages list it.
pub struct AlertLine {
    pub a: db::Alert,
    pub raised: String,
    pub open: bool,
}

impl AlertLine {
    fn of(a: db::Alert) -> AlertLine {
        AlertLine { raised: db::stamp(a.raised_ms), open: a.state == "raised", a }
    }
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    me: Me,
    disks: Vec<DiskLine>,
    alerts: Vec<AlertLine>,
}

async fn dashboard(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let disks = crate::disk_views(&app).await.map_err(|e| internal(&me, e))?;
    let alerts = app.db.alerts(true, 200).await.map_err(|e| internal(&me, e))?;
    Ok(render(
        StatusCode::OK,
        &Dashboard { me, disks: disks.into_iter().map(DiskLine::of).collect(), alerts: alerts.into_iter().map(AlertLine::of).collect() },
    ))
}

// ---- a disk ----

#[derive(Template)]
#[template(path = "disk.html")]
struct DiskPage {
    me: Me,
    l: DiskLine,
    seen: String,
    last_point: String,
    charts: Vec<(String, String)>,
    points: Vec<(String, String, String)>,
    alerts: Vec<AlertLine>,
}

async fn disk_page(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let views = crate::disk_views(&app).await.map_err(|e| internal(&me, e))?;
    let Some(d) = views.into_iter().find(|d| d.name == name) else {
        return Err(message(&me, StatusCode::NOT_FOUND, "No such disk", &format!("no disk {name} has been reported"), "/"));
    };
    let now = now_ms();
    let since = now - 3600 * 1000;
    let samples = app.db.samples(&name, since).await.map_err(|e| internal(&me, e))?;
    let listed = crate::api::disk_points(&app, &name).await.map_err(|e| failed(&me, e, "/"))?;
    // Recovery points: where the newest point changed between samples, and those the master target lists.
    let mut marks: Vec<i64> = listed.iter().map(|p| p.time_unix_ms).collect();
    let mut prev = None;
    for s in &samples {
        if let Some(p) = s.last_point_ms {
            if prev != Some(p) {
                marks.push(p);
            }
            prev = Some(p);
        }
    }
    marks.sort_unstable();
    marks.dedup();
    let gap = 3 * app.cfg.heartbeat_every.as_millis() as i64;
    let span = Span { since, now, gap_ms: gap.max(1) };
    let series = |f: fn(&db::Sample) -> Option<f64>| samples.iter().map(|s| (s.at_ms, f(s))).collect::<Vec<_>>();
    let charts = vec![
        ("Lag".to_string(), chart("lag", "s", &series(|s| s.lag_ms.map(|v| v as f64 / 1000.0)), &span, &marks)),
        ("RPO".to_string(), chart("rpo", "s", &series(|s| s.rpo_ms.map(|v| v as f64 / 1000.0)), &span, &marks)),
        ("Churn".to_string(), chart("churn", "B/s", &series(|s| s.churn_bps), &span, &marks)),
    ];
    let points = listed.iter().rev().map(|p| (p.id.clone(), db::stamp(p.time_unix_ms), p.kind.clone())).collect();
    let agent_subject = d.agent.as_ref().map(|a| format!("agent/{a}"));
    let alerts = app
        .db
        .alerts(false, 500)
        .await
        .map_err(|e| internal(&me, e))?
        .into_iter()
        .filter(|a| a.subject == d.name || Some(&a.subject) == agent_subject.as_ref())
        .take(50)
        .map(AlertLine::of)
        .collect();
    Ok(render(
        StatusCode::OK,
        &DiskPage {
            me,
            seen: ago(now, d.seen_ms),
            last_point: opt(d.last_point_unix_ms, db::stamp),
            l: DiskLine::of(d),
            charts,
            points,
            alerts,
        },
    ))
}

/// A chart's time axis: from `since` to `now`; samples further apart than
/// `gap_ms` are not joined.
pub struct Span {
    pub since: i64,
    pub now: i64,
    pub gap_ms: i64,
}

const W: f64 = 640.0;
const H: f64 = 160.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 8.0;
const PAD_T: f64 = 10.0;
const PAD_B: f64 = 22.0;

/// An inline SVG line chart of `(time ms, value)` samples over `span`:
/// a `polyline.series` per stretch of samples each within `gap_ms` of the
/// last (a missing value or a longer silence breaks the line, and the
/// silence is a `rect.gap`; nothing is interpolated across it), a
/// `circle.point` on the time axis per recovery point in `marks`.
/// Only numbers and the fixed `id`/`unit` go into it.
pub fn chart(id: &str, unit: &str, samples: &[(i64, Option<f64>)], span: &Span, marks: &[i64]) -> String {
    use std::fmt::Write;
    let t0 = span.since as f64;
    let dt = (span.now - span.since).max(1) as f64;
    let x = |t: i64| PAD_L + (t as f64 - t0) / dt * (W - PAD_L - PAD_R);
    let max = samples.iter().filter_map(|s| s.1).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = if max <= 0.0 { 1.0 } else { max * 1.1 };
    let y = |v: f64| PAD_T + (1.0 - (v / top).clamp(0.0, 1.0)) * (H - PAD_T - PAD_B);
    let base = H - PAD_B;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg id="chart-{id}" class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{id}">"#
    );
    let _ = write!(s, r#"<rect class="frame" x="{PAD_L}" y="{PAD_T}" width="{}" height="{}"/>"#, W - PAD_L - PAD_R, base - PAD_T);
    let _ = write!(s, r#"<text class="axis" x="{}" y="{}" text-anchor="end">{} {unit}</text>"#, PAD_L - 4.0, PAD_T + 10.0, short(top));
    let _ = write!(s, r#"<text class="axis" x="{}" y="{base}" text-anchor="end">0</text>"#, PAD_L - 4.0);
    let _ = write!(s, r#"<text class="axis" x="{PAD_L}" y="{}">−60 min</text>"#, H - 6.0);
    let _ = write!(s, r#"<text class="axis" x="{}" y="{}" text-anchor="end">now</text>"#, W - PAD_R, H - 6.0);
    // Stretches of joined samples.
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut cur: Vec<(f64, f64)> = Vec::new();
    let mut last_at: Option<i64> = None;
    let mut gaps: Vec<(i64, i64)> = Vec::new();
    for &(at, v) in samples {
        if at < span.since || at > span.now {
            continue;
        }
        if let Some(p) = last_at {
            if at - p > span.gap_ms {
                gaps.push((p, at));
                runs.push(std::mem::take(&mut cur));
            }
        }
        last_at = Some(at);
        match v.filter(|v| v.is_finite()) {
            Some(v) => cur.push((x(at), y(v))),
            None => runs.push(std::mem::take(&mut cur)),
        }
    }
    runs.push(cur);
    match last_at {
        Some(p) if span.now - p > span.gap_ms => gaps.push((p, span.now)),
        None => gaps.push((span.since, span.now)),
        _ => {}
    }
    for (a, b) in gaps {
        let _ = write!(
            s,
            r#"<rect class="gap" x="{:.1}" y="{PAD_T}" width="{:.1}" height="{}"><title>no samples</title></rect>"#,
            x(a),
            (x(b) - x(a)).max(0.5),
            base - PAD_T
        );
    }
    for r in runs.iter().filter(|r| !r.is_empty()) {
        if r.len() == 1 {
            let _ = write!(s, r#"<circle class="lone" cx="{:.1}" cy="{:.1}" r="1.5"/>"#, r[0].0, r[0].1);
        } else {
            s.push_str(r#"<polyline class="series" points=""#);
            for (i, (px, py)) in r.iter().enumerate() {
                let _ = write!(s, "{}{px:.1},{py:.1}", if i == 0 { "" } else { " " });
            }
            s.push_str(r#""/>"#);
        }
    }
    for &m in marks.iter().filter(|&&m| m >= span.since && m <= span.now) {
        let _ = write!(
            s,
            r#"<circle class="point" cx="{:.1}" cy="{base}" r="3"><title>recovery point {}</title></circle>"#,
            x(m),
            db::stamp(m)
        );
    }
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

// ---- machines ----

pub struct MachineLine {
    pub m: db::Machine,
    pub heard: String,
    pub silent: bool,
    pub group: String,
    pub disks: String,
}

#[derive(Template)]
#[template(path = "machines.html")]
struct MachinesPage {
    me: Me,
    machines: Vec<MachineLine>,
    groups: Vec<String>,
}

async fn machines_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let now = now_ms();
    let timeout = app.cfg.heartbeat_timeout.as_millis() as i64;
    let ms = app.db.machines().await.map_err(|e| internal(&me, e))?;
    let groups = app.db.groups().await.map_err(|e| internal(&me, e))?.into_iter().map(|g| g.name).collect();
    let machines = ms
        .into_iter()
        .map(|m| MachineLine {
            heard: ago(now, m.last_seen_ms),
            silent: now - m.last_seen_ms > timeout,
            group: m.group.clone().unwrap_or_default(),
            disks: m.report.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
            m,
        })
        .collect();
    Ok(render(StatusCode::OK, &MachinesPage { me, machines, groups }))
}

async fn machine_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((role, name)): Path<(String, String)>,
    Form(f): Form<Fields>,
) -> Page {
    let (_, me) = posting(&app, &headers, Level::Operator, &f).await?;
    let g = field(&f, "group");
    crate::api::set_group(&app, &role, &name, (!g.is_empty()).then_some(g)).await.map_err(|e| failed(&me, e, "/machines"))?;
    Ok(Redirect::to("/machines").into_response())
}

// ---- groups ----

#[derive(Template)]
#[template(path = "groups.html")]
struct GroupsPage {
    me: Me,
    groups: Vec<db::Group>,
    blank: Policy,
}

async fn groups_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let groups = app.db.groups().await.map_err(|e| internal(&me, e))?;
    Ok(render(StatusCode::OK, &GroupsPage { me, groups, blank: Policy::default() }))
}

/// A policy from the group form's fields (every field present).
fn policy_of(f: &Fields) -> Result<Policy, String> {
    fn num<T: std::str::FromStr>(f: &Fields, k: &str) -> Result<T, String> {
        field(f, k).parse().map_err(|_| format!("{k}: {:?} is not a number", field(f, k)))
    }
    let p = Policy {
        rpo_threshold_s: num(f, "rpo_threshold_s")?,
        point_every_s: num(f, "point_every_s")?,
        app_point_every_s: num(f, "app_point_every_s")?,
        retention: field(f, "retention").into(),
        bandwidth: field(f, "bandwidth").into(),
        process_server: field(f, "process_server").into(),
        master_target: field(f, "master_target").into(),
    };
    p.check()?;
    Ok(p)
}

async fn group_save(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Fields>) -> Page {
    let (_, me) = posting(&app, &headers, Level::Operator, &f).await?;
    let name = field(&f, "name");
    crate::api::check_group_name(name).map_err(|e| failed(&me, e, "/groups"))?;
    let p = policy_of(&f).map_err(|e| message(&me, StatusCode::BAD_REQUEST, "Not done", &e, "/groups"))?;
    app.db.put_group(name, &p).await.map_err(|e| internal(&me, e))?;
    Ok(Redirect::to("/groups").into_response())
}

// ---- alerts ----

#[derive(Template)]
#[template(path = "alerts.html")]
struct AlertsPage {
    me: Me,
    alerts: Vec<AlertLine>,
}

async fn alerts_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let alerts = app.db.alerts(false, 500).await.map_err(|e| internal(&me, e))?;
    Ok(render(StatusCode::OK, &AlertsPage { me, alerts: alerts.into_iter().map(AlertLine::of).collect() }))
}

async fn alert_ack(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>, Form(f): Form<Fields>) -> Page {
    let (c, me) = posting(&app, &headers, Level::Operator, &f).await?;
    if !app.db.ack(&id, &c.user.name).await.map_err(|e| internal(&me, e))? {
        return Err(message(&me, StatusCode::NOT_FOUND, "Not done", &format!("no raised alert {id}"), "/alerts"));
    }
    Ok(Redirect::to("/alerts").into_response())
}

// ---- plans and runs ----

pub struct PlanLine {
    pub name: String,
    pub json: String,
}

pub struct RunLine {
    pub r: db::PlanRun,
    pub started: String,
}

impl RunLine {
    fn of(r: db::PlanRun) -> RunLine {
        RunLine { started: db::stamp(r.started_ms), r }
    }
}

#[derive(Template)]
#[template(path = "plans.html")]
struct PlansPage {
    me: Me,
    plans: Vec<PlanLine>,
    runs: Vec<RunLine>,
    example: String,
}

const EXAMPLE_PLAN: &str = r#"{
  "steps": [
    { "name": "databases", "machines": ["db1"], "wait_s": 30 },
    { "name": "applications", "machines": ["app1", "app2"] }
  ]
}"#;

async fn plans_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let plans = app.db.plans().await.map_err(|e| internal(&me, e))?;
    let runs = app.db.runs(100).await.map_err(|e| internal(&me, e))?;
    let plans =
        plans.into_iter().map(|(name, body)| PlanLine { json: serde_json::to_string_pretty(&body).unwrap_or_default(), name }).collect();
    Ok(render(StatusCode::OK, &PlansPage { me, plans, runs: runs.into_iter().map(RunLine::of).collect(), example: EXAMPLE_PLAN.into() }))
}

async fn plan_save(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Fields>) -> Page {
    let (_, me) = posting(&app, &headers, Level::Operator, &f).await?;
    let name = field(&f, "name");
    crate::api::check_group_name(name).map_err(|e| failed(&me, e, "/plans"))?;
    let bad = |e: String| message(&me, StatusCode::BAD_REQUEST, "Not done", &e, "/plans");
    let p: crate::plans::Plan = serde_json::from_str(field(&f, "plan")).map_err(|e| bad(format!("the plan is not valid JSON: {e}")))?;
    p.check().map_err(|e| bad(e.to_string()))?;
    let v = serde_json::to_value(&p).map_err(|e| internal(&me, e.into()))?;
    app.db.put_plan(name, &v).await.map_err(|e| internal(&me, e))?;
    Ok(Redirect::to("/plans").into_response())
}

async fn plan_run(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>, Form(f): Form<Fields>) -> Page {
    let (c, me) = posting(&app, &headers, Level::Operator, &f).await?;
    let point = match field(&f, "point") {
        "" | "latest" => "latest".to_string(),
        "time" => field(&f, "time").to_string(),
        p => p.to_string(),
    };
    let body = RunBody { kind: field(&f, "kind").to_string(), point: Some(point) };
    let run = crate::plans::start(&app, &name, &body, &c.user.name).await.map_err(|e| failed(&me, e, "/plans"))?;
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

pub struct JobLine {
    pub j: db::Job,
    pub disk: String,
    pub result: String,
}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    me: Me,
    run: RunLine,
    updated: String,
    jobs: Vec<JobLine>,
    refresh: bool,
    can_cleanup: bool,
    can_commit: bool,
    can_cancel: bool,
}

async fn run_page(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    let Some(r) = app.db.run(&id).await.map_err(|e| internal(&me, e))? else {
        return Err(message(&me, StatusCode::NOT_FOUND, "No such run", &format!("no run {id}"), "/plans"));
    };
    let jobs = app
        .db
        .jobs(2000)
        .await
        .map_err(|e| internal(&me, e))?
        .into_iter()
        .filter(|j| j.args.get("run").and_then(|v| v.as_str()) == Some(id.as_str()))
        .rev()
        .map(|j| JobLine {
            disk: j.args.get("disk").and_then(|v| v.as_str()).unwrap_or("").to_string(),
            result: j.result.clone().unwrap_or_default(),
            j,
        })
        .collect();
    let st = r.state.as_str();
    let test = r.kind == "test-failover";
    // As plans::act allows them.
    let can_cleanup = me.operator && test && matches!(st, "ready" | "failed" | "interrupted" | "running");
    let can_commit = me.operator && !test && st == "failed-over";
    let can_cancel = me.operator && !test && matches!(st, "failed-over" | "failed" | "interrupted");
    Ok(render(
        StatusCode::OK,
        &RunPage {
            me,
            updated: db::stamp(r.updated_ms),
            refresh: st == "running",
            run: RunLine::of(r),
            jobs,
            can_cleanup,
            can_commit,
            can_cancel,
        },
    ))
}

async fn run_action(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<Fields>,
) -> Page {
    let (c, me) = posting(&app, &headers, Level::Operator, &f).await?;
    let back = format!("/runs/{id}");
    crate::plans::act(&app, &id, &action, &c.user.name).await.map_err(|e| failed(&me, e, &back))?;
    Ok(Redirect::to(&back).into_response())
}

// ---- users and tokens ----

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    me: Me,
    users: Vec<db::User>,
}

async fn users_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Admin).await?;
    let users = app.db.users().await.map_err(|e| internal(&me, e))?;
    Ok(render(StatusCode::OK, &UsersPage { me, users }))
}

async fn user_create(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Fields>) -> Page {
    let (_, me) = posting(&app, &headers, Level::Admin, &f).await?;
    let b = UserBody {
        name: field(&f, "name").to_string(),
        role: field(&f, "role").to_string(),
        password: f.get("password").cloned().unwrap_or_default(),
    };
    crate::api::create_user(&app, &b).await.map_err(|e| failed(&me, e, "/users"))?;
    Ok(Redirect::to("/users").into_response())
}

#[derive(Template)]
#[template(path = "token.html")]
struct TokenPage {
    me: Me,
    user: String,
    id: String,
    token: String,
    back: String,
}

async fn make_token(app: &App, me: &Me, user: &str, label: &str, back: &str) -> Page {
    if label.len() > 200 {
        return Err(message(me, StatusCode::BAD_REQUEST, "Not done", "a label has at most 200 bytes", back));
    }
    let (id, token) = auth::new_token(&app.db, user, label).await.map_err(|e| internal(me, e))?;
    Ok(render(StatusCode::OK, &TokenPage { me: me.clone(), user: user.into(), id, token, back: back.into() }))
}

/// An admin makes an API token for a user (shown once).
async fn user_token(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>, Form(f): Form<Fields>) -> Page {
    let (_, me) = posting(&app, &headers, Level::Admin, &f).await?;
    if app.db.user(&name).await.map_err(|e| internal(&me, e))?.is_none() {
        return Err(message(&me, StatusCode::NOT_FOUND, "Not done", &format!("no user {name}"), "/users"));
    }
    make_token(&app, &me, &name, field(&f, "label"), "/users").await
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    me: Me,
}

async fn account_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Page {
    let (_, me) = viewing(&app, &headers, Level::Viewer).await?;
    Ok(render(StatusCode::OK, &AccountPage { me }))
}

/// Anyone makes an API token of their own (shown once).
async fn own_token(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<Fields>) -> Page {
    let (c, me) = posting(&app, &headers, Level::Viewer, &f).await?;
    make_token(&app, &me, &c.user.name, field(&f, "label"), "/account").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    #[test]
    fn a_silence_breaks_the_line_and_is_marked() {
        let span = Span { since: 0, now: 100_000, gap_ms: 3_000 };
        // 0..10 s every second, nothing for 40 s, then 50..60 s.
        let mut s: Vec<(i64, Option<f64>)> = (0..=10).map(|i| (i * 1000, Some(i as f64))).collect();
        s.extend((50..=60).map(|i| (i * 1000, Some(1.0))));
        let svg = chart("lag", "s", &s, &span, &[5_000, 55_000]);
        assert_eq!(count(&svg, "class=\"series\""), 2, "{svg}");
        // The 40 s silence and the 40 s up to now.
        assert_eq!(count(&svg, "class=\"gap\""), 2, "{svg}");
        assert_eq!(count(&svg, "class=\"point\""), 2, "{svg}");
        // No segment joins 10 s to 50 s: within a line, samples are 1 s (5.8 px) apart.
        for line in svg.split("<polyline").skip(1) {
            let pts: Vec<f64> =
                line.split('"').nth(3).unwrap().split(' ').map(|p| p.split(',').next().unwrap().parse::<f64>().unwrap()).collect();
            assert!(pts.windows(2).all(|w| w[1] - w[0] < (W - PAD_L - PAD_R) * 0.03 + 0.2), "{pts:?}");
        }
    }

    #[test]
    fn a_missing_value_breaks_the_line_and_no_samples_is_one_gap() {
        let span = Span { since: 0, now: 10_000, gap_ms: 3_000 };
        let s = vec![(1000, Some(1.0)), (2000, Some(2.0)), (3000, None), (4000, Some(1.0)), (5000, Some(1.0)), (6000, Some(3.0))];
        let svg = chart("rpo", "s", &s, &span, &[]);
        assert_eq!(count(&svg, "class=\"series\""), 2, "{svg}");
        assert_eq!(count(&svg, "class=\"point\""), 0, "{svg}");
        let empty = chart("rpo", "s", &[], &span, &[20_000]);
        assert_eq!(count(&empty, "class=\"gap\""), 1, "{empty}");
        assert_eq!(count(&empty, "class=\"series\""), 0);
        assert_eq!(count(&empty, "class=\"point\""), 0, "a point outside the span is not drawn");
        let lone = chart("rpo", "s", &[(5000, Some(1.0))], &span, &[]);
        assert_eq!(count(&lone, "class=\"lone\""), 1, "{lone}");
    }

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(fmt_ms(4200), "4.2 s");
        assert_eq!(fmt_ms(185_000), "3 min 5 s");
        assert_eq!(fmt_ms(7_800_000), "2 h 10 min");
        assert_eq!(fmt_ms(-5), "0.0 s");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn templates_escape_what_they_show() {
        let me = Me { name: "<b>x</b>".into(), role: "viewer".into(), csrf: "c\"s".into(), operator: false, admin: false };
        let p = MessagePage { me, title: "t".into(), message: "<script>alert(1)</script>".into(), back: "/".into() };
        let html = p.render().unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
    }
}
