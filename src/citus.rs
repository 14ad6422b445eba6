//! Citus: what pg_tenancy does differently when the database is a Citus cluster's.
//!
//! * **Shard floors stay RESTRICTIVE.** Citus re-creates a distributed table's policies on its
//!   shards from its own deparser, which never writes `AS RESTRICTIVE` (Citus 14.0.1): on the
//!   shards the tenant floor became PERMISSIVE, and one unrelated permissive policy opened every
//!   tenant's rows. Every node refuses that outcome at the statement: a `CREATE POLICY` of
//!   pg_tenancy's floor is always made RESTRICTIVE ([`force_floor_restrictive`]), whoever sends
//!   it (Citus creating, moving or splitting a shard, or anyone else).
//! * **Policies Citus accepts.** Citus refuses subqueries in policies of distributed tables, so
//!   in a database with Citus `protect` writes `tenant_col = tenancy.current_org_id()` instead
//!   of the InitPlan form; both are pg_tenancy's definitions for the guards and the report.
//! * `isolation_report()` on the coordinator checks every shard placement (sql/citus.sql).
//!
//! Everything here is by name and catalog: nothing links against Citus.

use pgrx::prelude::*;
use std::ffi::CStr;

/// The tenant floor policy's name (policy.rs creates it).
pub(crate) const FLOOR_POLICY: &CStr = c"tenancy_tenant_floor";

/// A `CREATE POLICY` of the tenant floor is made RESTRICTIVE before it runs.
///
/// SAFETY: `stmt` is a parse tree node (or NULL) the caller is about to execute.
pub(crate) unsafe fn force_floor_restrictive(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreatePolicyStmt {
        return;
    }
    let create = stmt.cast::<pg_sys::CreatePolicyStmt>();
    if (*create).permissive
        && !(*create).policy_name.is_null()
        && CStr::from_ptr((*create).policy_name) == FLOOR_POLICY
    {
        (*create).permissive = false;
    }
}

