//! A private PostgreSQL server for one test: its own cluster (`initdb`) in a
//! unique temporary folder, listening on a free loopback TCP port and on a
//! unix socket in that folder, with `fsync=off`. It has a database `ferry`
//! owned by a login role `ferry` with a password, reached through
//! [`Postgres::url`]. Dropping it stops the server (`pg_ctl stop -m
//! immediate`) and removes the folder, also when the test panics. Any number
//! can run at once.
//!
//! The binaries come from `FERRY_PG_BIN` if set, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql-15`), else `pg_config
//! --bindir`, else `PATH`. `initdb` refuses root, so as root every server
//! program runs as the `postgres` system user (`runuser -u postgres --`),
//! which owns the folder; as any other user they run as that user.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The login role and database a test's server has.
pub const PG_USER: &str = "ferry";
/// The database name in [`Postgres::url`].
pub const PG_DB: &str = "ferry";

/// A running private PostgreSQL server (see the module doc).
pub struct Postgres {
    bin: PathBuf,
    /// The temporary folder: `data/` (the cluster), `sock/` (unix socket),
    /// `postgres.log`.
    dir: PathBuf,
    port: u16,
    password: String,
    /// Run the server programs as this system user (`runuser`), when root.
    run_as: Option<String>,
    running: bool,
}

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`.
pub fn pg_bin_dir() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    // Debian: /usr/lib/postgresql/<major>/bin, the newest major.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if o.status.success() && p.join("initdb").exists() {
            return Ok(p);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .ok_or_else(|| err("no PostgreSQL server binaries (initdb, pg_ctl): run scripts/install-deps".into()))
}

impl Postgres {
    /// A new cluster (a copy of this process's one `initdb`), started, with
    /// the role and database made. About half a second; the first in a
    /// process a second more.
    pub fn start() -> io::Result<Postgres> {
        let bin = pg_bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = root.then(|| std::env::var("FERRY_PG_USER").unwrap_or_else(|_| "postgres".into()));
        // Under the system temp folder, not FERRY_TEST_TMP: the `postgres`
        // user must be able to reach it (a root-only path would not do).
        let dir = std::env::temp_dir().join(format!("ferry-pg-{}-{}", std::process::id(), ferry_common::now_ns()));
        std::fs::create_dir_all(dir.join("sock"))?;
        let password = format!("pw{:x}{:x}", ferry_common::now_ns(), std::process::id());
        let mut pg = Postgres { bin, dir, port: 0, password, run_as, running: false };
        // From here on a failure drops `pg`, which removes the folder.
        if let Some(user) = &pg.run_as {
            let st = Command::new("chown").arg("-R").arg(format!("{user}:")).arg(&pg.dir).status()?;
            if !st.success() {
                return Err(err(format!("chown {} to {user} failed (is there a `{user}` user?)", pg.dir.display())));
            }
        }
        pg.initdb()?;
        // A free port can be taken by someone else between our probe and the
        // server's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = crate::free_port();
            match pg.pg_ctl_start() {
                Ok(()) => {
                    pg.running = true;
                    pg.create_role_and_db()?;
                    return Ok(pg);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(err(format!("PostgreSQL did not start: {last}")))
    }

    /// `postgres://ferry:PASSWORD@127.0.0.1:PORT/ferry`
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}:{}@127.0.0.1:{}/{PG_DB}", self.password, self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of role `ferry`.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The temporary folder (cluster in `data/`, socket in `sock/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Whether the server is running (as far as this guard knows).
    pub fn running(&self) -> bool {
        self.running
    }

    /// Run SQL as role `ferry` over TCP (`psql -X -A -t -v ON_ERROR_STOP=1`);
    /// returns its stdout.
    pub fn psql(&self, sql: &str) -> io::Result<String> {
        let o = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            return Err(err(format!("psql -c {sql:?}: {}", String::from_utf8_lossy(&o.stderr).trim())));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Stop the server at once, as a crash would (`pg_ctl stop -m
    /// immediate`: no checkpoint; the next start recovers). Clients see
    /// their connections drop and new ones refused until [`restart`].
    ///
    /// [`restart`]: Postgres::restart
    pub fn kill(&mut self) {
        if self.running {
            self.stop_mode("immediate");
        }
    }

    /// Stop cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&mut self) {
        if self.running {
            self.stop_mode("fast");
        }
    }

    /// Start again on the same port and folder (after [`kill`] or
    /// [`stop`]; a running server is first stopped as by `stop`).
    ///
    /// [`kill`]: Postgres::kill
    /// [`stop`]: Postgres::stop
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.pg_ctl_start()?;
        self.running = true;
        Ok(())
    }

    /// A server program from the bin folder, as the right user.
    fn cmd(&self, prog: &str) -> Command {
        server_cmd(&self.bin, self.run_as.as_deref(), prog, &self.dir)
    }

    /// The cluster in `data/`: a copy of this process's template (one
    /// initdb per test process, about a second saved per server).
    fn initdb(&self) -> io::Result<()> {
        let data = self.dir.join("data");
        let template = template(&self.bin, self.run_as.as_deref())?;
        // -a keeps the owner (postgres) and the 0700 mode the server wants.
        run("cp", Command::new("cp").arg("-a").arg(template).arg(&data))?;
        let conf = format!(
            "\n# ferry test server\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 50\n\
             shared_buffers = 16MB\nlogging_collector = off\n",
            self.dir.join("sock").display()
        );
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        f.write_all(conf.as_bytes())?;
        Ok(())
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.args(["start", "-w", "-t", "30", "-s", "-D"])
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .arg("-o")
            .arg(format!("-p {}", self.port));
        // pg_ctl's stdout would hold the test's output pipe open through the
        // server it forks: give it none.
        c.stdout(Stdio::null());
        run("pg_ctl start", &mut c).map_err(|e| err(format!("{e}\n{}", tail(&self.log(), 10))))
    }

    fn stop_mode(&mut self, mode: &str) {
        let mut c = self.cmd("pg_ctl");
        c.args(["stop", "-w", "-t", "30", "-s", "-m", mode, "-D"]).arg(self.dir.join("data"));
        c.stdout(Stdio::null()).stderr(Stdio::null());
        if !c.status().is_ok_and(|s| s.success()) {
            // pg_ctl could not: kill the postmaster by its pid file.
            self.kill_postmaster();
        }
        self.running = false;
    }

    /// SIGKILL the postmaster named in `postmaster.pid` and wait for it.
    fn kill_postmaster(&self) {
        let pidfile = self.dir.join("data/postmaster.pid");
        let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .filter(|&p| p > 0)
        else {
            return;
        };
        // SAFETY: kill(2) with a positive pid read from our own cluster's
        // pid file; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only checks that the pid exists.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn create_role_and_db(&self) -> io::Result<()> {
        // As the superuser over the unix socket (trust).
        // Two -c: CREATE DATABASE cannot share a transaction.
        let role = format!("CREATE ROLE {PG_USER} LOGIN PASSWORD '{}'", self.password);
        let db = format!("CREATE DATABASE {PG_DB} OWNER {PG_USER}");
        let o = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(self.dir.join("sock"))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", &role, "-c", &db])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(format!("psql: {e}")))?;
        if !o.status.success() {
            return Err(err(format!("creating role and database: {}", String::from_utf8_lossy(&o.stderr).trim())));
        }
        Ok(())
    }
}

