//! The configuration server's storage: one [`Db`] over SQLite or PostgreSQL.
//!
//! Both engines run the same SQL (the subset both speak: `$N` parameters,
//! TEXT and BIGINT (no floats: see `heartbeat`), `ON CONFLICT`, partial unique indexes);
//! what differs (pragmas, the migration lock) is confined to [`Db::open`].
//! Several instances may share one PostgreSQL database: every decision that
//! must be taken once (raising an alert, claiming a delivery or a plan run)
//! is one conditional statement, so exactly one instance wins it.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::report::{DiskReport, RoleReport};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use ferry_common::control::{Job, JobReport, Policy};

/// A job not taken this long after it was made is never handed out: its
/// run waits at most this long for it (plans.rs).
pub const JOB_MAX_AGE_MS: i64 = 600_000;

/// The migrations, in order; the version is the position (1-based).
const MIGRATIONS: &[&str] = &[include_str!("../migrations/0001_init.sql"), include_str!("../migrations/0002_job_ack.sql")];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    pub engine: Engine,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random id: 16 bytes as hex.
pub fn new_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub role: String,
    #[serde(skip)]
    pub pw_hash: String,
}

#[derive(Clone, Debug)]
pub struct Session {
    pub user: User,
    pub csrf: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub policy: Policy,
    pub version: i64,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub role: String,
    pub name: String,
    pub version: String,
    pub group: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub report: RoleReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskRow {
    pub disk: String,
    pub role: String,
    pub machine: String,
    pub seen_ms: i64,
    pub report: DiskReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: i64,
    pub lag_ms: Option<i64>,
    pub rpo_ms: Option<i64>,
    pub churn_bps: Option<f64>,
    pub sent_bps: Option<f64>,
    pub last_point_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub state: String,
    pub message: String,
    pub raised_ms: i64,
    pub updated_ms: i64,
    pub cleared_ms: Option<i64>,
    pub acked_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    #[serde(skip_serializing)]
    pub secret: String,
    pub created_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    pub body: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub sent_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanRun {
    pub id: String,
    pub plan: String,
    pub kind: String,
    pub state: String,
    pub log: String,
    pub started_ms: i64,
    pub updated_ms: i64,
}

fn user_of(r: &AnyRow) -> Result<User> {
    Ok(User { name: r.try_get("name")?, role: r.try_get("role")?, pw_hash: r.try_get("pw_hash")? })
}

fn delivery_of(r: &AnyRow) -> Result<Delivery> {
    Ok(Delivery {
        id: r.try_get("id")?,
        webhook_id: r.try_get("webhook_id")?,
        body: r.try_get("body")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        created_ms: r.try_get("created_ms")?,
        sent_ms: r.try_get("sent_ms")?,
    })
}

fn alert_of(r: &AnyRow) -> Result<Alert> {
    Ok(Alert {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        subject: r.try_get("subject")?,
        state: r.try_get("state")?,
        message: r.try_get("message")?,
        raised_ms: r.try_get("raised_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        cleared_ms: r.try_get("cleared_ms")?,
        acked_by: r.try_get("acked_by")?,
    })
}

fn job_of(r: &AnyRow) -> Result<Job> {
    let args: String = r.try_get("args")?;
    Ok(Job {
        id: r.try_get("id")?,
        role: r.try_get("role")?,
        machine: r.try_get("machine")?,
        kind: r.try_get("kind")?,
        args: serde_json::from_str(&args).unwrap_or(serde_json::Value::Null),
        state: r.try_get("state")?,
        result: r.try_get("result")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        acked_ms: r.try_get("acked_ms")?,
    })
}

fn run_of(r: &AnyRow) -> Result<PlanRun> {
    Ok(PlanRun {
        id: r.try_get("id")?,
        plan: r.try_get("plan")?,
        kind: r.try_get("kind")?,
        state: r.try_get("state")?,
        log: r.try_get("log")?,
        started_ms: r.try_get("started_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

/// The alert event a webhook receives (the body is signed; docs/config-server.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AlertEvent {
    /// The delivery's id: a receiver that saw it already drops it.
    pub delivery: String,
    /// "raised" or "cleared".
    pub event: String,
    pub alert: Alert,
}

impl Db {
    /// Connect to `url` (`sqlite:PATH` or `postgres://…`) and bring the
    /// schema up to date.
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let (engine, url) = if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() {
                bail!("--db sqlite:PATH needs a file path");
            }
            (Engine::Sqlite, format!("sqlite://{path}?mode=rwc"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Engine::Postgres, url.to_string())
        } else {
            bail!("--db {:?}: expected sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DB", redact(url));
        };
        let mut opts = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        opts = match engine {
            Engine::Sqlite => opts.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            }),
            Engine::Postgres => opts.max_connections(16),
        };
        let pool = opts.connect(&url).await.with_context(|| format!("connecting to the database {}", redact(&url)))?;
        let db = Db { pool, engine };
        if engine == Engine::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL").execute(&db.pool).await?;
        }
        db.migrate().await?;
        Ok(db)
    }

    /// Apply the migrations this database lacks, each in one transaction,
    /// under a lock so that instances starting together apply each once.
    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        match self.engine {
            // A write lock for the whole transaction.
            Engine::Sqlite => {
                sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
                    .execute(&mut *tx)
                    .await?;
            }
            Engine::Postgres => {
                sqlx::query("SELECT pg_advisory_xact_lock(7740001)").execute(&mut *tx).await?;
                sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let have: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations").fetch_one(&mut *tx).await?.try_get("v")?;
        let have = have.unwrap_or(0);
        if have > MIGRATIONS.len() as i64 {
            bail!("the database's schema is version {have}, newer than this ferry knows ({}); run the newer ferry", MIGRATIONS.len());
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
            for stmt in statements(sql) {
                sqlx::query(&stmt).execute(&mut *tx).await.with_context(|| format!("migration {}: {stmt}", i + 1))?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
                .bind(i as i64 + 1)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            log::info!("database schema migrated to version {}", i + 1);
        }
        tx.commit().await?;
        Ok(())
    }

    /// The schema version in use.
    pub async fn schema_version(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_migrations").fetch_one(&self.pool).await?.try_get("v")?;
        Ok(v.unwrap_or(0))
    }

    // ---- users, sessions, tokens ----

    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM users").fetch_one(&self.pool).await?.try_get("n")?)
    }

    pub async fn create_user(&self, name: &str, role: &str, pw_hash: &str) -> Result<bool> {
        let r = sqlx::query("INSERT INTO users (name, role, pw_hash, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(name)
            .bind(role)
            .bind(pw_hash)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn user(&self, name: &str) -> Result<Option<User>> {
        let r = sqlx::query("SELECT name, role, pw_hash FROM users WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        r.as_ref().map(user_of).transpose()
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query("SELECT name, role, pw_hash FROM users ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter().map(user_of).collect()
    }

    pub async fn delete_user(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM sessions WHERE user_name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM api_tokens WHERE user_name = $1").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn create_session(&self, id_hash: &str, user: &str, csrf: &str, expires_ms: i64) -> Result<()> {
        sqlx::query("INSERT INTO sessions (id_hash, user_name, csrf, expires_ms) VALUES ($1, $2, $3, $4)")
            .bind(id_hash)
            .bind(user)
            .bind(csrf)
            .bind(expires_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn session(&self, id_hash: &str) -> Result<Option<Session>> {
        let r = sqlx::query(
            "SELECT u.name AS name, u.role AS role, u.pw_hash AS pw_hash, s.csrf AS csrf FROM sessions s \
             JOIN users u ON u.name = s.user_name WHERE s.id_hash = $1 AND s.expires_ms > $2",
        )
        .bind(id_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| Ok(Session { user: user_of(&r)?, csrf: r.try_get("csrf")? })).transpose()
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1 OR expires_ms < $2").bind(id_hash).bind(now_ms()).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn create_token(&self, id: &str, hash: &str, user: &str, label: &str) -> Result<()> {
        sqlx::query("INSERT INTO api_tokens (id, hash, user_name, label, created_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(hash)
            .bind(user)
            .bind(label)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn token_user(&self, hash: &str) -> Result<Option<User>> {
        let r = sqlx::query(
            "SELECT u.name AS name, u.role AS role, u.pw_hash AS pw_hash FROM api_tokens t JOIN users u ON u.name = t.user_name WHERE t.hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(user_of).transpose()
    }

    // ---- heartbeats and inventory ----

    /// Record a role's heartbeat: its machine row, each disk's report, and
    /// for an agent one chart sample per disk (rates from the counters'
    /// change since its previous report).
    pub async fn heartbeat(&self, r: &RoleReport, now: i64) -> Result<()> {
        // The jobs (and their outcomes) are the jobs table's, not the report's.
        let body = serde_json::to_string(&RoleReport { jobs: None, ..r.clone() })?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO machines (role, name, version, group_name, first_seen_ms, last_seen_ms, report) VALUES ($1, $2, $3, NULL, $4, $4, $5) \
             ON CONFLICT (role, name) DO UPDATE SET version = excluded.version, last_seen_ms = excluded.last_seen_ms, report = excluded.report",
        )
        .bind(&r.role)
        .bind(&r.name)
        .bind(&r.version)
        .bind(now)
        .bind(&body)
        .execute(&mut *tx)
        .await?;
        for d in &r.disks {
            let prev = if r.role == "agent" {
                sqlx::query("SELECT seen_ms, report FROM disk_reports WHERE disk = $1 AND role = $2 AND machine = $3")
                    .bind(&d.name)
                    .bind(&r.role)
                    .bind(&r.name)
                    .fetch_optional(&mut *tx)
                    .await?
            } else {
                None
            };
            sqlx::query(
                "INSERT INTO disk_reports (disk, role, machine, seen_ms, report) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (disk, role, machine) DO UPDATE SET seen_ms = excluded.seen_ms, report = excluded.report",
            )
            .bind(&d.name)
            .bind(&r.role)
            .bind(&r.name)
            .bind(now)
            .bind(serde_json::to_string(d)?)
            .execute(&mut *tx)
            .await?;
            if r.role != "agent" {
                continue;
            }
            let (mut churn, mut sent) = (None, None);
            if let Some(p) = prev {
                let seen: i64 = p.try_get("seen_ms")?;
                let old: String = p.try_get("report")?;
                if let Ok(old) = serde_json::from_str::<DiskReport>(&old) {
                    let dt = (now - seen) as f64 / 1000.0;
                    // A counter that went down is a restart: no rate for this interval.
                    if dt > 0.0 && d.churn_bytes_total >= old.churn_bytes_total && d.sent_bytes_total >= old.sent_bytes_total {
                        churn = Some((d.churn_bytes_total - old.churn_bytes_total) as f64 / dt);
                        sent = Some((d.sent_bytes_total - old.sent_bytes_total) as f64 / dt);
                    }
                }
            }
            let rpo = d.last_point_unix_ms.map(|p| (now - p).max(0));
            sqlx::query(
                "INSERT INTO samples (disk, at_ms, lag_ms, rpo_ms, churn_bps, sent_bps, last_point_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (disk, at_ms) DO NOTHING",
            )
            .bind(&d.name)
            .bind(now)
            .bind(d.lag_ms.map(|v| v as i64))
            .bind(rpo)
            // Integers: sqlx 0.8's Any driver binds a NULL f64 as float4 on
            // PostgreSQL and caches that type, so a later value fails.
            .bind(churn.map(|v: f64| v.round() as i64))
            .bind(sent.map(|v: f64| v.round() as i64))
            .bind(d.last_point_unix_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn machines(&self) -> Result<Vec<Machine>> {
        let rows =
            sqlx::query("SELECT role, name, version, group_name, first_seen_ms, last_seen_ms, report FROM machines ORDER BY role, name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let report: String = r.try_get("report")?;
                Ok(Machine {
                    role: r.try_get("role")?,
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    group: r.try_get("group_name")?,
                    first_seen_ms: r.try_get("first_seen_ms")?,
                    last_seen_ms: r.try_get("last_seen_ms")?,
                    report: serde_json::from_str(&report).unwrap_or_default(),
                })
            })
            .collect()
    }

    pub async fn machine(&self, role: &str, name: &str) -> Result<Option<Machine>> {
        Ok(self.machines().await?.into_iter().find(|m| m.role == role && m.name == name))
    }

    /// A machine's protection group and that group's policy (one row each).
    pub async fn group_of(&self, role: &str, name: &str) -> Result<Option<Group>> {
        let r = sqlx::query("SELECT group_name FROM machines WHERE role = $1 AND name = $2")
            .bind(role)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        let g: Option<String> = match r {
            Some(r) => r.try_get("group_name")?,
            None => None,
        };
        let Some(g) = g else { return Ok(None) };
        let r =
            sqlx::query("SELECT name, policy, version, updated_ms FROM groups WHERE name = $1").bind(&g).fetch_optional(&self.pool).await?;
        r.map(|r| {
            let p: String = r.try_get("policy")?;
            Ok(Group {
                name: r.try_get("name")?,
                policy: serde_json::from_str(&p).unwrap_or_default(),
                version: r.try_get("version")?,
                updated_ms: r.try_get("updated_ms")?,
            })
        })
        .transpose()
    }

    pub async fn disk_rows(&self) -> Result<Vec<DiskRow>> {
        let rows = sqlx::query("SELECT disk, role, machine, seen_ms, report FROM disk_reports ORDER BY disk, role, machine")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let report: String = r.try_get("report")?;
                Ok(DiskRow {
                    disk: r.try_get("disk")?,
                    role: r.try_get("role")?,
                    machine: r.try_get("machine")?,
                    seen_ms: r.try_get("seen_ms")?,
                    report: serde_json::from_str(&report).unwrap_or_default(),
                })
            })
            .collect()
    }

    pub async fn samples(&self, disk: &str, since_ms: i64) -> Result<Vec<Sample>> {
        let rows = sqlx::query(
            "SELECT at_ms, lag_ms, rpo_ms, churn_bps, sent_bps, last_point_ms FROM samples WHERE disk = $1 AND at_ms >= $2 ORDER BY at_ms",
        )
        .bind(disk)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Sample {
                    at_ms: r.try_get("at_ms")?,
                    lag_ms: r.try_get("lag_ms")?,
                    rpo_ms: r.try_get("rpo_ms")?,
                    churn_bps: r.try_get::<Option<i64>, _>("churn_bps")?.map(|v| v as f64),
                    sent_bps: r.try_get::<Option<i64>, _>("sent_bps")?.map(|v| v as f64),
                    last_point_ms: r.try_get("last_point_ms")?,
                })
            })
            .collect()
    }

    /// Drop chart samples older than `before_ms`.
    pub async fn prune_samples(&self, before_ms: i64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM samples WHERE at_ms < $1").bind(before_ms).execute(&self.pool).await?.rows_affected())
    }

    // ---- groups and policies ----

    pub async fn groups(&self) -> Result<Vec<Group>> {
        let rows = sqlx::query("SELECT name, policy, version, updated_ms FROM groups ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let p: String = r.try_get("policy")?;
                Ok(Group {
                    name: r.try_get("name")?,
                    policy: serde_json::from_str(&p).unwrap_or_default(),
                    version: r.try_get("version")?,
                    updated_ms: r.try_get("updated_ms")?,
                })
            })
            .collect()
    }

    pub async fn group(&self, name: &str) -> Result<Option<Group>> {
        Ok(self.groups().await?.into_iter().find(|g| g.name == name))
    }

    /// Create or change a group's policy; its version goes up by one.
    pub async fn put_group(&self, name: &str, p: &Policy) -> Result<Group> {
        p.check().map_err(|e| anyhow!(e))?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO groups (name, policy, version, updated_ms) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (name) DO UPDATE SET policy = excluded.policy, version = groups.version + 1, updated_ms = excluded.updated_ms",
        )
        .bind(name)
        .bind(serde_json::to_string(p)?)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.group(name).await?.ok_or_else(|| anyhow!("group {name} vanished"))
    }

    pub async fn delete_group(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE machines SET group_name = NULL WHERE group_name = $1").bind(name).execute(&mut *tx).await?;
        let r = sqlx::query("DELETE FROM groups WHERE name = $1").bind(name).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Put a registered machine into a group (None: out of every group).
    pub async fn set_machine_group(&self, role: &str, name: &str, group: Option<&str>) -> Result<bool> {
        let r = sqlx::query("UPDATE machines SET group_name = $1 WHERE role = $2 AND name = $3")
            .bind(group)
            .bind(role)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- alerts and their deliveries ----

    /// Raise an alert unless one of this kind and subject is open; the
    /// instance whose insert wins queues its deliveries, in the same
    /// transaction. Returns the new alert.
    pub async fn raise(&self, kind: &str, subject: &str, message: &str) -> Result<Option<Alert>> {
        let now = now_ms();
        let a = Alert {
            id: new_id(),
            kind: kind.into(),
            subject: subject.into(),
            state: "raised".into(),
            message: message.into(),
            raised_ms: now,
            updated_ms: now,
            cleared_ms: None,
            acked_by: None,
        };
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "INSERT INTO alerts (id, kind, subject, state, message, raised_ms, updated_ms) VALUES ($1, $2, $3, 'raised', $4, $5, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&a.id)
        .bind(kind)
        .bind(subject)
        .bind(message)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        queue_event(&mut tx, "raised", &a, now).await?;
        tx.commit().await?;
        Ok(Some(a))
    }

    /// Clear the open alert of this kind and subject, if any.
    pub async fn clear(&self, kind: &str, subject: &str, message: &str) -> Result<Option<Alert>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT * FROM alerts WHERE kind = $1 AND subject = $2 AND state <> 'cleared'")
            .bind(kind)
            .bind(subject)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let mut a = alert_of(&row)?;
        let r = sqlx::query(
            "UPDATE alerts SET state = 'cleared', cleared_ms = $1, updated_ms = $1, message = $2 WHERE id = $3 AND state <> 'cleared'",
        )
        .bind(now)
        .bind(message)
        .bind(&a.id)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        a.state = "cleared".into();
        a.cleared_ms = Some(now);
        a.updated_ms = now;
        a.message = message.into();
        queue_event(&mut tx, "cleared", &a, now).await?;
        tx.commit().await?;
        Ok(Some(a))
    }

    pub async fn ack(&self, id: &str, user: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE alerts SET state = 'acknowledged', acked_by = $1, updated_ms = $2 WHERE id = $3 AND state = 'raised'")
            .bind(user)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Alerts, open ones first, newest first; `open` leaves the cleared out.
    pub async fn alerts(&self, open: bool, limit: i64) -> Result<Vec<Alert>> {
        let sql = if open {
            "SELECT * FROM alerts WHERE state <> 'cleared' ORDER BY raised_ms DESC LIMIT $1"
        } else {
            "SELECT * FROM alerts ORDER BY updated_ms DESC LIMIT $1"
        };
        let rows = sqlx::query(sql).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(alert_of).collect()
    }

    pub async fn add_webhook(&self, url: &str, secret: &str) -> Result<Webhook> {
        let w = Webhook { id: new_id(), url: url.into(), secret: secret.into(), created_ms: now_ms() };
        sqlx::query("INSERT INTO webhooks (id, url, secret, created_ms) VALUES ($1, $2, $3, $4)")
            .bind(&w.id)
            .bind(&w.url)
            .bind(&w.secret)
            .bind(w.created_ms)
            .execute(&self.pool)
            .await?;
        Ok(w)
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>> {
        let rows = sqlx::query("SELECT id, url, secret, created_ms FROM webhooks ORDER BY created_ms").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(Webhook {
                    id: r.try_get("id")?,
                    url: r.try_get("url")?,
                    secret: r.try_get("secret")?,
                    created_ms: r.try_get("created_ms")?,
                })
            })
            .collect()
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM webhooks WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Claim one due delivery for `lease_ms`: the conditional update lets
    /// exactly one instance have it; another takes it over only once the
    /// lease ran out (its holder died before recording the outcome).
    pub async fn claim_delivery(&self, instance: &str, lease_ms: i64) -> Result<Option<(Delivery, Webhook)>> {
        let now = now_ms();
        let cand = sqlx::query(
            "SELECT id FROM deliveries WHERE state = 'pending' AND next_ms <= $1 AND claimed_until_ms < $1 ORDER BY next_ms LIMIT 1",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(cand) = cand else { return Ok(None) };
        let id: String = cand.try_get("id")?;
        let r = sqlx::query(
            "UPDATE deliveries SET claimed_by = $1, claimed_until_ms = $2, attempts = attempts + 1 \
             WHERE id = $3 AND state = 'pending' AND claimed_until_ms < $4",
        )
        .bind(instance)
        .bind(now + lease_ms)
        .bind(&id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT d.id AS id, d.webhook_id AS webhook_id, d.body AS body, d.state AS state, d.attempts AS attempts, d.last_error AS last_error, \
             d.created_ms AS created_ms, d.sent_ms AS sent_ms, w.url AS url, w.secret AS secret, w.created_ms AS wcreated \
             FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE d.id = $1",
        )
        .bind(&id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            // Its webhook was deleted: nothing to send it to.
            sqlx::query("UPDATE deliveries SET state = 'failed', last_error = 'webhook deleted' WHERE id = $1")
                .bind(&id)
                .execute(&self.pool)
                .await?;
            return Ok(None);
        };
        Ok(Some((
            delivery_of(&r)?,
            Webhook {
                id: r.try_get("webhook_id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                created_ms: r.try_get("wcreated")?,
            },
        )))
    }

    /// Record a delivery's outcome: sent, or due again at `retry_at_ms`
    /// (None: given up).
    pub async fn delivered(&self, id: &str, instance: &str, error: Option<&str>, retry_at_ms: Option<i64>) -> Result<()> {
        let now = now_ms();
        match (error, retry_at_ms) {
            (None, _) => {
                sqlx::query("UPDATE deliveries SET state = 'sent', sent_ms = $1, last_error = NULL WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
            (Some(e), Some(at)) => {
                sqlx::query("UPDATE deliveries SET next_ms = $1, claimed_until_ms = 0, last_error = $2 WHERE id = $3 AND claimed_by = $4")
                    .bind(at)
                    .bind(e)
                    .bind(id)
                    .bind(instance)
                    .execute(&self.pool)
                    .await?
            }
            (Some(e), None) => {
                sqlx::query("UPDATE deliveries SET state = 'failed', last_error = $1 WHERE id = $2")
                    .bind(e)
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(())
    }

    pub async fn deliveries(&self, limit: i64) -> Result<Vec<Delivery>> {
        let rows = sqlx::query("SELECT * FROM deliveries ORDER BY created_ms DESC LIMIT $1").bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(delivery_of).collect()
    }

    // ---- jobs for roles ----

    pub async fn add_job(&self, role: &str, machine: &str, kind: &str, args: &serde_json::Value) -> Result<Job> {
        let now = now_ms();
        let id = new_id();
        sqlx::query(
            "INSERT INTO jobs (id, role, machine, kind, args, state, created_ms, updated_ms, run_id) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $6, $7)",
        )
        .bind(&id)
        .bind(role)
        .bind(machine)
        .bind(kind)
        .bind(args.to_string())
        .bind(now)
        .bind(args.get("run").and_then(|v| v.as_str()).unwrap_or("").to_string())
        .execute(&self.pool)
        .await?;
        self.job(&id).await?.ok_or_else(|| anyhow!("job {id} vanished"))
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let r = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        r.as_ref().map(job_of).transpose()
    }

    /// The jobs for a machine: those queued, now marked running, and those
    /// handed out at least `again_ms` ago that no heartbeat has listed since
    /// (the answer that carried them was lost). The role runs a job once
    /// however often it gets it. One instance hands out each time.
    /// `again_ms` None: the role does not acknowledge jobs (an older one);
    /// only queued jobs.
    /// A job older than [`JOB_MAX_AGE_MS`] is never handed out (and
    /// [`Db::expire_old_jobs`] marks it failed).
    pub async fn take_jobs(&self, role: &str, machine: &str, now: i64, again_ms: Option<i64>) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE role = $1 AND machine = $2 AND created_ms >= $4 \
             AND (state = 'queued' OR (state = 'running' AND acked_ms IS NULL AND updated_ms <= $3)) ORDER BY created_ms",
        )
        .bind(role)
        .bind(machine)
        .bind(again_ms.map(|a| now - a).unwrap_or(i64::MIN))
        .bind(now - JOB_MAX_AGE_MS)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let mut j = job_of(r)?;
            let u = sqlx::query(
                "UPDATE jobs SET state = 'running', updated_ms = $1 WHERE id = $2 AND state = $3 AND updated_ms = $4 AND acked_ms IS NULL",
            )
            .bind(now)
            .bind(&j.id)
            .bind(&j.state)
            .bind(j.updated_ms)
            .execute(&self.pool)
            .await?;
            if u.rows_affected() == 1 {
                if j.state == "running" {
                    log::warn!("job {} ({}) handed out again to {role} {machine}: it never said it had it", j.id, j.kind);
                }
                j.state = "running".into();
                j.updated_ms = now;
                out.push(j);
            }
        }
        Ok(out)
    }

    /// What a role's heartbeat says of the jobs it holds: a running one is
    /// acknowledged, a finished one's outcome recorded (when not yet).
    pub async fn job_reports(&self, role: &str, machine: &str, reports: &[JobReport], now: i64) -> Result<()> {
        for j in reports.iter().filter(|j| !j.id.is_empty() && j.id.len() <= 64) {
            match j.state.as_str() {
                "running" => {
                    sqlx::query(
                        "UPDATE jobs SET acked_ms = $1 WHERE id = $2 AND role = $3 AND machine = $4 AND state = 'running' AND acked_ms IS NULL",
                    )
                    .bind(now)
                    .bind(&j.id)
                    .bind(role)
                    .bind(machine)
                    .execute(&self.pool)
                    .await?;
                }
                "done" | "failed" => {
                    let result = ferry_common::control::truncate_utf8(j.result.as_deref().unwrap_or(""), 64 << 10);
                    let recorded = self.finish_job(&j.id, role, machine, j.state == "done", result).await?;
                    if recorded {
                        log::info!("job {}: its outcome came with a heartbeat", j.id);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every job older than [`JOB_MAX_AGE_MS`] that no role acknowledged:
    /// failed ("expired"). Run every few seconds (plans::resume_loop), not
    /// on the heartbeat's path.
    pub async fn expire_old_jobs(&self, now: i64) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', result = $1, updated_ms = $2 \
             WHERE acked_ms IS NULL AND state IN ('queued', 'running') AND created_ms < $3",
        )
        .bind(format!("expired: not taken within {} s", JOB_MAX_AGE_MS / 1000))
        .bind(now)
        .bind(now - JOB_MAX_AGE_MS)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// The jobs of a run that no role acknowledged: failed (`why`), so that
    /// none is handed out after the run ended, was interrupted or moved on.
    /// The number expired.
    pub async fn expire_run_jobs(&self, run: &str, why: &str) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', result = $1, updated_ms = $2 \
             WHERE run_id = $3 AND acked_ms IS NULL AND state IN ('queued', 'running')",
        )
        .bind(why)
        .bind(now_ms())
        .bind(run)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// A role's outcome of a job it ran (only the machine it was given to).
    pub async fn finish_job(&self, id: &str, role: &str, machine: &str, ok: bool, result: &str) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE jobs SET state = $1, result = $2, updated_ms = $3, acked_ms = COALESCE(acked_ms, $3) \
             WHERE id = $4 AND role = $5 AND machine = $6 AND state = 'running'",
        )
        .bind(if ok { "done" } else { "failed" })
        .bind(result)
        .bind(now)
        .bind(id)
        .bind(role)
        .bind(machine)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn jobs(&self, limit: i64) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT * FROM jobs ORDER BY created_ms DESC LIMIT $1").bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(job_of).collect()
    }

    // ---- recovery plans ----

    pub async fn put_plan(&self, name: &str, body: &serde_json::Value) -> Result<()> {
        sqlx::query("INSERT INTO plans (name, body, updated_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET body = excluded.body, updated_ms = excluded.updated_ms")
            .bind(name)
            .bind(body.to_string())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn plans(&self) -> Result<Vec<(String, serde_json::Value)>> {
        let rows = sqlx::query("SELECT name, body FROM plans ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let b: String = r.try_get("body")?;
                Ok((r.try_get("name")?, serde_json::from_str(&b).unwrap_or(serde_json::Value::Null)))
            })
            .collect()
    }

    pub async fn delete_plan(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM plans WHERE name = $1").bind(name).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// A new run of `plan`, or None when the plan has a live run (a unique index).
    pub async fn start_run(&self, plan: &str, kind: &str, instance: &str, lease_ms: i64) -> Result<Option<PlanRun>> {
        let now = now_ms();
        let id = new_id();
        let r = sqlx::query(
            "INSERT INTO plan_runs (id, plan, kind, state, log, started_ms, updated_ms, owner, owner_until_ms) VALUES ($1, $2, $3, 'running', '', $4, $4, $5, $6) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(plan)
        .bind(kind)
        .bind(now)
        .bind(instance)
        .bind(now + lease_ms)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(None);
        }
        self.run(&id).await
    }

    /// Take a run over to act on it (cleanup, commit, cancel): from one of
    /// `from` to running, driven by `instance`; false if it is in none.
    pub async fn take_run(&self, id: &str, instance: &str, from: &[&str], line: &str, lease_until: i64) -> Result<bool> {
        let now = now_ms();
        let states: Vec<String> = from.iter().map(|s| format!("'{}'", s.replace('\'', ""))).collect();
        let sql = format!(
            "UPDATE plan_runs SET state = 'running', owner = $1, owner_until_ms = $2, updated_ms = $3, log = log || $4 WHERE id = $5 AND state IN ({})",
            states.join(", ")
        );
        let r = sqlx::query(&sql)
            .bind(instance)
            .bind(lease_until)
            .bind(now)
            .bind(format!("{} {line}\n", stamp(now)))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn run(&self, id: &str) -> Result<Option<PlanRun>> {
        let r = sqlx::query("SELECT * FROM plan_runs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        r.as_ref().map(run_of).transpose()
    }

    pub async fn runs(&self, limit: i64) -> Result<Vec<PlanRun>> {
        let rows = sqlx::query("SELECT * FROM plan_runs ORDER BY started_ms DESC LIMIT $1").bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(run_of).collect()
    }

    /// Append a line to a run's log (and set its state), renewing the lease.
    /// Append to a run this instance drives (and set its state), renewing
    /// its lease; an error once the run is no longer this instance's to
    /// drive (another marked it interrupted or took it over).
    pub async fn run_log(&self, id: &str, instance: &str, line: &str, state: Option<&str>, lease_until: i64) -> Result<()> {
        let now = now_ms();
        let stamped = if line.is_empty() { String::new() } else { format!("{} {line}\n", stamp(now)) };
        let r = sqlx::query(
            "UPDATE plan_runs SET log = log || $1, state = COALESCE($2, state), updated_ms = $3, owner_until_ms = $4 \
             WHERE id = $5 AND owner = $6 AND state = 'running'",
        )
        .bind(stamped)
        .bind(state)
        .bind(now)
        .bind(lease_until)
        .bind(id)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            bail!("run {id} is no longer driven by this instance");
        }
        Ok(())
    }

    /// Mark a run whose driver's lease ran out as interrupted (once).
    pub async fn interrupt_run(&self, id: &str, now: i64) -> Result<bool> {
        let line = format!("{} interrupted: the configuration server instance driving it stopped; clean it up or cancel it\n", stamp(now));
        let r = sqlx::query(
            "UPDATE plan_runs SET state = 'interrupted', log = log || $1, updated_ms = $2 WHERE id = $3 AND state = 'running' AND owner_until_ms < $2",
        )
        .bind(line)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 1 {
            self.expire_run_jobs(id, "expired: its run was interrupted").await?;
        }
        Ok(r.rows_affected() == 1)
    }

    /// A check that the database answers (for /healthz).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1 AS one").fetch_one(&self.pool).await?;
        Ok(())
    }
}

async fn queue_event(tx: &mut sqlx::Transaction<'_, sqlx::Any>, event: &str, a: &Alert, now: i64) -> Result<()> {
    let hooks = sqlx::query("SELECT id FROM webhooks").fetch_all(&mut **tx).await?;
    for h in hooks {
        let hid: String = h.try_get("id")?;
        let id = new_id();
        let body = serde_json::to_string(&AlertEvent { delivery: id.clone(), event: event.into(), alert: a.clone() })?;
        sqlx::query(
            "INSERT INTO deliveries (id, webhook_id, body, state, attempts, next_ms, claimed_until_ms, created_ms) VALUES ($1, $2, $3, 'pending', 0, $4, 0, $4)",
        )
        .bind(&id)
        .bind(&hid)
        .bind(body)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A log line's time: RFC 3339, UTC, milliseconds.
pub fn stamp(ms: i64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// A migration file's statements (split at `;` ending a line; comments dropped).
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let line = match line.find("--") {
            Some(i) => &line[..i],
            None => line,
        };
        cur.push_str(line);
        cur.push('\n');
        if line.trim_end().ends_with(';') {
            let s = cur.trim().trim_end_matches(';').trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// A database URL with its password hidden (for messages).
pub fn redact(url: &str) -> String {
    // The last '@' before the path: a password may hold a raw '@'.
    let host_at = url.find("://").and_then(|s| {
        let rest = &url[s + 3..];
        let end = rest.find('/').unwrap_or(rest.len());
        rest[..end].rfind('@').map(|a| s + 3 + a)
    });
    match (url.find("://"), host_at) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_splits_into_statements() {
        let s = statements(MIGRATIONS[0]);
        assert!(s.len() > 10);
        assert!(s.iter().all(|x| !x.contains("--")));
    }

    /// A job whose answer was lost (no heartbeat lists it) is handed out
    /// again after `again_ms`, and only then; one a heartbeat acknowledged
    /// never is; an outcome carried by a heartbeat is recorded once.
    #[tokio::test]
    async fn a_job_is_handed_out_again_until_a_heartbeat_acknowledges_it() {
        let dir = std::env::temp_dir().join(format!("ferry-cs-jobs-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&format!("sqlite:{}", dir.join("cs.db").display())).await.unwrap();
        assert_eq!(db.schema_version().await.unwrap(), MIGRATIONS.len() as i64);
        let j = db.add_job("master-target", "mt1", "test-failover", &serde_json::json!({"disk": "d1"})).await.unwrap();
        let k = db.add_job("master-target", "mt1", "test-failover", &serde_json::json!({"disk": "d2"})).await.unwrap();
        let t = now_ms();
        let ids = |v: Vec<Job>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(db.take_jobs("master-target", "mt1", t, Some(15_000)).await.unwrap()), vec![j.id.clone(), k.id.clone()]);
        assert!(db.take_jobs("master-target", "other", t, Some(15_000)).await.unwrap().is_empty(), "another machine's jobs");
        assert!(db.take_jobs("master-target", "mt1", t + 14_000, Some(15_000)).await.unwrap().is_empty(), "handed out again too soon");
        // The next heartbeat lists k only: j's answer was lost.
        let running = |id: &str| JobReport { id: id.into(), state: "running".into(), result: None };
        db.job_reports("master-target", "mt1", &[running(&k.id)], t + 5_000).await.unwrap();
        assert_eq!(ids(db.take_jobs("master-target", "mt1", t + 15_000, Some(15_000)).await.unwrap()), vec![j.id.clone()]);
        assert!(db.take_jobs("master-target", "mt1", t + 20_000, Some(15_000)).await.unwrap().is_empty());
        db.job_reports("master-target", "mt1", &[running(&j.id), running(&k.id)], t + 21_000).await.unwrap();
        assert!(db.take_jobs("master-target", "mt1", t + 90_000, Some(15_000)).await.unwrap().is_empty(), "acknowledged jobs stay put");
        // Outcomes by heartbeat; another machine cannot settle them.
        let done = JobReport { id: k.id.clone(), state: "done".into(), result: Some("exported".into()) };
        db.job_reports("master-target", "mt2", std::slice::from_ref(&done), t + 22_000).await.unwrap();
        assert_eq!(db.job(&k.id).await.unwrap().unwrap().state, "running");
        db.job_reports("master-target", "mt1", std::slice::from_ref(&done), t + 22_000).await.unwrap();
        let got = db.job(&k.id).await.unwrap().unwrap();
        assert_eq!((got.state.as_str(), got.result.as_deref()), ("done", Some("exported")));
        assert!(!db.finish_job(&k.id, "master-target", "mt1", false, "late").await.unwrap(), "an outcome is recorded once");
        assert_eq!(db.job(&k.id).await.unwrap().unwrap().result.as_deref(), Some("exported"));
        // A role that does not acknowledge jobs (an older one) gets a job once.
        let m = db.add_job("master-target", "mt1", "failover", &serde_json::json!({"disk": "d3", "run": "r1"})).await.unwrap();
        assert_eq!(ids(db.take_jobs("master-target", "mt1", t, None).await.unwrap()), vec![m.id.clone()]);
        assert!(db.take_jobs("master-target", "mt1", t + 90_000, None).await.unwrap().is_empty(), "an older role would run it twice");
        // A run that moves on expires its jobs never acknowledged, not the others.
        let n = db.add_job("master-target", "mt1", "failover", &serde_json::json!({"disk": "d4", "run": "r2"})).await.unwrap();
        assert_eq!(ids(db.take_jobs("master-target", "mt1", t, Some(15_000)).await.unwrap()), vec![n.id.clone()]);
        db.job_reports("master-target", "mt1", &[running(&n.id)], t).await.unwrap();
        assert_eq!(db.expire_run_jobs("r1", "expired: its run moved on").await.unwrap(), 1);
        assert_eq!(db.expire_run_jobs("r2", "expired").await.unwrap(), 0, "n was acknowledged");
        assert!(db.take_jobs("master-target", "mt1", t + 90_000, Some(15_000)).await.unwrap().is_empty());
        assert_eq!(db.job(&m.id).await.unwrap().unwrap().state, "failed");
        // A job older than a run waits is never handed out.
        let o = db.add_job("master-target", "mt1", "test-failover", &serde_json::json!({"disk": "d5"})).await.unwrap();
        let late = o.created_ms + JOB_MAX_AGE_MS + 1;
        assert!(db.take_jobs("master-target", "mt1", late, Some(15_000)).await.unwrap().is_empty());
        assert_eq!(db.expire_old_jobs(late).await.unwrap(), 1);
        let o = db.job(&o.id).await.unwrap().unwrap();
        assert!(o.state == "failed" && o.result.as_deref().unwrap_or("").starts_with("expired"), "{o:?}");
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://ferry:s3cret@127.0.0.1:5432/ferry"), "postgres://ferry:***@127.0.0.1:5432/ferry");
        assert_eq!(redact("postgres://ferry:p@ss@db:5432/ferry"), "postgres://ferry:***@db:5432/ferry");
        assert_eq!(redact("sqlite:/var/lib/ferry/cs.db"), "sqlite:/var/lib/ferry/cs.db");
    }
}
