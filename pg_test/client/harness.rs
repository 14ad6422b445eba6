//! A real PostgreSQL server per test scenario, started from the pg_config that
//! `cargo pgrx init` recorded for the version under test, listening on loopback only.
//!
//! Servers run as the `postgres` OS user when the tests run as root (Postgres refuses root),
//! and are stopped when their `Cluster` is dropped or, for shared ones, when the test
//! process exits.

use postgres::{Client, NoTls};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, Once};

/// The Postgres major version this test binary was built for.
pub fn pg_major() -> u32 {
    if cfg!(feature = "pg13") {
        13
    } else if cfg!(feature = "pg14") {
        14
    } else if cfg!(feature = "pg16") {
        16
    } else if cfg!(feature = "pg17") {
        17
    } else if cfg!(feature = "pg18") {
        18
    } else {
        15
    }
}

fn pg_config_path() -> PathBuf {
    let pgrx = pgrx_pg_config::Pgrx::from_config()
        .expect("read ~/.pgrx/config.toml (run cargo pgrx init)");
    let cfg = pgrx
        .get(&format!("pg{}", pg_major()))
        .expect("pg_config for this version");
    cfg.path().expect("pg_config path")
}

/// The server's binaries (initdb, pg_ctl, pg_dump, pg_restore) for the version under test.
pub fn bindir() -> PathBuf {
    let out = Command::new(pg_config_path())
        .arg("--bindir")
        .output()
        .expect("run pg_config");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// pg_ctl, as the server's OS user, with Rust's backtrace switches on in the environment the
/// server inherits: no test may see a Rust backtrace in a message or the log even then.
fn pg_ctl() -> Command {
    let mut c = as_server_user(Path::new("/usr/bin/env"));
    c.args(["RUST_BACKTRACE=1", "RUST_LIB_BACKTRACE=1"])
        .arg(bindir().join("pg_ctl"));
    c
}

/// Runs a server binary as the server's OS user.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Installs the extension into this version's Postgres once per test process, with the
/// features `cargo pgrx test` is using, so the server loads exactly this build.
pub fn install_extension() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let features =
            std::env::var("PGRX_FEATURES").unwrap_or_else(|_| format!("pg{} pg_test", pg_major()));
        let mut cmd = Command::new("cargo");
        cmd.args(["pgrx", "install", "--test", "--no-default-features"])
            .arg("--pg-config")
            .arg(pg_config_path())
            .args(["--features", &features])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        check("cargo pgrx install", cmd.output());
        // The released install scripts, so that tests can create an old version and update it.
        let out = Command::new(pg_config_path())
            .arg("--sharedir")
            .output()
            .expect("run pg_config");
        let extdir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("extension");
        let released = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/released");
        for entry in std::fs::read_dir(&released).expect("sql/released") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sql") {
                std::fs::copy(&path, extdir.join(path.file_name().unwrap()))
                    .unwrap_or_else(|e| panic!("install {}: {e}", path.display()));
            }
        }
    });
}

