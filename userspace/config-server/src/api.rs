//! The REST API (`/api/v1/…`, JSON), the heartbeat endpoint the roles call,
//! `/metrics`, `/healthz` and the OpenAPI document. The website's pages
//! (web.rs) call the same functions and render the same views.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use ferry_common::report::{Metrics, RoleReport};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, Caller, Level};
use crate::db::{self, now_ms, Policy};
use crate::{App, HeartbeatReply, Peer};

pub const OPENAPI: &str = include_str!("openapi.json");

/// An error as the API answers it: a status and `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        log::warn!("request failed: {e:#}");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

pub fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub fn not_found(what: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what.into())
}

/// The caller, who must have at least `need`; `change` marks a
/// state-changing request, which a session must back with its CSRF token.
pub async fn need(app: &App, headers: &HeaderMap, need: Level, change: bool, csrf: Option<&str>) -> ApiResult<Caller> {
    let Some(c) = auth::caller(&app.db, headers).await? else {
        return Err(ApiError(StatusCode::UNAUTHORIZED, "log in first (a session cookie or an API token: Authorization: Bearer …)".into()));
    };
    if !c.can(need) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("{} is a {}; this needs {}", c.user.name, c.user.role, format!("{need:?}").to_lowercase()),
        ));
    }
    if change {
        let given = csrf.or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
        if !c.csrf_ok(given) {
            return Err(ApiError(StatusCode::FORBIDDEN, "missing or wrong CSRF token (X-CSRF-Token)".into()));
        }
    }
    Ok(c)
}

/// Every API route. (A test checks that each one is in openapi.json.)
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/heartbeat", post(heartbeat))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/api/v1/jobs/{id}/result", post(job_result))
        .route("/api/v1/machines", get(machines))
        .route("/api/v1/machines/{role}/{name}/group", put(machine_group))
        .route("/api/v1/disks", get(disks))
        .route("/api/v1/disks/{name}", get(disk))
        .route("/api/v1/disks/{name}/samples", get(samples))
        .route("/api/v1/disks/{name}/points", get(points))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/groups/{name}", put(put_group).delete(delete_group))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/alerts/{id}/ack", post(ack))
        .route("/api/v1/webhooks", get(webhooks).post(add_webhook))
        .route("/api/v1/webhooks/{id}", delete(delete_webhook))
        .route("/api/v1/deliveries", get(deliveries))
        .route("/api/v1/users", get(users).post(add_user))
        .route("/api/v1/users/{name}", delete(delete_user))
        .route("/api/v1/tokens", post(add_token))
        .route("/api/v1/join-tokens", post(join_token))
        .route("/api/v1/plans", get(plans))
        .route("/api/v1/plans/{name}", put(put_plan).delete(delete_plan))
        .route("/api/v1/plans/{name}/run", post(run_plan))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{id}", get(run))
        .route("/api/v1/runs/{id}/{action}", post(run_action))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn healthz(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    app.db.ping().await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e:#}")))?;
    Ok(Json(json!({ "ok": true, "instance": app.instance })))
}