/// `prog` from `bin`, run as `run_as` (through runuser) if given, in `cwd`
/// (the caller's may be unreadable to that user), no stdin.
fn server_cmd(bin: &Path, run_as: Option<&str>, prog: &str, cwd: &Path) -> Command {
    let exe = bin.join(prog);
    let mut c = match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    c.current_dir(cwd).stdin(Stdio::null());
    c
}

/// Run to completion; Err with its stderr (or stdout) on failure.
fn run(what: &str, c: &mut Command) -> io::Result<()> {
    let o = c.output().map_err(|e| err(format!("{what}: {e}")))?;
    if o.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&o.stdout).trim().to_string();
    }
    Err(err(format!("{what} failed ({}): {msg}", o.status)))
}

/// This process's template cluster (`initdb` once), removed at exit.
static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

extern "C" fn remove_template() {
    if let Some(dir) = TEMPLATE.get().and_then(|r| r.as_ref().ok()).and_then(|data| data.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn template(bin: &Path, run_as: Option<&str>) -> io::Result<PathBuf> {
    let r = TEMPLATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-pg-template-{}-{}", std::process::id(), ferry_common::now_ns()));
        let data = dir.join("data");
        let made = (|| {
            std::fs::create_dir_all(&dir)?;
            if let Some(user) = run_as {
                let st = Command::new("chown").arg(format!("{user}:")).arg(&dir).status()?;
                if !st.success() {
                    return Err(err(format!("chown {} to {user} failed (is there a `{user}` user?)", dir.display())));
                }
            }
            // -N: no fsync of the new files. Superuser `postgres`, reached
            // only over the unix socket (trust); TCP needs a password (scram).
            let mut c = server_cmd(bin, run_as, "initdb", &dir);
            c.args(["-N", "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "-D"])
                .arg(&data);
            run("initdb", &mut c)
        })();
        match made {
            Ok(()) => {
                // SAFETY: atexit with a plain extern "C" fn that takes no
                // arguments; it only reads the initialised OnceLock.
                unsafe { libc::atexit(remove_template) };
                Ok(data)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e.to_string())
            }
        }
    });
    r.clone().map_err(err)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Whatever state we think it is in: a half-started server too.
        if self.running || self.dir.join("data/postmaster.pid").exists() {
            self.stop_mode("immediate");
        }
        // FERRY_TEST_KEEP=1 keeps a failed test's folder (as TempDir does).
        if std::thread::panicking() && std::env::var_os("FERRY_TEST_KEEP").is_some() {
            eprintln!("kept {} (PostgreSQL stopped)", self.dir.join("postgres.log").display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