/// The version `reference_cluster()` creates the extension at before updating it to the
/// current one, when `PG_TENANCY_TEST_UPGRADE_FROM` names one (scripts/test.sh runs the
/// reference-schema tests a second time that way).
pub fn upgrade_from() -> Option<String> {
    std::env::var("PG_TENANCY_TEST_UPGRADE_FROM")
        .ok()
        .filter(|v| !v.is_empty())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Data directories of running servers, stopped at process exit.
static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Stops every server still running when the test process exits, and removes its
/// temporary directory: clusters kept in statics are never dropped, so their `TempDir`s
/// would otherwise stay behind (hundreds of them, gigabytes, after a few runs).
extern "C" fn stop_all_at_exit() {
    if let Ok(dirs) = RUNNING.lock() {
        for dir in dirs.iter() {
            stop_datadir(dir);
            if let Some(root) = dir.parent() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
    }
}

fn stop_datadir(dir: &Path) {
    let _ = as_server_user(&bindir().join("pg_ctl"))
        .args(["stop", "-m", "immediate", "-w", "-D"])
        .arg(dir)
        .output();
}

/// A running test server.
pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    /// The PHI key ring file, when started with [`Cluster::start_with_phi`].
    pub phi_key_file: Option<PathBuf>,
    _tmp: tempfile::TempDir,
    _secrets: Option<tempfile::TempDir>,
}

impl Cluster {
    /// initdb + start with the given extra `postgresql.conf` lines; creates roles `app`
    /// (the application's ordinary role) and `owner` (the migrations role) and database `app`.
    pub fn start(conf: &[&str]) -> Cluster {
        install_extension();
        static ATEXIT: Once = Once::new();
        ATEXIT.call_once(|| {
            extern "C" {
                fn atexit(cb: extern "C" fn()) -> i32;
            }
            // SAFETY: registering a plain extern "C" function.
            unsafe { atexit(stop_all_at_exit) };
        });
        let tmp = tempfile::Builder::new()
            .prefix("pg_tenancy-client-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("data");
        give_to_server_user(tmp.path());
        let bin = bindir();
        check(
            "initdb",
            as_server_user(&bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&dir)
                .output(),
        );
        let port = free_port();
        let mut lines = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", tmp.path().display()),
            "fsync = off".into(),
            "max_connections = 60".into(),
            "logging_collector = off".into(),
            "log_min_messages = warning".into(),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let conf_path = dir.join("postgresql.conf");
        let body = format!("{}\n", lines.join("\n"));
        let appended = Command::new(if is_root() { "sudo" } else { "sh" })
            .args(if is_root() {
                vec!["-n", "-u", "postgres", "--", "sh"]
            } else {
                vec![]
            })
            .arg("-c")
            .arg(format!(
                "cat >> '{}' <<'CONF'\n{body}CONF",
                conf_path.display()
            ))
            .output();
        check("write postgresql.conf", appended);
        let log = tmp.path().join("server.log");
        check(
            "pg_ctl start",
            pg_ctl()
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&dir)
                .arg("-l")
                .arg(&log)
                .output(),
        );
        RUNNING.lock().unwrap().push(dir.clone());
        let cluster = Cluster {
            port,
            dir,
            phi_key_file: None,
            _tmp: tmp,
            _secrets: None,
        };
        let mut su = cluster.connect("postgres", "postgres");
        for stmt in [
            "CREATE ROLE owner LOGIN NOSUPERUSER NOBYPASSRLS",
            "CREATE ROLE app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
            // CREATE DATABASE refuses to run in the implicit transaction of a batch.
            "CREATE DATABASE app OWNER owner",
        ] {
            su.batch_execute(stmt).unwrap();
        }
        cluster
    }

    /// Like [`Cluster::start`], preloaded, with a fresh PHI key ring (key 1 active) made by
    /// `scripts/phi_keyring.py` in a private directory and named by `tenancy.phi_key_file`.
    pub fn start_with_phi(conf: &[&str]) -> Cluster {
        let secrets = server_private_dir();
        let path = secrets.path().join("phi.keyring");
        keyring_tool(&["new", path.to_str().unwrap()]);
        let mut cluster = Cluster::start_with_keyring(&path, conf);
        cluster._secrets = Some(secrets);
        cluster
    }

    /// Like [`Cluster::start_with_phi`] with an existing key ring (another server's).
    pub fn start_with_keyring(path: &Path, conf: &[&str]) -> Cluster {
        let mut lines = vec![
            "shared_preload_libraries = 'pg_tenancy'".to_string(),
            format!("tenancy.phi_key_file = '{}'", path.display()),
            // Reveals are recorded (and only allowed) in the test database.
            "tenancy.audit_database = 'app'".to_string(),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut cluster = Cluster::start(&refs);
        cluster.phi_key_file = Some(path.to_path_buf());
        cluster
    }

    /// Stops and starts the server (fast shutdown): every backend and the background worker
    /// start again, reading database and role settings anew.
    pub fn restart(&self) {
        let log = self._tmp.path().join("server.log");
        check(
            "pg_ctl restart",
            pg_ctl()
                .args(["restart", "-w", "-t", "60", "-m", "fast", "-D"])
                .arg(&self.dir)
                .arg("-l")
                .arg(&log)
                .output(),
        );
    }

    /// Starts the server again after it died (crash recovery runs).
    pub fn start_again(&self) {
        let log = self._tmp.path().join("server.log");
        check(
            "pg_ctl start",
            pg_ctl()
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(&self.dir)
                .arg("-l")
                .arg(&log)
                .output(),
        );
    }

    /// Kills the postmaster with SIGKILL (a crash: nothing is flushed, shared memory is
    /// gone) and waits until its children have exited; [`Cluster::start_again`] then runs
    /// crash recovery.
    pub fn crash(&self) {
        let pid = std::fs::read_to_string(self.dir.join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        let children = std::process::Command::new("pgrep")
            .args(["-P", &pid])
            .output()
            .unwrap();
        let children: Vec<String> = String::from_utf8_lossy(&children.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert!(!children.is_empty(), "the postmaster has children");
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .output()
            .unwrap();
        // The orphaned backends and the workers exit once they notice.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let alive = |p: &str| {
            std::process::Command::new("kill")
                .args(["-0", p])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        while children.iter().any(|p| alive(p)) || alive(&pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the old server's processes exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): no checkpoint, crash recovery at the
    /// next start.
    pub fn stop_immediate(&self) {
        check(
            "pg_ctl stop -m immediate",
            pg_ctl()
                .args(["stop", "-w", "-t", "60", "-m", "immediate", "-D"])
                .arg(&self.dir)
                .output(),
        );
    }

    pub fn reload(&self) {
        self.connect("postgres", "postgres")
            .batch_execute("SELECT pg_reload_conf()")
            .unwrap();
    }

    /// Waits (up to 10 s) until every new backend sees PHI key `id` as the active one, after
    /// a key ring change and a reload.
    pub fn wait_for_active_key(&self, id: i64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let active: Option<i64> = self
                .connect("postgres", "app")
                .query_one(
                    "SELECT key_id FROM tenancy.phi_key_status() WHERE active",
                    &[],
                )
                .unwrap()
                .get(0);
            if active == Some(id) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "key {id} never became active"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A connection as `user` to `db`.
    pub fn connect(&self, user: &str, db: &str) -> Client {
        self.try_connect(user, db, None)
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
    }

    /// A connection attempt, with optional startup `options` (what `PGOPTIONS` sends).
    pub fn try_connect(
        &self,
        user: &str,
        db: &str,
        options: Option<&str>,
    ) -> Result<Client, postgres::Error> {
        let mut cfg = postgres::Config::new();
        cfg.host("127.0.0.1").port(self.port).user(user).dbname(db);
        if let Some(o) = options {
            cfg.options(o);
        }
        cfg.connect(NoTls)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        let path = self._tmp.path().join("server.log");
        if is_root() {
            let out = Command::new("cat").arg(&path).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            std::fs::read_to_string(path).unwrap_or_default()
        }
    }
}

/// Hands a path to the server's OS user (when the tests run as root).
fn give_to_server_user(path: &Path) {
    if is_root() {
        check(
            "chown",
            Command::new("chown").arg("postgres").arg(path).output(),
        );
    }
}

/// A private directory (mode 0700) owned by the server's OS user, for key files.
pub fn server_private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("pg_tenancy-secrets-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    give_to_server_user(dir.path());
    dir
}

/// Runs `scripts/phi_keyring.py` (as the server's OS user when root, so files stay theirs).
pub fn keyring_tool(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/phi_keyring.py");
    let mut cmd = if is_root() {
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", "postgres", "--", "python3", script]);
        c
    } else {
        let mut c = Command::new("python3");
        c.arg(script);
        c
    };
    let out = check("phi_keyring.py", cmd.args(args).output());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets a server file's mode and, as root, hands it to the `postgres` OS user.
pub fn set_server_file_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    give_to_server_user(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_datadir(&self.dir);
        RUNNING.lock().unwrap().retain(|d| d != &self.dir);
    }
}

/// SQLSTATE of a failed statement, or panics with what happened instead.
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
    }
}

/// Message (and hint) of a failed statement.
pub fn db_error<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> postgres::error::DbError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .as_db_error()
            .cloned()
            .unwrap_or_else(|| panic!("not a server error: {e}")),
    }
}

/// Postgres's `pg_regress` for the version under test (installed with PGXS).
pub fn pg_regress_path() -> PathBuf {
    let out = Command::new(pg_config_path())
        .arg("--pgxs")
        .output()
        .expect("run pg_config");
    let pgxs = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    // <pkglibdir>/pgxs/src/makefiles/pgxs.mk -> <pkglibdir>/pgxs/src/test/regress/pg_regress
    pgxs.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("test/regress/pg_regress")
}

/// The first column of every row of `sql`, as text.
pub fn strings(c: &mut postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The single bigint `sql` returns (a count).
pub fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// A connection to the server on `port`, or None while it is down (restarting).
pub fn try_connect_port(port: u16, user: &str, db: &str) -> Option<Client> {
    port_config(port, user, db)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect(NoTls)
        .ok()
}

fn port_config(port: u16, user: &str, db: &str) -> postgres::Config {
    let mut config = postgres::Config::new();
    config.host("127.0.0.1").port(port).user(user).dbname(db);
    config
}

/// A connection to the server on `port` as `user`, for threads that only carry the port.
pub fn connect_port(port: u16, user: &str, db: &str) -> Client {
    port_config(port, user, db)
        .connect(NoTls)
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}