/// The fleet as Prometheus text: per disk its RPO, lag, backlog and state
/// as last reported; per role when it was last heard; open alerts by kind.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    use ferry_common::report::Format;
    // Prometheus text unless the scraper asks for OpenMetrics (as every role's endpoint).
    let om = headers.get_all(header::ACCEPT).iter().any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let format = if om { Format::OpenMetrics } else { Format::Prometheus };
    let mut m = Metrics::default();
    m.gauge("ferry_up", "1 while the role runs.", &[("role", "config-server"), ("name", &app.instance)], 1.0);
    m.counter("ferry_cs_heartbeats", "Heartbeats accepted by this instance.", &[], app.counters.heartbeats.load(Ordering::Relaxed) as f64);
    m.counter(
        "ferry_cs_heartbeat_errors",
        "Heartbeats refused or failed at this instance.",
        &[],
        app.counters.heartbeat_errors.load(Ordering::Relaxed) as f64,
    );
    m.counter(
        "ferry_cs_webhook_deliveries",
        "Webhook deliveries sent by this instance.",
        &[],
        app.counters.deliveries_sent.load(Ordering::Relaxed) as f64,
    );
    let now = now_ms();
    for mc in app.db.machines().await? {
        m.gauge(
            "ferry_cs_role_last_seen_seconds",
            "Seconds since the role's last heartbeat.",
            &[("role", &mc.role), ("name", &mc.name)],
            (now - mc.last_seen_ms).max(0) as f64 / 1000.0,
        );
    }
    for d in crate::disk_views(&app).await? {
        let l = [("disk", d.name.as_str())];
        if let Some(r) = d.rpo_ms {
            m.gauge("ferry_cs_disk_rpo_seconds", "Age of the disk's newest recovery point.", &l, r as f64 / 1000.0);
        }
        m.gauge("ferry_cs_disk_rpo_threshold_seconds", "The disk's RPO threshold (its group's policy).", &l, d.rpo_threshold_s as f64);
        if let Some(v) = d.lag_ms {
            m.gauge("ferry_cs_disk_lag_seconds", "The disk's replication lag as its agent last reported.", &l, v as f64 / 1000.0);
        }
        if let Some(v) = d.backlog_bytes {
            m.gauge("ferry_cs_disk_backlog_bytes", "Bytes not yet at the next hop, as last reported.", &l, v as f64);
        }
        m.state_set("ferry_cs_disk_state", "The disk's state as last reported.", &l, if d.state.is_empty() { "unknown" } else { &d.state });
    }
    let mut by_kind: HashMap<String, u64> = HashMap::new();
    for a in app.db.alerts(true, 100_000).await? {
        *by_kind.entry(a.kind).or_default() += 1;
    }
    for k in crate::alerts::KINDS {
        m.gauge(
            "ferry_cs_alerts_open",
            "Open alerts (raised or acknowledged) by kind.",
            &[("kind", k)],
            by_kind.get(*k).copied().unwrap_or(0) as f64,
        );
    }
    Ok(([(header::CONTENT_TYPE, format.content_type())], m.finish_as(format)).into_response())
}

#[derive(Deserialize)]
pub struct LoginBody {
    pub user: String,
    pub password: String,
}

async fn login(State(app): State<Arc<App>>, Json(b): Json<LoginBody>) -> ApiResult<Response> {
    match auth::login(&app.db, &b.user, &b.password).await? {
        Some((secret, csrf)) => Ok((
            [(header::SET_COOKIE, auth::session_cookie(&secret, app.tls))],
            Json(json!({ "user": b.user, "csrf": csrf, "session": secret })),
        )
            .into_response()),
        None => Err(ApiError(StatusCode::UNAUTHORIZED, "wrong user name or password".into())),
    }
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    let c = need(&app, &headers, Level::Viewer, true, None).await?;
    auth::logout(&app.db, &c).await?;
    Ok(([(header::SET_COOKIE, auth::session_cookie("", app.tls))], Json(json!({ "ok": true }))).into_response())
}

async fn whoami(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let c = need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(json!({ "user": c.user.name, "role": c.user.role, "csrf": c.csrf() })))
}

/// A role reports; the answer carries its policy and its jobs.
async fn heartbeat(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Json(r): Json<RoleReport>,
) -> ApiResult<Json<HeartbeatReply>> {
    if let Err(e) = crate::authorize_report(&app, &peer, &r) {
        app.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError(StatusCode::FORBIDDEN, e));
    }
    if r.disks.len() > 4096 || r.disks.iter().any(|d| !ferry_identity::valid_name(&d.name)) {
        app.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
        return Err(bad("a report names at most 4096 disks, each 1-64 of A-Z a-z 0-9 . _ -"));
    }
    let now = now_ms();
    if let Err(e) = app.db.heartbeat(&r, now).await {
        app.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
        return Err(e.into());
    }
    app.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
    let group = app.db.group_of(&r.role, &r.name).await?;
    // What the role says of its jobs (the first JOB_REPORTS_MAX; more wait
    // for later heartbeats). A role that acknowledges jobs gets one it never
    // acknowledged again; one of before that only gets queued jobs.
    let held = r.jobs.as_deref().unwrap_or(&[]);
    app.db.job_reports(&r.role, &r.name, &held[..held.len().min(ferry_common::control::JOB_REPORTS_MAX)], now).await?;
    let again_ms = r.jobs.as_ref().map(|_| (3 * app.cfg.heartbeat_every.as_millis() as i64).max(10_000));
    let jobs = app.db.take_jobs(&r.role, &r.name, now, again_ms).await?;
    let mut disk_policies = std::collections::BTreeMap::new();
    if r.role != "agent" && !r.disks.is_empty() {
        let (rows, machines, groups) = (app.db.disk_rows().await?, app.db.machines().await?, app.db.groups().await?);
        for d in &r.disks {
            let agent = rows.iter().find(|x| x.disk == d.name && x.role == "agent").map(|x| x.machine.clone());
            let group = agent.and_then(|a| machines.iter().find(|m| m.role == "agent" && m.name == a).and_then(|m| m.group.clone()));
            if let Some(g) = group.and_then(|g| groups.iter().find(|x| x.name == g)) {
                disk_policies.insert(d.name.clone(), g.policy.clone());
            }
        }
    }
    Ok(Json(HeartbeatReply {
        disk_policies,
        interval_s: app.cfg.heartbeat_every.as_secs_f64(),
        group: group.as_ref().map(|g| g.name.clone()),
        policy_version: group.as_ref().map(|g| g.version).unwrap_or(0),
        policy: group.map(|g| g.policy),
        jobs,
    }))
}

