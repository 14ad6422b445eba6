//! The hostile world (issue 8/8): many clients through a real PgBouncer in transaction mode,
//! some of them careless or malicious, key rotation while they run, backends killed and the
//! server stopped in the middle, and fuzzed input through SQL. Every test ends with figures:
//! transactions run, foreign rows seen (must be 0), events lost (must be 0), errors by kind.

use crate::harness::{count, keyring_tool, set_server_file_mode, sqlstate, Cluster};
use postgres::Client;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TENANTS: [&str; 4] = [
    "a0000000-0000-4000-8000-00000000000a",
    "b0000000-0000-4000-8000-00000000000b",
    "c0000000-0000-4000-8000-00000000000c",
    "d0000000-0000-4000-8000-00000000000d",
];

/// A PgBouncer in transaction mode in front of `pg_port`, with a pool smaller than the
/// number of clients. Stopped when dropped.
pub(crate) struct Bouncer {
    pub(crate) port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Bouncer {
    pub(crate) fn start(pg_port: u16, pool_size: u32) -> Bouncer {
        let dir = tempfile::Builder::new()
            .prefix("pg_tenancy-bouncer-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("users.txt"),
            "\"app\" \"\"\n\"postgres\" \"\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\napp = host=127.0.0.1 port={pg_port} dbname=app\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 200\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n\
                 ignore_startup_parameters = extra_float_digits\n"
            ),
        )
        .unwrap();
        // SAFETY: geteuid() cannot fail and touches no memory.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .output()
                .unwrap();
        }
        let mut cmd = Command::new("pgbouncer");
        if root {
            // PgBouncer refuses to run as root; -u switches to the server's OS user.
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pgbouncer (Debian package pgbouncer) must be installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Bouncer { port, child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` has counted `more` transactions beyond now (clients are making progress),
/// for at most 60 seconds: a load phase measured in work done, not in fixed sleeps.
fn wait_for_progress(f: &Figures, more: i64) {
    let target = f.transactions.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.transactions.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "clients made no progress for 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `probe` until it returns `want` (10 s at most) and returns its last answer.
fn wait_for_answer(want: &str, probe: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster with a protected, audited `notes` table (PHI body) and rows for four tenants.
fn notes_cluster() -> Cluster {
    let cluster = Cluster::start_with_phi(&["max_connections = 80"]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    cluster
        .connect("owner", "app")
        .batch_execute(
            "CREATE TABLE notes (organization_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
                                 body tenancy.phi NOT NULL, PRIMARY KEY (organization_id, id));
             GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO app;",
        )
        .unwrap();
    su.query("SELECT tenancy.protect('public.notes', audit => true)", &[])
        .unwrap();
    let mut app = cluster.connect("app", "app");
    for org in TENANTS {
        app.batch_execute(&format!(
            "BEGIN; SELECT tenancy.set_org('{org}');
             INSERT INTO notes (body) SELECT tenancy.phi_encrypt('seed ' || g, 'notes.body') FROM generate_series(1, 50) g;
             COMMIT;"
        ))
        .unwrap();
    }
    cluster
}

/// What the clients of a run counted.
#[derive(Default)]
struct Figures {
    transactions: AtomicI64,
    foreign_rows: AtomicI64,
    leaked_contexts: AtomicI64,
    inserts: [AtomicI64; 4],
    updates: [AtomicI64; 4],
    deletes: [AtomicI64; 4],
    errors: Mutex<BTreeMap<String, i64>>,
}

impl Figures {
    fn error(&self, kind: &str) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_default() += 1;
    }

    fn report(&self, what: &str) -> String {
        format!(
            "{what}: {} transactions, {} foreign rows seen, {} contexts leaked into the next transaction, errors by kind {:?}",
            self.transactions.load(Ordering::Relaxed),
            self.foreign_rows.load(Ordering::Relaxed),
            self.leaked_contexts.load(Ordering::Relaxed),
            self.errors.lock().unwrap()
        )
    }
}

/// The behaviour of one client.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Enters its tenant, reads and checks, writes PHI, sometimes updates or deletes.
    Honest,
    /// Every third transaction forgets `set_org` and reads anyway.
    Forgetful,
    /// Every third transaction tries to switch tenant with SET / set_config.
    Trickster,
    /// Every third transaction fails half way (division by zero) and rolls back.
    Clumsy,
}

/// One transaction of `kind` for tenant `t`; `n` is the client's transaction number.
fn transaction(
    c: &mut Client,
    kind: Kind,
    t: usize,
    n: i64,
    f: &Figures,
) -> Result<(), postgres::Error> {
    let org = TENANTS[t];
    let other = TENANTS[(t + 1) % 4];
    let mut tx = c.transaction()?;
    // Whatever ran before on this pooled server connection, no context may be left.
    let leaked: Option<String> = tx
        .query_one("SELECT tenancy.current_org_id_text()", &[])?
        .get(0);
    if leaked.is_some() {
        f.leaked_contexts.fetch_add(1, Ordering::Relaxed);
    }
    if kind == Kind::Forgetful && n % 3 == 0 {
        let seen: i64 = tx.query_one("SELECT count(*) FROM notes", &[])?.get(0);
        f.foreign_rows.fetch_add(seen, Ordering::Relaxed);
        return tx.commit();
    }
    if kind == Kind::Trickster && n % 3 == 0 {
        let r = if n % 2 == 0 {
            tx.batch_execute(&format!("SET app.current_org_id = '{other}'"))
        } else {
            tx.query_one(
                "SELECT set_config('app.current_org_id', $1, false)",
                &[&other],
            )
            .map(|_| ())
        };
        // Expected to fail; the transaction is then aborted and rolled back by the drop.
        return r;
    }
    tx.query_one("SELECT tenancy.set_org($1::text::uuid)", &[&org])?;
    // Every row this tenant can see must be its own, and must reveal.
    let rows = tx.query(
        "SELECT organization_id::text, tenancy.phi_reveal(body, 'notes.body') FROM notes ORDER BY id DESC LIMIT 10",
        &[],
    )?;
    for r in &rows {
        if r.get::<_, String>(0) != org {
            f.foreign_rows.fetch_add(1, Ordering::Relaxed);
        }
    }
    tx.execute(
        "INSERT INTO notes (body) VALUES (tenancy.phi_encrypt($1, 'notes.body'))",
        &[&format!("note {n} of {org}")],
    )?;
    let mut updated = 0;
    let mut deleted = 0;
    if n % 5 == 1 {
        updated = tx.execute(
            "UPDATE notes SET body = tenancy.phi_encrypt('edited', 'notes.body') WHERE id = (SELECT max(id) FROM notes)",
            &[],
        )?;
    }
    if n % 7 == 2 {
        deleted = tx.execute(
            "DELETE FROM notes WHERE id = (SELECT min(id) FROM notes)",
            &[],
        )?;
    }
    if kind == Kind::Clumsy && n % 3 == 0 {
        tx.query_one("SELECT 1 / (n - n) FROM (SELECT $1::bigint AS n) s", &[&n])?;
    }
    tx.commit()?;
    f.inserts[t].fetch_add(1, Ordering::Relaxed);
    f.updates[t].fetch_add(updated as i64, Ordering::Relaxed);
    f.deletes[t].fetch_add(deleted as i64, Ordering::Relaxed);
    Ok(())
}

/// A connection as `app`; on a loaded 2-core machine PgBouncer's first server logins can be
/// slow, so a failed attempt is retried for up to 20 seconds.
fn connect_with_retry(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match crate::harness::try_connect_port(port, "app", "app") {
            Some(c) => return c,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            None => panic!("could not connect to port {port} for 20 s"),
        }
    }
}

/// Runs `clients` client threads through `port` until each has run `per_client`
/// transactions or `stop` is set; client i serves tenant i % 4.
fn run_clients(
    port: u16,
    clients: usize,
    per_client: i64,
    stop: Arc<AtomicBool>,
    f: Arc<Figures>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (stop, f) = (stop.clone(), f.clone());
            std::thread::spawn(move || {
                let kind = match i % 8 {
                    1 => Kind::Forgetful,
                    3 => Kind::Trickster,
                    5 => Kind::Clumsy,
                    _ => Kind::Honest,
                };
                let mut c = connect_with_retry(port);
                let mut n = 0;
                while n < per_client && !stop.load(Ordering::Relaxed) {
                    n += 1;
                    f.transactions.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = transaction(&mut c, kind, i % 4, n, &f) {
                        let code = e.code().map(|c| c.code().to_string());
                        f.error(code.as_deref().unwrap_or("connection"));
                        if c.is_closed() {
                            c = connect_with_retry(port);
                        }
                    }
                }
            })
        })
        .collect()
}

/// Per tenant: the audit trail holds exactly one event per committed change, and verifies.
fn assert_trail_matches(cluster: &Cluster, f: &Figures, seeds: i64) {
    let mut su = cluster.connect("postgres", "app");
    for (t, org) in TENANTS.iter().enumerate() {
        let events = |action: &str| {
            count(
                &mut cluster.connect("postgres", "app"),
                // The clients' own changes (the key rotation's re-encryptions are the DBA's).
                &format!("SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{org}' AND table_name = 'public.notes' AND action = '{action}' AND session_role = 'app'"),
            )
        };
        let (i, u, d) = (
            f.inserts[t].load(Ordering::Relaxed),
            f.updates[t].load(Ordering::Relaxed),
            f.deletes[t].load(Ordering::Relaxed),
        );
        assert_eq!(events("INSERT"), seeds + i, "INSERT events of {org}");
        assert_eq!(events("UPDATE"), u, "UPDATE events of {org}");
        assert_eq!(events("DELETE"), d, "DELETE events of {org}");
        assert_eq!(
            count(
                &mut su,
                &format!("SELECT count(*) FROM notes WHERE organization_id = '{org}'")
            ),
            seeds + i - d,
            "rows of {org}"
        );
        let ok: bool = su
            .query_one(
                &format!("SELECT ok FROM tenancy.audit_verify('{org}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ok, "the chain of {org} verifies");
    }
}

#[test]
fn test_thirty_two_pooled_clients_with_rotation_leak_nothing_and_lose_nothing() {
    let cluster = notes_cluster();
    let bouncer = Bouncer::start(cluster.port, 8);
    let f = Arc::new(Figures::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = run_clients(bouncer.port, 32, 120, stop.clone(), f.clone());
    // While they run: a new active key, and the batched re-encryption of the column.
    wait_for_progress(&f, 50);
    let path = cluster.phi_key_file.clone().unwrap();
    keyring_tool(&["add", path.to_str().unwrap(), "--activate"]);
    cluster.reload();
    cluster.wait_for_active_key(2);
    let mut rot = cluster.connect("postgres", "app");
    rot.batch_execute("CALL tenancy.phi_rotate_all('public.notes', 'body', label => 'notes.body', batch_size => 200)")
        .unwrap();
    for c in clients {
        c.join().unwrap();
    }
    // Rows written before the new key was seen by every backend: rotate once more, at rest.
    rot.batch_execute("CALL tenancy.phi_rotate_all('public.notes', 'body', label => 'notes.body', batch_size => 200)")
        .unwrap();
    let figures = f.report("pgbouncer transaction mode, 32 clients, pool of 8, 4 tenants");
    eprintln!("{figures}");
    assert_eq!(
        f.transactions.load(Ordering::Relaxed),
        32 * 120,
        "{figures}"
    );
    assert_eq!(f.foreign_rows.load(Ordering::Relaxed), 0, "{figures}");
    assert_eq!(f.leaked_contexts.load(Ordering::Relaxed), 0, "{figures}");
    let errors = f.errors.lock().unwrap().clone();
    // The only errors are the ones the clients asked for: forged settings (42501) and
    // division by zero (22012); row-lock waits may surface as serialization or deadlock
    // errors only if the extension introduced them, and they must not.
    for code in errors.keys() {
        assert!(
            ["42501", "22012"].contains(&code.as_str()),
            "unexpected error {code}: {figures}"
        );
    }
    assert!(
        errors.get("42501").copied().unwrap_or(0) > 0,
        "the tricksters were refused"
    );
    assert_trail_matches(&cluster, &f, 50);
    // Every value reveals under the new key; none is left under the old one.
    let usage: Vec<(i64, i64)> = rot
        .query(
            "SELECT key_id, values_count FROM tenancy.phi_key_usage('public.notes', 'body')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let total = count(&mut rot, "SELECT count(*) FROM notes");
    assert_eq!(usage, [(2, total)], "every value under key 2");
    for org in TENANTS {
        let mut app = cluster.connect("app", "app");
        app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{org}')"))
            .unwrap();
        let revealed = count(
            &mut app,
            "SELECT count(tenancy.phi_reveal(body, 'notes.body')) FROM notes",
        );
        let rows = count(&mut app, "SELECT count(*) FROM notes");
        assert_eq!(revealed, rows, "every value of {org} reveals");
        app.batch_execute("COMMIT").unwrap();
    }
    assert!(!bouncer.log().contains("FATAL"), "{}", bouncer.log());
}

/// Restarts the server after an immediate shutdown (no checkpoint: crash recovery).
pub(crate) fn immediate_restart(cluster: &Cluster) {
    let bin = crate::harness::bindir();
    let pg_ctl = |args: &[&str]| {
        // SAFETY: geteuid() cannot fail and touches no memory.
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("sudo");
            c.args(["-n", "-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        let out = cmd.args(args).arg("-D").arg(&cluster.dir).output().unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    pg_ctl(&["stop", "-m", "immediate", "-w"]);
    let log = cluster.dir.parent().unwrap().join("server.log");
    pg_ctl(&["start", "-w", "-t", "60", "-l", log.to_str().unwrap()]);
}

fn set_mode(path: &Path, mode: u32) {
    set_server_file_mode(path, mode);
}

#[test]
fn test_killed_backends_and_an_immediate_shutdown_lose_no_event() {
    let cluster = notes_cluster();
    let f = Arc::new(Figures::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Honest writers on direct connections; they reconnect after each crash.
    let port = cluster.port;
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let (stop, f) = (stop.clone(), f.clone());
            std::thread::spawn(move || {
                let mut c: Option<Client> = None;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let client = match c.as_mut() {
                        Some(c) if !c.is_closed() => c,
                        _ => match crate::harness::try_connect_port(port, "app", "app") {
                            Some(new) => c.insert(new),
                            None => {
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        },
                    };
                    n += 1;
                    f.transactions.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = transaction(client, Kind::Honest, i % 4, n, &f) {
                        let code = e.code().map(|c| c.code().to_string());
                        f.error(code.as_deref().unwrap_or("connection lost"));
                    }
                }
            })
        })
        .collect();
    let mut faults = 0;
    wait_for_progress(&f, 30);
    // kill -9 of a backend in the middle of its work: the postmaster restarts every backend.
    let pid: i32 = cluster
        .connect("postgres", "postgres")
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE usename = 'app' LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .unwrap();
    faults += 1;
    // The writers reconnect after the crash restart and get work done again.
    wait_for_progress(&f, 30);
    // An immediate shutdown under load, then a restart with crash recovery.
    immediate_restart(&cluster);
    faults += 1;
    wait_for_progress(&f, 30);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    eprintln!(
        "{} ({faults} faults injected)",
        f.report("crash test, 6 direct writers")
    );
    // Commits acknowledged to a client survive (each change with its event, in the same
    // transaction); a change whose COMMIT never answered may or may not be there, so the
    // check is: the trail matches the table exactly, and no acknowledged change is missing.
    let mut su = cluster.connect("postgres", "app");
    for (t, org) in TENANTS.iter().enumerate() {
        let rows_and_events = su
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{org}' AND table_name = 'public.notes' AND action = 'INSERT')
                          - (SELECT count(*) FROM tenancy.audit_events WHERE organization_id = '{org}' AND table_name = 'public.notes' AND action = 'DELETE'),
                            (SELECT count(*) FROM notes WHERE organization_id = '{org}')"
                ),
                &[],
            )
            .unwrap();
        let (by_events, rows): (i64, i64) = (rows_and_events.get(0), rows_and_events.get(1));
        assert_eq!(
            by_events, rows,
            "no change without its event and no event without its change ({org})"
        );
        assert!(
            by_events
                >= 50 + f.inserts[t].load(Ordering::Relaxed) - f.deletes[t].load(Ordering::Relaxed),
            "no acknowledged commit is missing ({org})"
        );
        let ok: bool = su
            .query_one(
                &format!("SELECT ok FROM tenancy.audit_verify('{org}')"),
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ok, "the chain of {org} verifies after the crashes");
    }
    // The key ring came back with the server.
    let active: Option<i64> = su
        .query_one(
            "SELECT key_id FROM tenancy.phi_key_status() WHERE active",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(active, Some(1));

    // The key file made world-readable, then removed: reloads report it, nothing crashes,
    // nothing is encrypted without a key, and putting it back restores service.
    let path: PathBuf = cluster.phi_key_file.clone().unwrap();
    let encrypt = |cluster: &Cluster| {
        let mut app = cluster.connect("app", "app");
        app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{}')", TENANTS[0]))
            .unwrap();
        let r = match app.query_one("SELECT tenancy.phi_encrypt('x', 'notes.body')", &[]) {
            Ok(_) => "ok".to_string(),
            Err(e) => sqlstate::<()>(Err(e)),
        };
        let _ = app.batch_execute("ROLLBACK");
        r
    };
    set_mode(&path, 0o644);
    cluster.reload();
    assert_eq!(
        wait_for_answer("F0000", || encrypt(&cluster)),
        "F0000",
        "a world-readable key ring is not used"
    );
    // The error says which file and why (never the key).
    let mut app = cluster.connect("app", "app");
    app.batch_execute(&format!("BEGIN; SELECT tenancy.set_org('{}')", TENANTS[0]))
        .unwrap();
    let err = crate::harness::db_error(
        app.query_one("SELECT tenancy.phi_encrypt('x', 'notes.body')", &[]),
    );
    let detail = err.detail().unwrap_or_default().to_string();
    assert!(
        err.message().contains("key ring") && detail.contains(path.to_str().unwrap()),
        "a clear error naming the file: {} / {detail}",
        err.message()
    );
    drop(app);
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    cluster.reload();
    assert_eq!(
        wait_for_answer("F0000", || encrypt(&cluster)),
        "F0000",
        "a missing key ring is reported"
    );
    std::fs::write(&path, &saved).unwrap();
    set_mode(&path, 0o600);
    cluster.reload();
    assert_eq!(
        wait_for_answer("ok", || encrypt(&cluster)),
        "ok",
        "service is back with the key ring"
    );
    assert!(!cluster.log().contains("PANIC"), "{}", cluster.log());
}

/// SQL calls per fuzz case: `PG_TENANCY_FUZZ_ITERATIONS` / 20 (the Rust fuzz tests' count
/// for the same variable), 2,500 by default.
fn sql_fuzz_iterations() -> i32 {
    std::env::var("PG_TENANCY_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(2_500, |n| (n / 20).max(1))
}

/// Runs `iterations` calls of `call` (a SQL expression over `input`) in one tenant
/// transaction, each in its own subtransaction, with `input` drawn by `generator`; returns
/// how many calls ended in each SQLSTATE ("ok" for success).
fn fuzz_sql(
    c: &mut Client,
    setup: &str,
    generator: &str,
    call: &str,
    iterations: i32,
) -> BTreeMap<String, i64> {
    // Made outside the tenant transaction: DDL inside one is refused (S1).
    c.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS fuzz_result (code text) ON COMMIT DELETE ROWS",
    )
    .unwrap();
    c.batch_execute(&format!(
        "BEGIN; {setup}
         DO $fuzz$
         DECLARE input text; code text;
         BEGIN
           FOR i IN 1..{iterations} LOOP
             input := {generator};
             BEGIN
               PERFORM {call};
               code := 'ok';
               RAISE EXCEPTION USING ERRCODE = 'P0001';   -- undo what the call did
             EXCEPTION WHEN OTHERS THEN
               IF SQLSTATE <> 'P0001' THEN code := SQLSTATE; END IF;
             END;
             INSERT INTO fuzz_result VALUES (code);
           END LOOP;
         END $fuzz$;"
    ))
    .unwrap();
    let out = c
        .query(
            "SELECT code, count(*) FROM fuzz_result GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    c.batch_execute("COMMIT").unwrap();
    out
}

#[test]
fn test_fuzzed_envelopes_tokens_and_tenant_ids_get_only_documented_errors() {
    let secrets = crate::harness::server_private_dir();
    let key = secrets.path().join("context.key");
    std::fs::write(&key, format!("{}\n", crate::signed::KEY_HEX)).unwrap();
    set_server_file_mode(&key, 0o600);
    let cluster =
        Cluster::start_with_phi(&[&format!("tenancy.context_key_file = '{}'", key.display())]);
    cluster
        .connect("postgres", "app")
        .batch_execute("CREATE EXTENSION pg_tenancy")
        .unwrap();
    let mut c = cluster.connect("app", "app");
    let org = TENANTS[0];
    // Tokens are single-use: one per fuzz case's transaction.
    let enter = || {
        let token =
            crate::signed::mint(crate::signed::KEY_HEX, org, "", crate::signed::now() + 600);
        format!("SELECT tenancy.set_org('{org}', NULL, '{token}');")
    };
    let mut total = 0;
    // Mutations of a valid envelope of this tenant, and random bytes.
    let mutate_envelope = "(SELECT CASE (random() * 4)::int
           WHEN 0 THEN encode(set_byte(e, (random() * (length(e) - 1))::int, (random() * 255)::int), 'hex')
           WHEN 1 THEN encode(substring(e FROM 1 FOR (random() * length(e))::int), 'hex')
           WHEN 2 THEN encode(e || decode(md5(random()::text), 'hex'), 'hex')
           WHEN 3 THEN encode(decode(md5(random()::text) || md5(random()::text), 'hex'), 'hex')
           ELSE encode(overlay(e PLACING decode(md5(random()::text), 'hex') FROM 1 + (random() * 20)::int), 'hex') END
         FROM (SELECT tenancy.phi_encrypt('fuzz me', 'fuzz.label') AS e) s)";
    // Tenant ids and actors: random strings (in signed mode a valid id without a token is 28000).
    let random_text = "(SELECT string_agg(substr(E'abcdef0123456789-ABCDEF \\'\"\\\\;{}%_.:é€\\t', (random() * 40)::int + 1, 1), '')
                          FROM generate_series(1, (random() * 50)::int))";
    // Tokens: mutations of a valid one and random strings; only the valid one is accepted.
    let mutate_token = format!(
        "(SELECT CASE (random() * 3)::int
            WHEN 0 THEN overlay(t PLACING substr('AZaz09-_.', (random() * 8)::int + 1, 1) FROM 1 + (random() * (length(t) - 1))::int FOR 1)
            WHEN 1 THEN substring(t FROM 1 FOR (random() * length(t))::int)
            WHEN 2 THEN t || 'x'
            ELSE md5(random()::text) END FROM (SELECT '{token}'::text AS t) s)",
        token = crate::signed::mint(crate::signed::KEY_HEX, org, "", crate::signed::now() + 600)
    );
    let reveal_codes = &["ok", "22P03", "28000", "42704", "42804"][..];
    // (what, setup, input generator, call, the SQLSTATEs it may end in)
    let cases: [(&str, &str, &str, String, &[&str]); 7] = [
        (
            "phi_reveal",
            &enter(),
            mutate_envelope,
            "tenancy.phi_reveal(decode(input, 'hex'), 'fuzz.label')".into(),
            reveal_codes,
        ),
        (
            "phi_reveal_jsonb",
            &enter(),
            mutate_envelope,
            "tenancy.phi_reveal_jsonb(decode(input, 'hex'), 'fuzz.label')".into(),
            reveal_codes,
        ),
        (
            "phi_key_id",
            &enter(),
            mutate_envelope,
            "tenancy.phi_key_id(decode(input, 'hex'))".into(),
            &["ok", "22P03"],
        ),
        (
            "phi_is_envelope",
            &enter(),
            mutate_envelope,
            "tenancy.phi_is_envelope(decode(input, 'hex'))".into(),
            &["ok"],
        ),
        (
            "set_org(id)",
            "",
            random_text,
            "tenancy.set_org(input)".into(),
            &["22023", "22004", "28000"],
        ),
        (
            "set_org(actor)",
            "",
            random_text,
            format!("tenancy.set_org('{org}', input)"),
            &["22023", "28000"],
        ),
        (
            "token",
            "",
            &mutate_token,
            format!("tenancy.set_org('{org}', NULL, input)"),
            &["ok", "28000"],
        ),
    ];
    let mut figures = Vec::new();
    let expected = i64::from(sql_fuzz_iterations()) * cases.len() as i64;
    for (what, setup, generator, call, allowed) in cases {
        let result = fuzz_sql(&mut c, setup, generator, &call, sql_fuzz_iterations());
        for code in result.keys() {
            assert!(
                allowed.contains(&code.as_str()),
                "{what}: undocumented {code}: {result:?}"
            );
        }
        total += result.values().sum::<i64>();
        figures.push(format!("{what} {result:?}"));
    }
    eprintln!("fuzzed SQL calls: {total}; {}", figures.join("; "));
    assert_eq!(total, expected, "every call ran and was counted");
    // The server is alive and nothing was logged at PANIC.
    assert_eq!(
        count(&mut cluster.connect("postgres", "app"), "SELECT 1::bigint"),
        1
    );
    assert!(!cluster.log().contains("PANIC"));
}

/// A bounded soak: the pooled workload for PG_TENANCY_SOAK_SECS seconds (default 15; set it
/// to hours for a long run), with the figures at the end.
#[test]
fn test_soak_pooled_workload() {
    let secs: u64 = std::env::var("PG_TENANCY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let cluster = notes_cluster();
    let bouncer = Bouncer::start(cluster.port, 6);
    let f = Arc::new(Figures::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = run_clients(bouncer.port, 16, i64::MAX, stop.clone(), f.clone());
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let figures = f.report(&format!(
        "soak, {secs} s, 16 clients through pgbouncer (pool 6)"
    ));
    eprintln!("{figures}");
    assert!(f.transactions.load(Ordering::Relaxed) > 100, "{figures}");
    assert_eq!(f.foreign_rows.load(Ordering::Relaxed), 0, "{figures}");
    assert_eq!(f.leaked_contexts.load(Ordering::Relaxed), 0, "{figures}");
    for code in f.errors.lock().unwrap().keys() {
        // The worker's own lines: those of every PID the postmaster says it ran as.
        let log = cluster.log();
        let pids: Vec<String> = log
            .lines()
            .filter(|l| l.contains("pg_tenancy reveal audit"))
            .filter_map(|l| l.split("(PID ").nth(1))
            .filter_map(|rest| rest.split(')').next())
            .map(|pid| format!("[{pid}]"))
            .collect();
        let worker: Vec<String> = log
            .lines()
            .filter(|l| {
                l.contains("pg_tenancy reveal audit") || pids.iter().any(|p| l.contains(p.as_str()))
            })
            .map(str::to_string)
            .collect();
        assert!(
            ["42501", "22012"].contains(&code.as_str()),
            "unexpected error {code}: {figures}\nthe worker in the server log: {worker:#?}"
        );
    }
    assert_trail_matches(&cluster, &f, 50);
}

/// The tenant id format is the database's, not a backend's: `tenancy.set_tenant_id_format`
/// reaches a pooled server connection that PgBouncer keeps open, at its next `set_org`, both
/// ways (a per-database setting reaches only new backends: the pooled one kept accepting text
/// ids after the switch back). A rolled-back change changes nothing; only a superuser sets it.
#[test]
fn test_the_tenant_id_format_reaches_pooled_connections_at_once() {
    let cluster = Cluster::start(&["shared_preload_libraries = 'pg_tenancy'"]);
    let mut su = cluster.connect("postgres", "app");
    su.batch_execute("CREATE EXTENSION pg_tenancy").unwrap();
    let bouncer = Bouncer::start(cluster.port, 1);
    let mut app = connect_with_retry(bouncer.port);
    let enter = |c: &mut Client, org: &str| -> Result<String, String> {
        let mut tx = c.transaction().unwrap();
        let r = tx
            .query_one("SELECT tenancy.set_org($1::text)", &[&org])
            .map(|r| r.get::<_, String>(0))
            .map_err(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default());
        drop(tx);
        r
    };
    let pid =
        |c: &mut Client| -> i32 { c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0) };
    let server = pid(&mut app);
    assert_eq!(
        enter(&mut app, "org_7Hq2"),
        Err("22023".into()),
        "uuid by default"
    );
    su.execute("SELECT tenancy.set_tenant_id_format('text')", &[])
        .unwrap();
    assert_eq!(enter(&mut app, "org_7Hq2"), Ok("org_7Hq2".into()));
    su.execute("SELECT tenancy.set_tenant_id_format('uuid')", &[])
        .unwrap();
    assert_eq!(
        enter(&mut app, "org_7Hq2"),
        Err("22023".into()),
        "back to uuid at once"
    );
    assert_eq!(
        enter(&mut app, "5E000000-0000-4000-8000-000000000001"),
        Ok("5e000000-0000-4000-8000-000000000001".into())
    );
    assert_eq!(
        pid(&mut app),
        server,
        "one pooled server connection throughout"
    );
    // Rolled back: nothing changes, in that session or any other.
    let mut tx = su.transaction().unwrap();
    tx.execute("SELECT tenancy.set_tenant_id_format('text')", &[])
        .unwrap();
    tx.rollback().unwrap();
    assert_eq!(enter(&mut app, "org_7Hq2"), Err("22023".into()));
    assert_eq!(enter(&mut su, "org_7Hq2"), Err("22023".into()));
    // NULL leaves it to the per-database setting again; only a superuser sets it; a bad value.
    su.execute("SELECT tenancy.set_tenant_id_format(NULL)", &[])
        .unwrap();
    assert_eq!(
        count(&mut su, "SELECT count(*) FROM tenancy.database_settings"),
        0
    );
    let mut direct = cluster.connect("app", "app");
    assert_eq!(
        sqlstate(direct.execute("SELECT tenancy.set_tenant_id_format('text')", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(su.execute("SELECT tenancy.set_tenant_id_format('TEXT')", &[])),
        "22023"
    );
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM tenancy.protection_log WHERE action = 'tenant_id_format'"
        ),
        3
    );
}
