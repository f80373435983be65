//! `ferry config-server` and `ferry ctl`: the management plane's commands.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_control::{Client, Tls};
use serde_json::{json, Value};

use crate::Usage;

/// Serve the configuration server: inventory, policies, alerts, plans, API, website, metrics.
#[derive(Args)]
pub struct ConfigServer {
    /// Address to listen on, HOST:PORT; loopback only without --identity.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7780")]
    listen: String,
    /// The database: sqlite:PATH (one instance) or postgres://USER:PASSWORD@HOST:PORT/DB (several); from the environment keeps a password out of ps.
    #[arg(long, value_name = "URL", env = "FERRY_CS_DB", hide_env_values = true)]
    db: String,
    /// Its identity (role config-server, from `ferry enroll`): HTTPS, and roles' heartbeats checked by their certificates.
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// A CA folder (`ferry ca init`) to host: join tokens from the API and website, enrollments at --enroll-listen.
    #[arg(long, value_name = "DIR", requires = "enroll_listen")]
    ca: Option<PathBuf>,
    /// Where machines enroll (`ferry enroll --server ADDR`), with --ca.
    #[arg(long, value_name = "ADDR", requires = "ca")]
    enroll_listen: Option<String>,
    /// A role silent this long raises "heartbeat lost".
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    heartbeat_timeout: String,
    /// How often roles are asked to report.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    heartbeat_every: String,
    /// With no user yet: make user admin with the password in FILE (else a random one is logged once).
    #[arg(long, value_name = "FILE")]
    admin_password_file: Option<PathBuf>,
    /// Keep chart samples this long.
    #[arg(long, value_name = "DURATION", default_value = "14d")]
    keep_samples: String,
    /// Connections served at once.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_connections: usize,
}

fn duration(opt: &str, s: &str, min: Duration) -> Result<Duration> {
    humantime::parse_duration(s).ok().filter(|d| *d >= min).ok_or_else(|| {
        Usage(format!("--{opt} {s:?}: expected a duration of at least {}, e.g. 30s", humantime::format_duration(min))).into()
    })
}

pub fn config_server(a: ConfigServer) -> Result<()> {
    let listen = match &a.identity {
        Some(_) => ferry_common::net::resolve("listen", &a.listen, true).map_err(Usage::from)?[0],
        None => ferry_common::net::listen_addr("listen", &a.listen).map_err(Usage::from)?,
    };
    let enroll_listen = match &a.enroll_listen {
        Some(e) => Some(ferry_common::net::resolve("enroll-listen", e, true).map_err(Usage::from)?[0]),
        None => None,
    };
    if !(a.db.starts_with("sqlite:") || a.db.starts_with("postgres://") || a.db.starts_with("postgresql://")) {
        return Err(Usage(format!(
            "--db {:?}: expected sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DB",
            ferry_config::db::redact(&a.db)
        ))
        .into());
    }
    let cfg = ferry_config::Config {
        listen,
        db: a.db.clone(),
        identity: a.identity,
        ca: a.ca,
        enroll_listen,
        heartbeat_timeout: duration("heartbeat-timeout", &a.heartbeat_timeout, Duration::from_secs(1))?,
        heartbeat_every: duration("heartbeat-every", &a.heartbeat_every, Duration::from_millis(200))?,
        admin_password_file: a.admin_password_file,
        keep_samples: duration("keep-samples", &a.keep_samples, Duration::from_secs(3600))?,
        max_connections: a.max_connections.max(1),
    };
    ferry_config::run(cfg)
}

/// `--config-server ADDR` of a role: a client with the role's identity (or plain HTTP on loopback).
pub fn role_client(addr: &str, identity: Option<&std::path::Path>) -> Result<Client> {
    let tls = match identity {
        Some(d) => Tls::Identity(d.to_path_buf()),
        None => Tls::None,
    };
    Client::new(addr, &tls).map_err(|e| Usage(e.to_string()).into())
}