#[derive(Deserialize)]
struct JobResult {
    ok: bool,
    #[serde(default)]
    result: String,
}

/// A role's outcome of a job (only the role it was given to may say it).
async fn job_result(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    Json(b): Json<JobResult>,
) -> ApiResult<Json<Value>> {
    let job = app.db.job(&id).await?.ok_or_else(|| not_found(format!("no job {id}")))?;
    let probe = RoleReport { role: job.role.clone(), name: job.machine.clone(), ..Default::default() };
    crate::authorize_report(&app, &peer, &probe).map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
    let done = app.db.finish_job(&id, &job.role, &job.machine, b.ok, &b.result).await?;
    Ok(Json(json!({ "recorded": done })))
}

async fn jobs(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::Job>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.jobs(500).await?))
}

async fn job(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<db::Job>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.job(&id).await?.ok_or_else(|| not_found(format!("no job {id}")))?))
}

async fn machines(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::Machine>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.machines().await?))
}

#[derive(Deserialize)]
pub struct GroupBody {
    pub group: Option<String>,
}

/// Put a machine into a protection group (its policy applies from its next heartbeat).
pub async fn set_group(app: &App, role: &str, name: &str, group: Option<&str>) -> ApiResult<()> {
    if let Some(g) = group {
        if app.db.group(g).await?.is_none() {
            return Err(not_found(format!("no group {g}: create it first (PUT /api/v1/groups/{g})")));
        }
    }
    if !app.db.set_machine_group(role, name, group).await? {
        return Err(not_found(format!("no machine {role}/{name} has reported")));
    }
    Ok(())
}

async fn machine_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((role, name)): Path<(String, String)>,
    Json(b): Json<GroupBody>,
) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Operator, true, None).await?;
    set_group(&app, &role, &name, b.group.as_deref()).await?;
    Ok(Json(json!({ "ok": true })))
}

async fn disks(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<crate::DiskView>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(crate::disk_views(&app).await?))
}

async fn disk(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<crate::DiskView>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    let d = crate::disk_views(&app).await?.into_iter().find(|d| d.name == name);
    Ok(Json(d.ok_or_else(|| not_found(format!("no disk {name} has been reported")))?))
}

#[derive(Deserialize)]
struct Since {
    since_ms: Option<i64>,
}

async fn samples(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<Since>,
) -> ApiResult<Json<Vec<db::Sample>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    let since = q.since_ms.unwrap_or(now_ms() - 3600 * 1000);
    Ok(Json(app.db.samples(&name, since).await?))
}

/// A disk's recovery points as its master target last listed them.
pub async fn disk_points(app: &App, name: &str) -> ApiResult<Vec<ferry_common::report::PointInfo>> {
    let rows = app.db.disk_rows().await?;
    let mt = rows.into_iter().filter(|r| r.disk == name && r.role == "master-target").max_by_key(|r| r.seen_ms);
    Ok(mt.map(|r| r.report.recent_points).unwrap_or_default())
}

async fn points(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(json!(disk_points(&app, &name).await?)))
}