/// Whether the Citus extension is installed in the current database.
pub(crate) fn installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'citus')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether `rel` is a Citus table (distributed, reference or in Citus's metadata). Only asked
/// when [`installed`] is true (pg_dist_partition exists then).
pub(crate) fn is_citus_table(rel: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
        &[rel.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// The logical table of a Citus shard (`clinic.patients` for `clinic.patients_102008`), as
/// `schema.name`; None when `name` is not a shard of a Citus table in `schema`. Only asked
/// where Citus is loaded (no catalog access elsewhere).
pub(crate) fn shard_logical_name(schema: &str, name: &str) -> Option<String> {
    shard_of(schema, name).map(|(_, logical)| logical)
}

/// The digits of a name of a shard's form (`<table>_<digits>`, Citus's naming).
fn shard_suffix(name: &str) -> Option<&str> {
    let (_, digits) = name.rsplit_once('_')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

/// The distributed table (oid, `schema.name`) whose shard `schema.name` is.
fn shard_of(schema: &str, name: &str) -> Option<(pg_sys::Oid, String)> {
    if !loaded() {
        return None;
    }
    let shard: i64 = shard_suffix(name)?.parse().ok()?;
    if !installed() {
        return None;
    }
    let (oid, logical_schema, logical_name) = Spi::connect(|client| {
        let rows = client.select(
            "SELECT s.logicalrelid::oid, n.nspname::text, c.relname::text
               FROM pg_catalog.pg_dist_shard s
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) s.logicalrelid
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE s.shardid OPERATOR(pg_catalog.=) $1
                -- placed on this node: a table named like another node's shard is no shard
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_dist_placement p, pg_catalog.pg_dist_local_group g
                             WHERE p.shardid OPERATOR(pg_catalog.=) s.shardid
                               AND p.groupid OPERATOR(pg_catalog.=) g.groupid)",
            None,
            &[shard.into()],
        )?;
        let Some(r) = rows.into_iter().next() else {
            return Ok::<_, pgrx::spi::SpiError>(None);
        };
        Ok(Some((
            r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
            r.get::<String>(2)?.unwrap_or_default(),
            r.get::<String>(3)?.unwrap_or_default(),
        )))
    })
    .ok()
    .flatten()?;
    // The shard's own name is the logical one with `_<shard id>` (Citus's naming).
    (logical_schema == schema && format!("{logical_name}_{shard}") == name)
        .then(|| (oid, format!("{logical_schema}.{logical_name}")))
}

// ---- The audit trigger on shards ------------------------------------------------------
//
// EXECUTE on tenancy.audit_trigger is revoked (a role attaching it to a table of its own
// could file events in any tenant's trail). Citus creates a distributed table's triggers on
// its shards as the table's owner (distributing, moving, splitting a shard; after the
// shard's policies, before its data), so where Citus is loaded such a CREATE TRIGGER runs as
// the bootstrap superuser when, and only when, it cannot file an event under a tenant whose
// row was not written: the table has row level security enabled and forced and pg_tenancy's
// RESTRICTIVE floor on exactly the trigger's one argument (the tenant column), and the
// trigger is an AFTER trigger without a WHEN condition (checked again once it exists, or the
// statement fails). The rows such a trigger sees are rows the floor let the writer write;
// and the trigger itself files a writer's events under that writer's tenant only
// (audit::trigger), whatever happens to the column later.

/// A CREATE TRIGGER of the audit trigger on a shard, running as the bootstrap superuser
/// until dropped.
pub(crate) struct ShardAuditTrigger {
    shard: pg_sys::Oid,
    trigger: String,
    func: pg_sys::Oid,
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

/// Before `stmt` runs: the audit trigger onto a protected table (see above) is let through.
///
/// SAFETY: `stmt` is a parse tree node (or NULL) about to be executed.
pub(crate) unsafe fn shard_audit_trigger(stmt: *mut pg_sys::Node) -> Option<ShardAuditTrigger> {
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreateTrigStmt || !loaded() {
        return None;
    }
    let create = stmt.cast::<pg_sys::CreateTrigStmt>();
    if (*create).trigname.is_null()
        || (*create).funcname.is_null()
        || !(*create).whenClause.is_null()
        || (*create).timing != pg_sys::TRIGGER_TYPE_AFTER as i16
    {
        return None;
    }
    let func = pg_sys::LookupFuncName((*create).funcname, 0, std::ptr::null(), true);
    if func == pg_sys::InvalidOid || !is_tenancy_function(func, c"audit_trigger") {
        return None;
    }
    let args = pgrx::PgList::<pg_sys::Node>::from_pg((*create).args);
    if args.len() != 1 {
        return None;
    }
    let column = string_node(args.get_ptr(0)?)?;
    // Not asked of Citus's metadata: create_distributed_table creates the shards' triggers
    // before the workers know the shards.
    let shard = crate::session_objects::relation_oid((*create).relation)?;
    let protected = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (
           SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_policy p ON p.polrelid OPERATOR(pg_catalog.=) c.oid
            WHERE c.oid OPERATOR(pg_catalog.=) $1 AND c.relrowsecurity AND c.relforcerowsecurity
              AND p.polname OPERATOR(pg_catalog.=) 'tenancy_tenant_floor' AND NOT p.polpermissive
              AND p.polcmd OPERATOR(pg_catalog.=) '*'
              AND tenancy.expression_text(p.polqual, p.polrelid) IN
                  (pg_catalog.format('(%s = tenancy.current_org_id())', pg_catalog.quote_ident($2)),
                   pg_catalog.format('(%s = tenancy.current_org_id_text())', pg_catalog.quote_ident($2)))
              AND tenancy.expression_text(p.polwithcheck, p.polrelid) IN
                  (pg_catalog.format('(%s = tenancy.current_org_id())', pg_catalog.quote_ident($2)),
                   pg_catalog.format('(%s = tenancy.current_org_id_text())', pg_catalog.quote_ident($2))))",
        &[shard.into(), column.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !protected {
        return None;
    }
    let trigger = CStr::from_ptr((*create).trigname)
        .to_string_lossy()
        .into_owned();
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
    pg_sys::SetUserIdAndSecContext(
        pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
        saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
    );
    Some(ShardAuditTrigger {
        shard,
        trigger,
        func,
        saved_user,
        saved_context,
    })
}

impl ShardAuditTrigger {
    /// After the statement ran (as the caller again): the shard's new trigger is the audit
    /// trigger, AFTER, with one argument and no condition.
    pub(crate) fn check(self) {
        let (shard, trigger, func) = (self.shard, self.trigger.clone(), self.func);
        drop(self);
        let as_asked = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (
               SELECT 1 FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid OPERATOR(pg_catalog.=) $1 AND t.tgname OPERATOR(pg_catalog.=) $2
                  AND t.tgfoid OPERATOR(pg_catalog.=) $3 AND t.tgqual IS NULL
                  AND t.tgnargs OPERATOR(pg_catalog.=) 1
                  AND (t.tgtype::int4 OPERATOR(pg_catalog.&) 66) OPERATOR(pg_catalog.=) 0)",
            &[shard.into(), trigger.as_str().into(), func.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !as_asked {
            TenancyError::ShardWeakening {
                command: "CREATE TRIGGER",
            }
            .report();
        }
    }
}

impl Drop for ShardAuditTrigger {
    fn drop(&mut self) {
        // SAFETY: restores the user and security context saved when this was made.
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}

/// The text of a String parse node (a trigger argument).
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
unsafe fn string_node(node: *mut pg_sys::Node) -> Option<String> {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_String {
        return None;
    }
    cstr_owned((*node.cast::<pg_sys::String>()).sval)
}

/// Citus 14 needs PostgreSQL 16 or later: nothing to read before.
#[cfg(any(feature = "pg13", feature = "pg14"))]
unsafe fn string_node(_node: *mut pg_sys::Node) -> Option<String> {
    None
}

/// Whether `func` is `tenancy.<name>`.
unsafe fn is_tenancy_function(func: pg_sys::Oid, name: &CStr) -> bool {
    let ns = pg_sys::get_func_namespace(func);
    let fname = pg_sys::get_func_name(func);
    let nsname = pg_sys::get_namespace_name(ns);
    !fname.is_null()
        && !nsname.is_null()
        && CStr::from_ptr(fname) == name
        && CStr::from_ptr(nsname) == c"tenancy"
}

/// An owned copy of a palloc'd C string (None for NULL).
unsafe fn cstr_owned(p: *mut c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

/// This node's Citus group (`pg_dist_local_group`): 0 on a coordinator, and where Citus is
/// not installed or not loaded; a worker's group from 1. Read once per transaction (a node
/// joins a cluster while backends run).
pub(crate) fn local_group() -> i32 {
    if !loaded() {
        return 0;
    }
    if let Some(group) = LOCAL_GROUP.with(|g| g.get()) {
        return group;
    }
    let group = if installed() {
        Spi::get_one::<i32>("SELECT groupid FROM pg_catalog.pg_dist_local_group")
            .ok()
            .flatten()
            .unwrap_or(0)
    } else {
        0
    };
    LOCAL_GROUP.with(|g| g.set(Some(group)));
    group
}

thread_local! {
    /// [`local_group`] of the current transaction.
    static LOCAL_GROUP: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

// ---- The tenant context on every node of a distributed transaction ----------------------
//
// The coordinator's `set_org` hands its workers the context as a token in the setting
// `tenancy.cluster_context`, through Citus's own propagation of `SET LOCAL` (each worker
// connection of the distributed transaction receives it when it joins, and those already in
// it at once). The token is minted only by `set_org` and accepted by a node only when:
// its HMAC-SHA256 under the cluster key (`tenancy.cluster_key_file`, the same file on every
// node) is right; it has not expired; the receiving backend works for the same coordinator
// backend (Citus's global pid) inside a distributed transaction; and the transaction holds
// no other context (another token, or `set_org` of another tenant). Any other write is
// refused: plain `SET`, a forged or altered token, one of another coordinator backend.

use crate::error::{Result, TenancyError};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CString};
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How long a minted token is accepted (a worker joining a long transaction late needs it).
const TOKEN_LIFETIME_SECS: u64 = 3600;
const TOKEN_VERSION: &str = "c1";
const MIN_KEY_BYTES: usize = 32;

static CLUSTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static CLUSTER_CONTEXT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The context a token installed in this transaction (as the assign hook saw it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClusterContext {
    pub org: String,
    pub actor: Option<String>,
    pub signed: bool,
    nonce: String,
    /// The backend was seen inside a distributed transaction.
    confirmed: bool,
}

thread_local! {
    static INSTALLED: RefCell<Option<ClusterContext>> = const { RefCell::new(None) };
    /// Open only while `set_org` writes the setting on the coordinator.
    static WRITING: Cell<bool> = const { Cell::new(false) };
    static KEY: RefCell<Option<(String, Zeroizing<Vec<u8>>)>> = const { RefCell::new(None) };
}

/// Defines `tenancy.cluster_key_file` and `tenancy.cluster_context`; from `_PG_init`.
pub(crate) fn define_gucs() {
    // SAFETY: the hooks are `#[pg_guard]`ed and have the signatures Postgres expects.
    unsafe {
        GucRegistry::define_string_guc(
            c"tenancy.cluster_key_file",
            c"Path of the HMAC-SHA256 key that signs tenant contexts handed to Citus workers; the same file on every node.",
            c"A path, never key bytes. The file must belong to the server's OS user and not be readable by group or others. Read on first use in each backend.",
            &CLUSTER_KEY_FILE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"tenancy.cluster_context",
            c"The tenant context a Citus coordinator hands to its workers; written by tenancy.set_org() only.",
            c"A signed token bound to the coordinator backend and its distributed transaction.",
            &CLUSTER_CONTEXT,
            GucContext::Userset,
            GucFlags::NO_RESET_ALL
                | GucFlags::DISALLOW_IN_FILE
                | GucFlags::NOT_WHILE_SEC_REST
                | GucFlags::NO_SHOW_ALL
                | GucFlags::SUPERUSER_ONLY,
            Some(check_cluster_context),
            Some(assign_cluster_context),
            None,
        );
    }
}

/// The context a token installed in this transaction, once the backend was seen inside a
/// distributed transaction (before that, none: fail closed).
pub(crate) fn installed_context() -> Option<ClusterContext> {
    INSTALLED.with(|c| c.borrow().clone().filter(|ctx| ctx.confirmed))
}

/// `f` over the installed tenant id's bytes (no copy), `None` without a confirmed one.
pub(crate) fn with_installed_org<R>(f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    INSTALLED.with(|c| {
        f(c.borrow()
            .as_ref()
            .filter(|ctx| ctx.confirmed)
            .map(|ctx| ctx.org.as_bytes()))
    })
}

/// Before the first plan that reads a table under a handed-over context: the backend must
/// be inside a distributed transaction (Citus assigned it one), or the context is refused
/// (42501). Plans without a table (Citus's own `assign_distributed_transaction_id`, which
/// comes after the SET LOCALs) wait; until then the context reads as unset.
///
/// SAFETY: `query_desc` is the executor's, about to start.
pub(crate) unsafe fn confirm_distributed(query_desc: *mut pg_sys::QueryDesc) {
    if INSTALLED.with(|c| c.borrow().as_ref().is_none_or(|ctx| ctx.confirmed)) {
        return;
    }
    let stmt = (*query_desc).plannedstmt;
    if stmt.is_null() {
        return;
    }
    let rtable = pgrx::PgList::<pg_sys::RangeTblEntry>::from_pg((*stmt).rtable);
    if !rtable
        .iter_ptr()
        .any(|rte| (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION)
    {
        return;
    }
    let pending = INSTALLED.with(|c| {
        let mut slot = c.borrow_mut();
        match slot.as_mut() {
            Some(ctx) if !ctx.confirmed => {
                // Set first: the query below runs through this hook again.
                ctx.confirmed = true;
                true
            }
            _ => false,
        }
    });
    if !pending {
        return;
    }
    let number = Spi::get_one::<i64>(
        "SELECT transaction_number FROM pg_catalog.get_current_transaction_id()",
    )
    .ok()
    .flatten()
    .unwrap_or(0);
    if number == 0 {
        INSTALLED.with(|c| c.borrow_mut().take());
        TenancyError::ClusterContextRefused {
            reason: "this backend is not inside a distributed transaction",
        }
        .report();
    }
}

/// End of the transaction: the installed context goes (the setting is reverted too).
pub(crate) fn at_xact_end() {
    INSTALLED.with(|c| c.borrow_mut().take());
    LOCAL_GROUP.with(|g| g.set(None));
    WRITING.with(|w| w.set(false));
}

/// The fields of a token, before its MAC is checked.
struct Token<'a> {
    gpid: u64,
    expiry: u64,
    nonce: &'a str,
    signed: bool,
    org: String,
    actor: Option<String>,
    signed_part: &'a str,
    mac: &'a str,
}

fn parse(token: &str) -> std::result::Result<Token<'_>, &'static str> {
    let (signed_part, mac) = token
        .rsplit_once(':')
        .ok_or("not a cluster context token")?;
    let f: Vec<&str> = signed_part.split(':').collect();
    if f.len() != 7 || f[0] != TOKEN_VERSION {
        return Err("not a cluster context token");
    }
    let text = |h: &str| -> std::result::Result<String, &'static str> {
        String::from_utf8(hex::decode(h).map_err(|_| "malformed token")?)
            .map_err(|_| "malformed token")
    };
    Ok(Token {
        gpid: f[1].parse().map_err(|_| "malformed token")?,
        expiry: f[2].parse().map_err(|_| "malformed token")?,
        nonce: f[3],
        signed: match f[4] {
            "1" => true,
            "0" => false,
            _ => return Err("malformed token"),
        },
        org: text(f[5])?,
        actor: if f[6] == "-" { None } else { Some(text(f[6])?) },
        signed_part,
        mac,
    })
}

fn mac_of(key: &[u8], signed_part: &str) -> HmacSha256 {
    use hmac::Mac;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(b"pg_tenancy-cluster-context\0");
    mac.update(signed_part.as_bytes());
    mac
}

/// A token for `org` and `actor`, bound to coordinator backend `gpid`.
fn mint(
    key: &[u8],
    gpid: u64,
    expiry: u64,
    org: &str,
    actor: Option<&str>,
    signed: bool,
) -> String {
    use hmac::Mac;
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).expect("the OS has randomness");
    let signed_part = format!(
        "{TOKEN_VERSION}:{gpid}:{expiry}:{}:{}:{}:{}",
        hex::encode(nonce),
        if signed { 1 } else { 0 },
        hex::encode(org),
        actor.map(hex::encode).unwrap_or_else(|| "-".into()),
    );
    let tag = mac_of(key, &signed_part).finalize().into_bytes();
    format!("{signed_part}:{}", hex::encode(tag))
}

/// Checks a token's MAC and lifetime.
fn verify<'a>(
    key: &[u8],
    token: &'a str,
    now: u64,
) -> std::result::Result<Token<'a>, &'static str> {
    use hmac::Mac;
    let t = parse(token)?;
    let tag = hex::decode(t.mac).map_err(|_| "malformed token")?;
    mac_of(key, t.signed_part)
        .verify_slice(&tag)
        .map_err(|_| "the token's signature does not match (another cluster key, or altered)")?;
    if t.expiry <= now {
        return Err("the token has expired");
    }
    Ok(t)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cluster key, read once per backend (again when the setting names another file).
fn with_key<T>(f: impl FnOnce(&[u8]) -> T) -> std::result::Result<T, TenancyError> {
    let path = CLUSTER_KEY_FILE
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
        .ok_or(TenancyError::ClusterKeyMissing)?;
    KEY.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(p, _)| *p != path) {
            let problem = |p: crate::keyfile::KeyFileProblem| TenancyError::KeyFile {
                path: path.clone(),
                reason: p.0,
            };
            let raw = crate::keyfile::read_secret_file(&path).map_err(problem)?;
            let key = crate::keyfile::decode_hex_key(&raw, MIN_KEY_BYTES).map_err(problem)?;
            *slot = Some((path.clone(), key));
        }
        Ok(f(&slot.as_ref().expect("loaded just above").1))
    })
}

/// Whether Citus is loaded into this backend (its settings exist): no catalog access.
pub(crate) fn loaded() -> bool {
    // SAFETY: a lookup by NUL-terminated name; missing_ok returns NULL for an unknown one.
    unsafe {
        !pg_sys::GetConfigOption(c"citus.propagate_set_commands".as_ptr(), true, false).is_null()
    }
}

/// What `set_org` does for Citus on this node, read once before it enters the tenant: `None`
/// where Citus is not in play (no catalog access where Citus is not loaded) or the node has no
/// workers to hand the context to.
pub(crate) struct Handover {
    /// Citus's global id of this (coordinator) backend, which the token is bound to.
    gpid: u64,
}

/// Before `set_org` enters a tenant (and before a signed token is spent): refuses it on a node
/// where Citus runs a distributed transaction that another node started (a delegated
/// function, a command sent by the coordinator), since the tenant of a distributed
/// transaction is entered once, on its coordinator, and handed to every node (two nodes
/// entering two tenants would let one transaction read both); on a coordinator with workers,
/// returns what [`Handover::hand_over`] needs.
pub(crate) fn before_entry() -> Result<Option<Handover>> {
    if !loaded() || !installed() {
        return Ok(None);
    }
    let (remote, has_workers, gpid) = Spi::connect(|client| {
        let rows = client.select(
            "SELECT t.transaction_number OPERATOR(pg_catalog.<>) 0
                      AND t.initiator_node_identifier OPERATOR(pg_catalog.<>) g.groupid,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node n
                             WHERE n.isactive AND n.groupid OPERATOR(pg_catalog.<>) g.groupid),
                    pg_catalog.citus_backend_gpid()
               FROM pg_catalog.get_current_transaction_id() t, pg_catalog.pg_dist_local_group g",
            None,
            &[],
        )?;
        let r = rows.first();
        Ok::<_, pgrx::spi::SpiError>((
            r.get::<bool>(1)?.unwrap_or(false),
            r.get::<bool>(2)?.unwrap_or(false),
            r.get::<i64>(3)?.unwrap_or(0),
        ))
    })
    .map_err(|e| TenancyError::spi("reading Citus's transaction and nodes", e))?;
    if remote {
        return Err(TenancyError::ClusterContextRefused {
            reason: "a node inside another node's distributed transaction takes its tenant from that transaction's coordinator: call tenancy.set_org() there",
        });
    }
    Ok(has_workers.then_some(Handover { gpid: gpid as u64 }))
}

impl Handover {
    /// Hands the context just entered to every worker connection of this distributed
    /// transaction.
    pub(crate) fn hand_over(self, org: &str, actor: Option<&str>, signed: bool) -> Result<()> {
        let gpid = self.gpid;
        let token = with_key(|key| {
            mint(
                key,
                gpid,
                now_secs() + TOKEN_LIFETIME_SECS,
                org,
                actor,
                signed,
            )
        })?;
        struct Close;
        impl Drop for Close {
            fn drop(&mut self) {
                WRITING.with(|w| w.set(false));
            }
        }
        restrict_remote_command_logging();
        // Through SQL, so that Citus's utility hook sees the SET LOCAL and propagates it (the
        // token is hex, digits, colons and "c1": nothing to quote).
        Spi::run("SET LOCAL citus.propagate_set_commands = 'local'")
            .map_err(|e| TenancyError::spi("turning on Citus's SET LOCAL propagation", e))?;
        WRITING.with(|w| w.set(true));
        let _close = Close;
        Spi::run(&format!("SET LOCAL tenancy.cluster_context = '{token}'"))
            .map_err(|e| TenancyError::spi("handing the tenant context to Citus's workers", e))?;
        Ok(())
    }
}

// ---- No token in a message ------------------------------------------------------------
//
// Citus's own messages carry the statements it sends (`citus.log_remote_commands`, which any
// role may turn on, shows each worker's `SET LOCAL tenancy.cluster_context = '<token>'` to
// the client as a NOTICE), and a worker logs them (`log_statement`, an error's statement).
// Every message PostgreSQL emits passes the log hook: a token in it is replaced, and a
// statement carrying one is not printed.

/// `citus.log_remote_commands` shows a session the commands Citus sends for it, the token's
/// `SET LOCAL` among them, as NOTICEs that reach only the client (the log hook does not see
/// those). Citus lets any role turn it on; here it becomes a superuser's setting (called from
/// `_PG_init`, after Citus's, which `shared_preload_libraries` lists first, and again before
/// each hand-over). Citus 14 needs PostgreSQL 16 or later, which exports the lookup.
pub(crate) fn restrict_remote_command_logging() {
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: a lookup in the GUC table by name (NULL when Citus is not loaded); the context
    // field of a setting is read by the GUC machinery at each SET, never cached.
    unsafe {
        let g = pg_sys::find_option(
            c"citus.log_remote_commands".as_ptr(),
            false,
            true,
            pg_sys::WARNING as i32,
        );
        if !g.is_null() && (*g).context == pg_sys::GucContext::PGC_USERSET {
            (*g).context = pg_sys::GucContext::PGC_SUSET;
        }
    }
}

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;

/// Installs the log hook (from `_PG_init`).
pub(crate) fn init_log_redaction() {
    // SAFETY: hooks are installed once, at library load, on the main thread.
    unsafe {
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_tokens);
    }
}

const HIDDEN: &str = "<a token, hidden by pg_tenancy>";

/// `text` with every cluster context token (`c1:` and its digits, hex and colons) hidden;
/// None when it holds none.
fn without_tokens(text: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(text).ok()?;
    if !text.contains("c1:") {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("c1:") {
        let tail = &rest[at + 3..];
        let len = tail
            .bytes()
            .take_while(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'-')
            .count();
        out.push_str(&rest[..at]);
        if len >= 16 {
            out.push_str(HIDDEN);
            changed = true;
        } else {
            out.push_str(&rest[at..at + 3 + len]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[pg_guard]
unsafe extern "C-unwind" fn redact_tokens(edata: *mut pg_sys::ErrorData) {
    if !edata.is_null() {
        for field in [
            &mut (*edata).message,
            &mut (*edata).detail,
            &mut (*edata).detail_log,
            &mut (*edata).hint,
            &mut (*edata).context,
            &mut (*edata).internalquery,
        ] {
            if field.is_null() {
                continue;
            }
            if let Some(clean) = without_tokens(CStr::from_ptr(*field).to_bytes()) {
                if let Ok(c) = CString::new(clean) {
                    // In ErrorContext, where the message lives.
                    *field = pg_sys::pstrdup(c.as_ptr());
                }
            }
        }
        let statement = pg_sys::debug_query_string;
        if !statement.is_null() && without_tokens(CStr::from_ptr(statement).to_bytes()).is_some() {
            (*edata).hide_stmt = true;
        }
    }
    if let Some(prev) = PREV_EMIT_LOG {
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(edata));
    }
}

/// Refuses a write of `tenancy.cluster_context` from a check hook, with 42501.
unsafe fn refuse(reason: &str) -> bool {
    pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
    let msg = CString::new(format!("tenancy.cluster_context refused: {reason}"))
        .unwrap_or_else(|_| c"tenancy.cluster_context refused".into());
    pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(msg.as_ptr());
    pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(
        c"Only tenancy.set_org() on the Citus coordinator writes this setting.".as_ptr(),
    );
    false
}

/// Whether this backend may take `value` as its handed-over context: the checks of the
/// module comment, with the reason for a refusal.
///
/// SAFETY: called inside a transaction's statement (check hook or utility hook).
unsafe fn accept(value: &str) -> std::result::Result<(), &'static str> {
    if !pg_sys::IsTransactionState() || !loaded() {
        return Err("not inside a Citus transaction");
    }
    let token = match with_key(|key| {
        verify(key, value, now_secs()).map(|t| (t.gpid, t.nonce.to_string(), t.org))
    }) {
        Err(_) => {
            return Err(
                "the cluster key file (tenancy.cluster_key_file) is not usable on this node",
            )
        }
        Ok(Err(reason)) => return Err(reason),
        Ok(Ok(t)) => t,
    };
    let (gpid, nonce, org) = token;
    // The receiving backend must work for the coordinator backend the token was minted for
    // (Citus sends the SET LOCALs before it assigns the distributed transaction id: that
    // one is confirmed before the first query, by `confirm_distributed`).
    match Spi::get_one::<i64>("SELECT pg_catalog.citus_backend_gpid()") {
        Ok(Some(g)) if g as u64 == gpid => {}
        Ok(_) => return Err("the token belongs to another coordinator backend"),
        Err(_) => return Err("Citus's backend identity cannot be read here"),
    }
    if let Some(current) = INSTALLED.with(|c| c.borrow().clone()) {
        if current.nonce != nonce {
            return Err("another tenant context is already installed in this transaction");
        }
    }
    // A tenant entered here by set_org must be the token's.
    let local = pg_sys::GetConfigOption(c"app.current_org_id".as_ptr(), true, false);
    if !local.is_null() {
        let local = CStr::from_ptr(local).to_bytes();
        if !local.is_empty() && local != org.as_bytes() {
            return Err("another tenant context is already set in this transaction");
        }
    }
    Ok(())
}

/// A `SET` of `tenancy.cluster_context` is refused before any other hook sees it (Citus's
/// would send a forged value on to the workers first, and fail with its own XX000), unless
/// it is set_org's own or a token this backend accepts (Citus's, on a worker).
///
/// SAFETY: `stmt` is a parse tree node (or NULL).
pub(crate) unsafe fn check_set_statement(stmt: *mut pg_sys::Node) {
    if stmt.is_null()
        || (*stmt).type_ != pg_sys::NodeTag::T_VariableSetStmt
        || WRITING.with(Cell::get)
    {
        return;
    }
    let set = stmt.cast::<pg_sys::VariableSetStmt>();
    if (*set).name.is_null() || CStr::from_ptr((*set).name) != c"tenancy.cluster_context" {
        return;
    }
    if (*set).kind != pg_sys::VariableSetKind::VAR_SET_VALUE {
        return;
    }
    // The statement text carries the token: pg_stat_activity would show it to every backend
    // of the same role (Citus connects as the application's role) until the next statement,
    // and a token read there could be replayed. The activity is replaced now, before the
    // value is even checked (a refused one is nobody's business either).
    pg_sys::pgstat_report_activity(
        pg_sys::BackendState::STATE_RUNNING,
        c"SET LOCAL tenancy.cluster_context = <a token, hidden by pg_tenancy>".as_ptr(),
    );
    // PostgreSQL's own flattening of the SET's arguments (the string as the check hook gets it).
    let flat = pg_sys::ExtractSetVariableArgs(set);
    let value = (!flat.is_null()).then(|| CStr::from_ptr(flat).to_string_lossy().into_owned());
    let reason = match value.as_deref() {
        Some("") => return,
        Some(v) => match accept(v) {
            Ok(()) => return,
            Err(reason) => reason,
        },
        None => "not a cluster context token",
    };
    TenancyError::ClusterContextRefused { reason }.report();
}

#[pg_guard]
unsafe extern "C-unwind" fn check_cluster_context(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    let value = if newval.is_null() || (*newval).is_null() {
        ""
    } else {
        CStr::from_ptr(*newval).to_str().unwrap_or("\u{0}")
    };
    if value.is_empty()
        || source == pg_sys::GucSource::PGC_S_DEFAULT
        || WRITING.with(Cell::get)
        || pg_sys::InitializingParallelWorker
    {
        return true;
    }
    match accept(value) {
        Ok(()) => true,
        Err(reason) => refuse(reason),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_cluster_context(newval: *const c_char, _extra: *mut c_void) {
    // Values reaching here passed the check hook (or are reverts to ones that did).
    let parsed = (!newval.is_null())
        .then(|| CStr::from_ptr(newval).to_str().ok())
        .flatten()
        .filter(|v| !v.is_empty())
        .and_then(|v| parse(v).ok())
        .map(|t| ClusterContext {
            org: t.org,
            actor: t.actor,
            signed: t.signed,
            nonce: t.nonce.to_string(),
            // The coordinator's own write: its transaction is the distributed one.
            confirmed: WRITING.with(Cell::get),
        });
    INSTALLED.with(|c| {
        let mut slot = c.borrow_mut();
        // The same token again (a savepoint's revert) keeps its confirmation.
        if slot.as_ref().map(|s| &s.nonce) != parsed.as_ref().map(|p| &p.nonce) {
            *slot = parsed;
        }
    });
}

// ---- Guards on the nodes that hold shards ------------------------------------------------
//
// The drift guards (sql/guards.sql) know the tables in this node's registry; a worker's shards
// of a protected table are not in it, and DDL run on a worker reaches them without passing the
// coordinator. Where Citus is loaded, a role that is not a superuser may not weaken any table
// carrying pg_tenancy's floor policy: disable or un-force row level security, disable,
// re-enable (ALWAYS -> ORIGIN) or drop a trigger, add, alter or drop a policy, TRUNCATE. Everything the
// coordinator lets such a role do to a distributed table reaches the shards as other
// statements, so nothing legitimate is refused; a superuser (Citus's own maintenance among
// them) is trusted.

/// Refuses a statement that weakens a protected shard (see above), with 42501.
///
/// SAFETY: `stmt` is a parse tree node (or NULL) about to be executed.
pub(crate) unsafe fn refuse_shard_weakening(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || !loaded() || pg_sys::superuser() {
        return;
    }
    use pg_sys::AlterTableType as At;
    let (relation, command): (*mut pg_sys::RangeVar, &'static str) = match (*stmt).type_ {
        pg_sys::NodeTag::T_AlterTableStmt => {
            let alter = stmt.cast::<pg_sys::AlterTableStmt>();
            let cmds = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
            let weakening = cmds.iter_ptr().find_map(|cmd| match (*cmd).subtype {
                At::AT_DisableRowSecurity => Some("DISABLE ROW LEVEL SECURITY"),
                At::AT_NoForceRowSecurity => Some("NO FORCE ROW LEVEL SECURITY"),
                At::AT_DisableTrig | At::AT_DisableTrigAll | At::AT_DisableTrigUser => {
                    Some("DISABLE TRIGGER")
                }
                At::AT_EnableTrig | At::AT_EnableReplicaTrig => Some("ENABLE [REPLICA] TRIGGER"),
                // A protected table as another table's child: reads through the parent skip
                // the child's row level security and its statement triggers.
                At::AT_AddInherit => Some("INHERIT"),
                _ => None,
            });
            // ATTACH PARTITION names the child in the command, INHERIT the parent: neither
            // may be a protected table (a parent's reads include its children's rows).
            for cmd in cmds.iter_ptr() {
                if (*cmd).subtype == At::AT_AttachPartition && !(*cmd).def.is_null() {
                    let part = (*cmd).def.cast::<pg_sys::PartitionCmd>();
                    refuse_if_protected((*part).name, "ATTACH PARTITION");
                    refuse_if_protected((*alter).relation, "ATTACH PARTITION");
                }
                if (*cmd).subtype == At::AT_AddInherit && !(*cmd).def.is_null() {
                    refuse_if_protected((*cmd).def.cast::<pg_sys::RangeVar>(), "INHERIT");
                }
            }
            match weakening {
                Some(c) => ((*alter).relation, c),
                None => return,
            }
        }
        pg_sys::NodeTag::T_CreatePolicyStmt => {
            let table = (*stmt.cast::<pg_sys::CreatePolicyStmt>()).table;
            // A table made in this transaction is being built (Citus creating a shard to
            // distribute, move or split: its policies follow its floor): nothing to weaken.
            if crate::session_objects::relation_oid(table).is_some_and(|rel| created_here(rel)) {
                return;
            }
            (table, "CREATE POLICY")
        }
        pg_sys::NodeTag::T_AlterPolicyStmt => (
            (*stmt.cast::<pg_sys::AlterPolicyStmt>()).table,
            "ALTER POLICY",
        ),
        // A shard renamed, moved to another schema or dropped leaves its name free for a
        // table without protection, which the coordinator would then write the tenant's
        // rows into (Citus routes by name).
        // ALTER INDEX, VIEW, SEQUENCE ... RENAME / SET SCHEMA take a table too.
        pg_sys::NodeTag::T_RenameStmt => {
            let rename = stmt.cast::<pg_sys::RenameStmt>();
            if !renames_relation((*rename).renameType) {
                return;
            }
            ((*rename).relation, "RENAME")
        }
        pg_sys::NodeTag::T_AlterObjectSchemaStmt => {
            let alter = stmt.cast::<pg_sys::AlterObjectSchemaStmt>();
            if !renames_relation((*alter).objectType) {
                return;
            }
            ((*alter).relation, "SET SCHEMA")
        }
        // A new child of a protected shard: its rows appear in the shard's tenants' reads
        // (and take the owner's writes into another tenant's data).
        pg_sys::NodeTag::T_CreateStmt => {
            let create = stmt.cast::<pg_sys::CreateStmt>();
            let parents = pgrx::PgList::<pg_sys::RangeVar>::from_pg((*create).inhRelations);
            for rv in parents.iter_ptr() {
                refuse_if_protected(rv, "CREATE TABLE ... INHERITS / PARTITION OF");
            }
            return;
        }
        pg_sys::NodeTag::T_DropStmt
            if (*stmt.cast::<pg_sys::DropStmt>()).removeType
                == pg_sys::ObjectType::OBJECT_TABLE =>
        {
            let objects =
                pgrx::PgList::<pg_sys::List>::from_pg((*stmt.cast::<pg_sys::DropStmt>()).objects);
            for names in objects.iter_ptr() {
                let rv = pg_sys::makeRangeVarFromNameList(names);
                if let Some(rel) = floor_table(rv) {
                    if is_shard(rel) || named_like_a_shard(rel) {
                        TenancyError::ShardWeakening {
                            command: "DROP TABLE",
                        }
                        .report();
                    }
                }
            }
            return;
        }
        pg_sys::NodeTag::T_DropStmt => {
            let drop = stmt.cast::<pg_sys::DropStmt>();
            let command = match (*drop).removeType {
                pg_sys::ObjectType::OBJECT_POLICY => "DROP POLICY",
                pg_sys::ObjectType::OBJECT_TRIGGER => "DROP TRIGGER",
                _ => return,
            };
            // Each object is (qualified relation name ..., policy or trigger name).
            let objects = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
            for names in objects.iter_ptr() {
                let n = pg_sys::list_length(names);
                if n >= 2 {
                    let rel = pg_sys::list_truncate(pg_sys::list_copy(names), n - 1);
                    refuse_if_protected(pg_sys::makeRangeVarFromNameList(rel), command);
                }
            }
            return;
        }
        // pg_tenancy refuses TRUNCATE of a protected table on the coordinator, so none
        // reaches a shard legitimately (Citus's citus.enable_manual_changes_to_shards, which
        // any role may set, would otherwise let the owner empty every tenant's shard).
        pg_sys::NodeTag::T_TruncateStmt => {
            let rels = pgrx::PgList::<pg_sys::RangeVar>::from_pg(
                (*stmt.cast::<pg_sys::TruncateStmt>()).relations,
            );
            for rv in rels.iter_ptr() {
                refuse_if_protected(rv, "TRUNCATE");
            }
            return;
        }
        _ => return,
    };
    refuse_if_protected(relation, command);
}

/// Whether `rel` is a Citus shard (by its name and Citus's metadata).
unsafe fn is_shard(rel: pg_sys::Oid) -> bool {
    match (
        cstr_owned(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(rel))),
        cstr_owned(pg_sys::get_rel_name(rel)),
    ) {
        (Some(schema), Some(name)) => shard_of(&schema, &name).is_some(),
        _ => false,
    }
}

/// Whether `kind` (of a RENAME or SET SCHEMA) may name a table.
fn renames_relation(kind: pg_sys::ObjectType::Type) -> bool {
    use pg_sys::ObjectType::*;
    matches!(
        kind,
        OBJECT_TABLE
            | OBJECT_INDEX
            | OBJECT_VIEW
            | OBJECT_MATVIEW
            | OBJECT_SEQUENCE
            | OBJECT_FOREIGN_TABLE
    )
}

/// Whether `rel`'s name has a shard's form (`<name>_<digits>`), whatever Citus's metadata on
/// this node says (a role may remove a worker's metadata of a table).
unsafe fn named_like_a_shard(rel: pg_sys::Oid) -> bool {
    cstr_owned(pg_sys::get_rel_name(rel)).is_some_and(|name| shard_suffix(&name).is_some())
}

/// Before an object is dropped (object access hook, OAT_DROP): on a Citus node a role that is
/// not a superuser may not drop pg_tenancy's floor policy in any way, a cascade included
/// (`DROP COLUMN <tenant column> CASCADE` took it, and with it the guards' hold on the shard).
///
/// SAFETY: called by the object access hook, inside a transaction.
pub(crate) unsafe fn refuse_floor_drop(class_id: pg_sys::Oid, object_id: pg_sys::Oid) {
    // pg_policy's fixed oid (PolicyRelationId, not among pgrx's bindings).
    const POLICY_RELATION_ID: u32 = 3256;
    if class_id != pg_sys::Oid::from(POLICY_RELATION_ID) || pg_sys::superuser() || !loaded() {
        return;
    }
    let floor = Spi::get_one_with_args::<bool>(
        "SELECT polname OPERATOR(pg_catalog.=) 'tenancy_tenant_floor' FROM pg_catalog.pg_policy
          WHERE oid OPERATOR(pg_catalog.=) $1",
        &[object_id.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if floor {
        TenancyError::ShardWeakening {
            command: "a drop of the tenant floor policy",
        }
        .report();
    }
}

/// Citus functions that copy a table's rows as the calling role (moving, copying, splitting,
/// rebalancing, draining shards; changing or undoing a distribution). Run by a role that row
/// level security binds, the copy of a protected table reads no row (no tenant context: the
/// floor lets none through), and the source is then dropped: every tenant's rows lost,
/// without an audit event.
const ROW_COPYING_FUNCTIONS: [&CStr; 15] = [
    c"citus_move_shard_placement",
    c"master_move_shard_placement",
    c"citus_copy_shard_placement",
    c"master_copy_shard_placement",
    c"isolate_tenant_to_new_shard",
    c"citus_split_shard_by_split_points",
    c"create_distributed_table_concurrently",
    c"rebalance_table_shards",
    c"citus_rebalance_start",
    c"replicate_table_shards",
    c"citus_drain_node",
    c"master_drain_node",
    c"alter_distributed_table",
    c"undistribute_table",
    c"alter_table_set_access_method",
];

/// Before a function runs (object access hook, OAT_FUNCTION_EXECUTE): a role that is not a
/// superuser may not run Citus's row-copying functions (above) in a database with pg_tenancy.
///
/// SAFETY: `func` is a function about to be executed, inside a transaction.
pub(crate) unsafe fn refuse_row_copy_by_non_superuser(func: pg_sys::Oid) {
    if pg_sys::superuser() || !loaded() {
        return;
    }
    if pg_sys::get_func_namespace(func) != pg_sys::PG_CATALOG_NAMESPACE.into() {
        return;
    }
    let name = pg_sys::get_func_name(func);
    if name.is_null() {
        return;
    }
    let name = CStr::from_ptr(name);
    let Some(found) = ROW_COPYING_FUNCTIONS.iter().find(|f| **f == name) else {
        return;
    };
    if pg_sys::get_extension_oid(c"pg_tenancy".as_ptr(), true) == pg_sys::InvalidOid {
        return;
    }
    TenancyError::ShardCopyRefused {
        function: found.to_str().unwrap_or("a Citus function"),
    }
    .report();
}

/// Whether `rel` was created by the current transaction.
unsafe fn created_here(rel: pg_sys::Oid) -> bool {
    let r = pg_sys::RelationIdGetRelation(rel);
    if r.is_null() {
        return false;
    }
    // InvalidSubTransactionId is 0.
    let created = (*r).rd_createSubid != 0;
    pg_sys::RelationClose(r);
    created
}

/// Refuses `command` when `relation` carries pg_tenancy's floor policy.
unsafe fn refuse_if_protected(relation: *mut pg_sys::RangeVar, command: &'static str) {
    if floor_table(relation).is_some() {
        TenancyError::ShardWeakening { command }.report();
    }
}

/// After DDL by a role that is not a superuser on a Citus node: a table carrying pg_tenancy's
/// floor must not be left with that role's code over its rows (a trigger, rule, index
/// expression, constraint, default or statistics expression of a function it owns would see
/// every tenant's rows on a shard). The same test as the guards' on the coordinator
/// (`tenancy.foreign_code_problem`); the statement is refused (and undone) with 42501.
///
/// SAFETY: `stmt` is the parse tree node that just ran (or NULL).
pub(crate) unsafe fn refuse_foreign_code_on_shard(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || !loaded() || pg_sys::superuser() {
        return;
    }
    let relation = match (*stmt).type_ {
        pg_sys::NodeTag::T_AlterTableStmt => (*stmt.cast::<pg_sys::AlterTableStmt>()).relation,
        pg_sys::NodeTag::T_IndexStmt => (*stmt.cast::<pg_sys::IndexStmt>()).relation,
        pg_sys::NodeTag::T_CreateTrigStmt => (*stmt.cast::<pg_sys::CreateTrigStmt>()).relation,
        pg_sys::NodeTag::T_RuleStmt => (*stmt.cast::<pg_sys::RuleStmt>()).relation,
        pg_sys::NodeTag::T_CreateStatsStmt => {
            let rels = pgrx::PgList::<pg_sys::Node>::from_pg(
                (*stmt.cast::<pg_sys::CreateStatsStmt>()).relations,
            );
            match rels.head() {
                Some(n) if (*n).type_ == pg_sys::NodeTag::T_RangeVar => n.cast(),
                _ => return,
            }
        }
        _ => return,
    };
    let Some(oid) = floor_table(relation) else {
        return;
    };
    let problem = Spi::get_one_with_args::<String>(
        "SELECT tenancy.foreign_code_problem($1::pg_catalog.oid::pg_catalog.regclass)",
        &[oid.into()],
    )
    .ok()
    .flatten();
    if problem.is_some() {
        TenancyError::ShardWeakening {
            command: "DDL that leaves its own code over the rows",
        }
        .report();
    }
}

/// The table `relation` names, when it carries pg_tenancy's floor policy.
unsafe fn floor_table(relation: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    let oid = crate::session_objects::relation_oid(relation)?;
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) $1
                          AND polname OPERATOR(pg_catalog.=) 'tenancy_tenant_floor')",
        &[oid.into()],
    )
    .ok()
    .flatten()
    .filter(|f| *f)
    .map(|_| oid)
}