/// Talk to the configuration server's API (for scripts; JSON on stdout).
#[derive(Args)]
pub struct Ctl {
    /// The configuration server, HOST:PORT (or FERRY_CONFIG_SERVER).
    #[arg(long, value_name = "ADDR", env = "FERRY_CONFIG_SERVER", default_value = "127.0.0.1:7780")]
    server: String,
    /// HTTPS, checking the server against this CA certificate (the CA's ca.pem).
    #[arg(long, value_name = "PEM", conflicts_with = "identity")]
    ca: Option<PathBuf>,
    /// HTTPS with this machine's identity folder.
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// An API token (or FERRY_TOKEN); `ferry ctl login` prints one.
    #[arg(long, value_name = "TOKEN", env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Log in (password on stdin, or FERRY_PASSWORD) and print a new API token as the last line.
    Login {
        #[arg(long)]
        user: String,
        /// What the token is for (shown in the website).
        #[arg(long, default_value = "ferry ctl")]
        label: String,
    },
    /// Any API request: METHOD PATH [--data JSON]; prints the answer.
    Call {
        method: String,
        /// e.g. /api/v1/disks
        path: String,
        #[arg(long, value_name = "JSON")]
        data: Option<String>,
    },
    /// Every protected disk with its state, RPO and lag.
    Disks {
        #[arg(long)]
        json: bool,
    },
    /// Every role that reported.
    Machines,
    /// Open alerts (--all: also cleared ones).
    Alerts {
        #[arg(long)]
        all: bool,
    },
    /// A disk's recovery points as its master target lists them.
    Points { disk: String },
    /// Create or change a protection group's policy (fields not given keep their defaults).
    Group {
        name: String,
        #[arg(long, value_name = "SECS")]
        rpo: Option<u64>,
        #[arg(long, value_name = "SECS")]
        point_every: Option<f64>,
        #[arg(long, value_name = "SECS")]
        app_point_every: Option<f64>,
        #[arg(long, value_name = "DURATION")]
        retention: Option<String>,
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
        /// The process server the group's agents ship to, HOST:PORT ("" for none).
        #[arg(long, value_name = "ADDR")]
        process_server: Option<String>,
        /// The master target the group's agents ship to (after the process server), HOST:PORT ("" for none).
        #[arg(long, value_name = "ADDR")]
        master_target: Option<String>,
    },
    /// Put a machine (ROLE/NAME) into a group (--none: out of every group).
    Assign {
        #[arg(value_name = "ROLE/NAME")]
        machine: String,
        #[arg(required_unless_present = "none")]
        group: Option<String>,
        #[arg(long)]
        none: bool,
    },
    /// Store a recovery plan from a JSON file ({"steps": [...]}).
    Plan {
        name: String,
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a plan: test-failover or failover, to a point (latest, latest-app or a time).
    Run {
        plan: String,
        #[arg(long, default_value = "test-failover")]
        kind: String,
        #[arg(long, default_value = "latest")]
        point: String,
        /// Wait until the run is ready, failed over, or failed (at most this long).
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// A run: show it, or cleanup (test failover), commit or cancel (failover).
    RunAction {
        id: String,
        /// show, cleanup, commit or cancel
        #[arg(default_value = "show")]
        action: String,
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
    },
    /// Add a user (password on stdin, or FERRY_PASSWORD).
    User {
        name: String,
        #[arg(long, default_value = "viewer")]
        role: String,
    },
    /// Add a webhook that receives every alert event, signed with SECRET.
    Webhook {
        url: String,
        #[arg(long)]
        secret: String,
    },
    /// A one-time join token from the CA the server hosts (printed as the last line).
    JoinToken {
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

fn secret_input(what: &str) -> Result<String> {
    if let Ok(p) = std::env::var("FERRY_PASSWORD") {
        return Ok(p);
    }
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).with_context(|| format!("reading the {what} from stdin"))?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        bail!("no {what}: give it on stdin or in FERRY_PASSWORD");
    }
    Ok(s)
}

fn show(v: &Value) {
    crate::out_line(format_args!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
}

fn wait_run(c: &Client, id: &str, wait: &str, settled: &[&str]) -> Result<Value> {
    let limit = humantime::parse_duration(wait).map_err(|_| Usage(format!("--wait {wait:?}: expected a duration, e.g. 5m")))?;
    let end = std::time::Instant::now() + limit;
    loop {
        let r = c.call("GET", &format!("/api/v1/runs/{id}"), None)?;
        let st = r["state"].as_str().unwrap_or("");
        if settled.contains(&st) || st == "failed" || st == "interrupted" {
            return Ok(r);
        }
        if std::time::Instant::now() > end {
            bail!("run {id} is still {st} after {wait}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn ctl(a: Ctl) -> Result<()> {
    let tls = match (&a.ca, &a.identity) {
        (Some(p), _) => Tls::Ca(p.clone()),
        (None, Some(d)) => Tls::Identity(d.clone()),
        (None, None) => Tls::None,
    };
    let c = Client::new(&a.server, &tls).map_err(|e| Usage(e.to_string()))?.with_token(a.token.clone());
    match a.cmd {
        CtlCmd::Login { user, label } => {
            let pw = secret_input("password")?;
            let s = c.call("POST", "/api/v1/login", Some(&json!({ "user": user, "password": pw })))?;
            let session = s["session"].as_str().unwrap_or_default().to_string();
            let csrf = s["csrf"].as_str().unwrap_or_default().to_string();
            // A token from the session: the session itself is then closed.
            let t = c.clone().with_token(None).call_with_session("POST", "/api/v1/tokens", &session, &csrf, &json!({ "label": label }))?;
            let _ = c.clone().with_token(None).call_with_session("POST", "/api/v1/logout", &session, &csrf, &json!({}));
            crate::out_line(format_args!("{}", t["token"].as_str().unwrap_or_default()));
        }
        CtlCmd::Call { method, path, data } => {
            let body = match data {
                Some(d) => Some(serde_json::from_str::<Value>(&d).map_err(|e| Usage(format!("--data: not JSON: {e}")))?),
                None => None,
            };
            show(&c.call(&method.to_uppercase(), &path, body.as_ref())?);
        }
        CtlCmd::Disks { json } => {
            let v = c.call("GET", "/api/v1/disks", None)?;
            if json {
                show(&v);
            } else {
                crate::out_line(format_args!("{:<24} {:<16} {:<18} {:>9} {:>9}  ALERTS", "DISK", "AGENT", "STATE", "RPO", "LAG"));
                for d in v.as_array().into_iter().flatten() {
                    let secs = |v: &Value| v.as_f64().map(|x| format!("{:.1}s", x / 1000.0)).unwrap_or_else(|| "-".into());
                    crate::out_line(format_args!(
                        "{:<24} {:<16} {:<18} {:>9} {:>9}  {}",
                        d["name"].as_str().unwrap_or(""),
                        d["agent"].as_str().unwrap_or("-"),
                        d["state"].as_str().unwrap_or(""),
                        secs(&d["rpo_ms"]),
                        secs(&d["lag_ms"]),
                        d["alerts"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        CtlCmd::Machines => show(&c.call("GET", "/api/v1/machines", None)?),
        CtlCmd::Alerts { all } => show(&c.call("GET", if all { "/api/v1/alerts?all=true" } else { "/api/v1/alerts" }, None)?),
        CtlCmd::Points { disk } => show(&c.call("GET", &format!("/api/v1/disks/{disk}/points"), None)?),
        CtlCmd::Group { name, rpo, point_every, app_point_every, retention, bandwidth, process_server, master_target } => {
            let mut p = ferry_common::control::Policy::default();
            if let Some(g) =
                c.call("GET", "/api/v1/groups", None)?.as_array().and_then(|a| a.iter().find(|g| g["name"] == name.as_str()).cloned())
            {
                p = serde_json::from_value(g["policy"].clone()).unwrap_or_default();
            }
            if let Some(v) = rpo {
                p.rpo_threshold_s = v;
            }
            if let Some(v) = point_every {
                p.point_every_s = v;
            }
            if let Some(v) = app_point_every {
                p.app_point_every_s = v;
            }
            if let Some(v) = retention {
                p.retention = v;
            }
            if let Some(v) = bandwidth {
                p.bandwidth = v;
            }
            if let Some(v) = process_server {
                p.process_server = v;
            }
            if let Some(v) = master_target {
                p.master_target = v;
            }
            show(&c.call("PUT", &format!("/api/v1/groups/{name}"), Some(&serde_json::to_value(&p)?))?);
        }
        CtlCmd::Assign { machine, group, none } => {
            let (role, name) = machine.split_once('/').ok_or_else(|| Usage(format!("{machine:?}: expected ROLE/NAME, e.g. agent/db1")))?;
            let g = if none { None } else { group };
            show(&c.call("PUT", &format!("/api/v1/machines/{role}/{name}/group"), Some(&json!({ "group": g })))?);
        }
        CtlCmd::Plan { name, file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Usage(format!("{}: not JSON: {e}", file.display())))?;
            show(&c.call("PUT", &format!("/api/v1/plans/{name}"), Some(&v))?);
        }
        CtlCmd::Run { plan, kind, point, wait } => {
            let r = c.call("POST", &format!("/api/v1/plans/{plan}/run"), Some(&json!({ "kind": kind, "point": point })))?;
            let id = r["id"].as_str().unwrap_or_default().to_string();
            let r = match wait {
                Some(w) => wait_run(&c, &id, &w, &["ready", "failed-over"])?,
                None => r,
            };
            show(&r);
            if r["state"] == "failed" || r["state"] == "interrupted" {
                bail!("run {id} {}", r["state"].as_str().unwrap_or(""));
            }
        }
        CtlCmd::RunAction { id, action, wait } => {
            let r = if action == "show" {
                c.call("GET", &format!("/api/v1/runs/{id}"), None)?
            } else {
                c.call("POST", &format!("/api/v1/runs/{id}/{action}"), None)?
            };
            let r = match wait {
                Some(w) if action != "show" => wait_run(&c, &id, &w, &["cleaned", "committed", "cancelled"])?,
                _ => r,
            };
            show(&r);
            if action != "show" && (r["state"] == "failed" || r["state"] == "interrupted") {
                bail!("run {id}: {action} {}", r["state"].as_str().unwrap_or(""));
            }
        }
        CtlCmd::User { name, role } => {
            let pw = secret_input("password")?;
            show(&c.call("POST", "/api/v1/users", Some(&json!({ "name": name, "role": role, "password": pw })))?);
        }
        CtlCmd::Webhook { url, secret } => show(&c.call("POST", "/api/v1/webhooks", Some(&json!({ "url": url, "secret": secret })))?),
        CtlCmd::JoinToken { role, name, ttl } => {
            let t = c.call("POST", "/api/v1/join-tokens", Some(&json!({ "role": role, "name": name, "ttl": ttl })))?;
            crate::out_line(format_args!("{}", t["token"].as_str().unwrap_or_default()));
        }
    }
    Ok(())
}