async fn groups(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::Group>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.groups().await?))
}

pub fn check_group_name(name: &str) -> ApiResult<()> {
    if ferry_identity::valid_name(name) {
        Ok(())
    } else {
        Err(bad(format!("group name {name:?}: 1-64 of A-Z a-z 0-9 . _ -")))
    }
}

async fn put_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(p): Json<Policy>,
) -> ApiResult<Json<db::Group>> {
    need(&app, &headers, Level::Operator, true, None).await?;
    check_group_name(&name)?;
    p.check().map_err(|e| bad(e.to_string()))?;
    Ok(Json(app.db.put_group(&name, &p).await?))
}

async fn delete_group(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Operator, true, None).await?;
    if !app.db.delete_group(&name).await? {
        return Err(not_found(format!("no group {name}")));
    }
    Ok(Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
struct AlertQuery {
    all: Option<bool>,
}

async fn alerts(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<AlertQuery>) -> ApiResult<Json<Vec<db::Alert>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.alerts(!q.all.unwrap_or(false), 1000).await?))
}

async fn ack(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let c = need(&app, &headers, Level::Operator, true, None).await?;
    if !app.db.ack(&id, &c.user.name).await? {
        return Err(not_found(format!("no raised alert {id}")));
    }
    Ok(Json(json!({ "ok": true })))
}

async fn webhooks(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::Webhook>>> {
    need(&app, &headers, Level::Admin, false, None).await?;
    Ok(Json(app.db.webhooks().await?))
}

#[derive(Deserialize)]
struct WebhookBody {
    url: String,
    secret: String,
}

async fn add_webhook(State(app): State<Arc<App>>, headers: HeaderMap, Json(b): Json<WebhookBody>) -> ApiResult<Json<db::Webhook>> {
    need(&app, &headers, Level::Admin, true, None).await?;
    if !(b.url.starts_with("http://") || b.url.starts_with("https://")) || b.url.len() > 2048 {
        return Err(bad("a webhook URL starts with http:// or https://"));
    }
    if b.secret.len() < 16 {
        return Err(bad("a webhook secret needs at least 16 characters (it signs every delivery)"));
    }
    Ok(Json(app.db.add_webhook(&b.url, &b.secret).await?))
}

async fn delete_webhook(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Admin, true, None).await?;
    if !app.db.delete_webhook(&id).await? {
        return Err(not_found(format!("no webhook {id}")));
    }
    Ok(Json(json!({ "ok": true })))
}

async fn deliveries(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::Delivery>>> {
    need(&app, &headers, Level::Admin, false, None).await?;
    Ok(Json(app.db.deliveries(500).await?))
}

async fn users(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::User>>> {
    need(&app, &headers, Level::Admin, false, None).await?;
    Ok(Json(app.db.users().await?))
}

#[derive(Deserialize)]
pub struct UserBody {
    pub name: String,
    pub role: String,
    pub password: String,
}

pub async fn create_user(app: &App, b: &UserBody) -> ApiResult<()> {
    if !auth::valid_user(&b.name) {
        return Err(bad(format!("user name {:?}: 1-64 of A-Z a-z 0-9 . _ - @", b.name)));
    }
    if Level::parse(&b.role).is_none() {
        return Err(bad(format!("role {:?}: admin, operator or viewer", b.role)));
    }
    auth::check_new_password(&b.password).map_err(|e| bad(e.to_string()))?;
    let pw = b.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&pw)).await.map_err(|e| anyhow::anyhow!("{e}"))??;
    if !app.db.create_user(&b.name, &b.role, &hash).await? {
        return Err(ApiError(StatusCode::CONFLICT, format!("user {} exists", b.name)));
    }
    Ok(())
}

async fn add_user(State(app): State<Arc<App>>, headers: HeaderMap, Json(b): Json<UserBody>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Admin, true, None).await?;
    create_user(&app, &b).await?;
    Ok(Json(json!({ "name": b.name, "role": b.role })))
}

async fn delete_user(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let c = need(&app, &headers, Level::Admin, true, None).await?;
    if c.user.name == name {
        return Err(bad("you cannot delete yourself"));
    }
    if !app.db.delete_user(&name).await? {
        return Err(not_found(format!("no user {name}")));
    }
    Ok(Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
struct TokenBody {
    #[serde(default)]
    label: String,
}

/// A new API token for the caller (shown once).
async fn add_token(State(app): State<Arc<App>>, headers: HeaderMap, Json(b): Json<TokenBody>) -> ApiResult<Json<Value>> {
    let c = need(&app, &headers, Level::Viewer, true, None).await?;
    let (id, token) = auth::new_token(&app.db, &c.user.name, &b.label).await?;
    Ok(Json(json!({ "id": id, "token": token, "user": c.user.name })))
}

#[derive(Deserialize)]
struct JoinBody {
    role: String,
    name: String,
    #[serde(default)]
    ttl: Option<String>,
}

/// A one-time join token from the hosted CA.
async fn join_token(State(app): State<Arc<App>>, headers: HeaderMap, Json(b): Json<JoinBody>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Admin, true, None).await?;
    let Some(dir) = app.cfg.ca.clone() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this configuration server hosts no CA (start it with --ca DIR --enroll-listen ADDR)".into(),
        ));
    };
    let role: ferry_identity::Role = b.role.parse().map_err(|e: ferry_identity::IdentityError| bad(e.to_string()))?;
    let ttl = ferry_identity::parse_ttl("ttl", b.ttl.as_deref().unwrap_or("24h")).map_err(|e| bad(e.to_string()))?;
    let name = b.name.clone();
    let t = tokio::task::spawn_blocking(move || ferry_identity::ca::Ca::open(&dir).and_then(|ca| ca.create_token(role, &name, ttl, &[])))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .map_err(|e| bad(e.to_string()))?;
    Ok(Json(json!({ "token": t.render(), "role": b.role, "name": b.name, "enroll_at": app.cfg.enroll_listen.map(|a| a.to_string()) })))
}

async fn plans(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    let v: Vec<Value> = app.db.plans().await?.into_iter().map(|(name, body)| json!({ "name": name, "plan": body })).collect();
    Ok(Json(json!(v)))
}

async fn put_plan(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(p): Json<crate::plans::Plan>,
) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Operator, true, None).await?;
    check_group_name(&name)?;
    p.check().map_err(|e| bad(e.to_string()))?;
    app.db.put_plan(&name, &serde_json::to_value(&p).map_err(anyhow::Error::from)?).await?;
    Ok(Json(json!({ "name": name, "plan": p })))
}

async fn delete_plan(State(app): State<Arc<App>>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    need(&app, &headers, Level::Operator, true, None).await?;
    if !app.db.delete_plan(&name).await? {
        return Err(not_found(format!("no plan {name}")));
    }
    Ok(Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
pub struct RunBody {
    /// "test-failover" or "failover".
    pub kind: String,
    /// "latest", "latest-app" or an RFC 3339 time.
    #[serde(default)]
    pub point: Option<String>,
}

async fn run_plan(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<RunBody>,
) -> ApiResult<Json<db::PlanRun>> {
    let c = need(&app, &headers, Level::Operator, true, None).await?;
    Ok(Json(crate::plans::start(&app, &name, &b, &c.user.name).await?))
}

async fn runs(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Json<Vec<db::PlanRun>>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.runs(200).await?))
}

async fn run(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<db::PlanRun>> {
    need(&app, &headers, Level::Viewer, false, None).await?;
    Ok(Json(app.db.run(&id).await?.ok_or_else(|| not_found(format!("no run {id}")))?))
}

/// `cleanup` (end a test failover), `commit` or `cancel` (a failover).
async fn run_action(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<db::PlanRun>> {
    let c = need(&app, &headers, Level::Operator, true, None).await?;
    Ok(Json(crate::plans::act(&app, &id, &action, &c.user.name).await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("openapi.json parses");
        let paths = doc["paths"].as_object().expect("paths");
        let src = include_str!("api.rs");
        let mut n = 0;
        for line in src.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix(".route(\"") {
                let path = &rest[..rest.find('"').unwrap()];
                if path == "/api/openapi.json" || !path.starts_with("/api/") && path != "/metrics" && path != "/healthz" {
                    continue;
                }
                assert!(paths.contains_key(path), "{path} is served but not in openapi.json");
                n += 1;
            }
        }
        assert!(n > 25, "found {n} routes");
    }
}
