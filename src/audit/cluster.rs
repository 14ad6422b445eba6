//! The audit trail of a Citus cluster: one trail per tenant, kept on the coordinator.
//!
//! A change to a distributed table runs on the worker holding the shard, so its audit
//! trigger writes the event there, in the same distributed transaction as the change (it
//! commits, or vanishes, with it), filed under the distributed table's name (not the
//! shard's), with an event id of the worker's own range (its Citus group in the top bits).
//! A worker never seals: its `tenancy.audit_pending` rows are an outbox. The coordinator's
//! sealer gathers them with their events from every worker ([`gather`]), files them in its
//! own trail and seals them into the tenant's one chain. The chain lives on the coordinator,
//! so a shard move, split or rebalance does not touch it: the tenant's later events come
//! from the shard's new node into the same chain.
//!
//! Gathering is idempotent: the coordinator copies a worker's rows in its sealing
//! transaction and tells the worker to drop them only once it finds them committed in its
//! own trail (at the next gathering), so a crash or an error anywhere loses nothing and
//! files nothing twice.

use crate::error::TenancyError;
// Multi-argument unnest(...) is written unqualified: PostgreSQL expands only that spelling
// in FROM (each call then resolves in the pinned search_path, pg_catalog first).
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Event ids of a Citus group start at `group << GROUP_SHIFT` (the coordinator's at 0).
const GROUP_SHIFT: u32 = 48;
/// Outbox rows (up to 40 events each) one gathering takes from one worker.
const GATHER_ROWS: i32 = 100;
/// Stored bytes of the events one offer carries at most (and one event, whatever its size):
/// their JSON is about twice as large (bytea as hex), far below jsonb's 256 MB.
const OFFER_BYTES: i64 = 8 << 20;
/// How often the sealer gathers while the workers have nothing (each gathering opens one
/// connection per worker).
const GATHER_EVERY: Duration = Duration::from_millis(1000);

thread_local! {
    /// When this backend last gathered and found nothing.
    static IDLE_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Events this transaction filed (not committed yet: never acknowledged to a worker).
    static FILED: RefCell<HashSet<(String, i64)>> = RefCell::new(HashSet::new());
}

/// End of the transaction: what it filed is committed, or gone.
pub(crate) fn at_xact_end() {
    FILED.with(|f| f.borrow_mut().clear());
}

/// The first event id of this node's range.
pub(super) fn event_id_base() -> i64 {
    i64::from(crate::citus::local_group()) << GROUP_SHIFT
}

/// What this node's sealer does.
pub(super) enum Role {
    /// Seals its own events (no Citus, or a coordinator without workers).
    Alone,
    /// Gathers its workers' events, then seals (them and its own).
    Coordinator(Vec<(String, i32)>),
    /// Leaves its events to the coordinator.
    Worker,
}

/// This node's role in the audit trail, read before a sealing round.
pub(super) fn role() -> Role {
    if crate::citus::local_group() > 0 {
        return Role::Worker;
    }
    if !crate::citus::loaded() || !crate::citus::installed() {
        return Role::Alone;
    }
    let nodes = Spi::connect(|client| {
        client
            .select(
                "SELECT nodename::text, nodeport FROM pg_catalog.pg_dist_node
                  WHERE isactive AND noderole OPERATOR(pg_catalog.=) 'primary'
                    AND groupid OPERATOR(pg_catalog.<>) 0
                  ORDER BY nodeid",
                None,
                &[],
            )?
            .map(|r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<i32>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<SpiResult<Vec<_>>>()
    })
    .unwrap_or_else(|e| TenancyError::spi("reading Citus's worker nodes", e).report());
    if nodes.is_empty() {
        Role::Alone
    } else {
        Role::Coordinator(nodes)
    }
}

/// Whether the sealer should gather now: always when `force` (`audit_seal()`), otherwise once
/// per [`GATHER_EVERY`] while the workers are idle.
pub(super) fn due(force: bool) -> bool {
    force
        || IDLE_SINCE
            .with(|s| s.get())
            .is_none_or(|t| t.elapsed() >= GATHER_EVERY)
}

/// Gathers every worker's outbox into this coordinator's trail, in the current (sealing)
/// transaction, after the sealers' lock: returns the events filed (their pending rows are
/// then sealed by the same round). A worker that cannot be reached is skipped with a
/// WARNING; its events wait there for the next gathering.
pub(super) fn gather(client: &mut SpiClient<'_>, nodes: &[(String, i32)]) -> SpiResult<i64> {
    let mut filed = 0;
    for (name, port) in nodes {
        match gather_node(client, name, *port)? {
            Ok(n) => filed += n,
            Err(problem) => pgrx::warning!(
                "pg_tenancy: the audit events of worker {name}:{port} were not gathered: {problem}"
            ),
        }
    }
    IDLE_SINCE.with(|s| s.set((filed == 0).then(Instant::now)));
    Ok(filed)
}

/// Offered rows of one worker's outbox.
struct Offer {
    /// The offer as the worker wrote it (jsonb text: `{"pending": [...], "events": [...]}`).
    doc: String,
    /// Its pending rows: tenant, event ids, hashes (32 bytes each), time written.
    rows: Vec<(
        String,
        Vec<i64>,
        Vec<u8>,
        pgrx::datum::TimestampWithTimeZone,
    )>,
}

/// One worker: its offer, acknowledged where this trail holds it already (committed by an
/// earlier gathering: safe to drop there), the rest filed here.
fn gather_node(
    client: &mut SpiClient<'_>,
    name: &str,
    port: i32,
) -> SpiResult<std::result::Result<i64, String>> {
    let mut offer = match offer_after(client, name, port, &[], &[])? {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let mut have = held(client, &offer)?;
    if !have.is_empty() {
        let (orgs, ids): (Vec<String>, Vec<i64>) = have.iter().cloned().unzip();
        offer = match offer_after(client, name, port, &orgs, &ids)? {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        have = held(client, &offer)?;
    }
    // What is neither held here nor filed by this transaction already (audit_seal()'s next
    // round) is new, or an id this trail holds with other content (never overwritten: left
    // on the worker, reported below).
    let filed_before = FILED.with(|f| f.borrow().clone());
    let known = |key: &(String, i64)| have.contains(key) || filed_before.contains(key);
    let (want_orgs, want_ids): (Vec<String>, Vec<i64>) = offer
        .rows
        .iter()
        .flat_map(|(org, ids, _, _)| ids.iter().map(|id| (org.clone(), *id)))
        .filter(|key| !known(key))
        .unzip();
    if want_ids.is_empty() {
        return Ok(Ok(0));
    }
    let filed: HashSet<(String, i64)> = client
        .update(
            "INSERT INTO tenancy.audit_events
             SELECT x.* FROM pg_catalog.jsonb_populate_recordset(NULL::tenancy.audit_events,
                                 $1::pg_catalog.jsonb OPERATOR(pg_catalog.->) 'events') x
              WHERE (x.organization_id, x.event_id) IN (SELECT * FROM unnest($2::text[], $3::bigint[]))
             ON CONFLICT DO NOTHING
             RETURNING organization_id, event_id",
            None,
            &[
                offer.doc.as_str().into(),
                want_orgs.into(),
                want_ids.into(),
            ],
        )?
        .map(|r| {
            Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<i64>(2)?.unwrap_or_default(),
            ))
        })
        .collect::<SpiResult<_>>()?;
    let mut left = 0;
    for (org, ids, hashes, at) in offer.rows {
        let mut keep_ids = Vec::new();
        let mut keep_hashes = Vec::new();
        for (id, hash) in ids.iter().zip(hashes.chunks_exact(32)) {
            let key = (org.clone(), *id);
            if filed.contains(&key) {
                keep_ids.push(*id);
                keep_hashes.extend_from_slice(hash);
            } else if !known(&key) {
                left += 1;
            }
        }
        if keep_ids.is_empty() {
            continue;
        }
        client.update(
            "INSERT INTO tenancy.audit_pending (organization_id, event_ids, hashes, occurred_at)
             VALUES ($1, $2, $3, $4)",
            None,
            &[
                org.as_str().into(),
                keep_ids.into(),
                keep_hashes.into(),
                at.into(),
            ],
        )?;
    }
    if left > 0 {
        pgrx::warning!(
            "pg_tenancy: {left} audit events of worker {name}:{port} were left there: their ids are in this trail with other content, or their rows are missing"
        );
    }
    let n = filed.len() as i64;
    FILED.with(|f| f.borrow_mut().extend(filed));
    Ok(Ok(n))
}

/// The events among `offer`'s pending rows this trail holds already, committed (not filed
/// by this transaction, which may still roll back), with the same hash.
fn held(client: &SpiClient<'_>, offer: &Offer) -> SpiResult<HashSet<(String, i64)>> {
    let mut orgs = Vec::new();
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    for (org, row_ids, row_hashes, _) in &offer.rows {
        for (id, hash) in row_ids.iter().zip(row_hashes.chunks_exact(32)) {
            orgs.push(org.clone());
            ids.push(*id);
            hashes.push(hash.to_vec());
        }
    }
    let mut have = HashSet::new();
    if ids.is_empty() {
        return Ok(have);
    }
    let rows = client.select(
        "SELECT u.o, u.id FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS u(o, id, h)
           JOIN tenancy.audit_events e ON e.organization_id OPERATOR(pg_catalog.=) u.o
                                      AND e.event_id OPERATOR(pg_catalog.=) u.id
                                      AND e.hash OPERATOR(pg_catalog.=) u.h",
        None,
        &[orgs.into(), ids.into(), hashes.into()],
    )?;
    for r in rows {
        have.insert((
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<i64>(2)?.unwrap_or_default(),
        ));
    }
    FILED.with(|filed| have.retain(|key| !filed.borrow().contains(key)));
    Ok(have)
}

/// The worker's outbox rows after it dropped the events `(orgs[i], ids[i])`.
fn offer_after(
    client: &SpiClient<'_>,
    name: &str,
    port: i32,
    orgs: &[String],
    ids: &[i64],
) -> SpiResult<std::result::Result<Offer, String>> {
    // The command is built by format() from quoted literals (%L), whatever the session's
    // settings; master_run_on_worker runs it on its own connection (committed there).
    let row = client.select(
        "SELECT r.success, r.result
           FROM pg_catalog.master_run_on_worker(
                  ARRAY[$1::text], ARRAY[$2::int4],
                  ARRAY[pg_catalog.format('SELECT tenancy.audit_outbox(%L::text[], %L::bigint[], %s)',
                                          $3::text[], $4::bigint[], $5::int4)],
                  false) r",
        None,
        &[
            name.into(),
            port.into(),
            orgs.to_vec().into(),
            ids.to_vec().into(),
            GATHER_ROWS.into(),
        ],
    )?;
    let row = row.first();
    let (ok, result) = (
        row.get::<bool>(1)?.unwrap_or(false),
        row.get::<String>(2)?.unwrap_or_default(),
    );
    if !ok {
        return Ok(Err(result));
    }
    let mut rows = Vec::new();
    for r in client.select(
        "SELECT p.organization_id, p.event_ids, p.hashes, p.occurred_at
           FROM pg_catalog.jsonb_populate_recordset(NULL::tenancy.audit_pending,
                  $1::pg_catalog.jsonb OPERATOR(pg_catalog.->) 'pending') p",
        None,
        &[result.as_str().into()],
    )? {
        let ids = r.get::<Vec<i64>>(2)?.unwrap_or_default();
        let hashes = r.get::<Vec<u8>>(3)?.unwrap_or_default();
        if hashes.len() != ids.len() * 32 {
            return Ok(Err("a malformed outbox row (ids and hashes differ)".into()));
        }
        let Some(at) = r.get::<pgrx::datum::TimestampWithTimeZone>(4)? else {
            return Ok(Err("a malformed outbox row (no time)".into()));
        };
        rows.push((r.get::<String>(1)?.unwrap_or_default(), ids, hashes, at));
    }
    Ok(Ok(Offer { doc: result, rows }))
}

/// A worker's outbox for its coordinator's sealer: drops the events `(acked_orgs[i],
/// acked_ids[i])` and the pending rows all of whose events are among them (the coordinator
/// holds them committed), then returns up to `max_rows` pending rows and their events as
/// jsonb (`{"pending": [...], "events": [...]}`). Superuser only, on a Citus worker only.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_outbox(acked_orgs: Vec<String>, acked_ids: Vec<i64>, max_rows: i32) -> pgrx::JsonB {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly {
            what: "audit_outbox",
        }
        .report();
    }
    if crate::citus::local_group() <= 0 {
        TenancyError::NotACitusWorker {
            what: "tenancy.audit_outbox",
        }
        .report();
    }
    if acked_orgs.len() != acked_ids.len() || max_rows < 1 {
        TenancyError::BadOutboxRequest {
            reason: "it takes as many tenants as event ids, and at least one row",
        }
        .report();
    }
    Spi::connect_mut(|client| -> SpiResult<pgrx::JsonB> {
        if !acked_ids.is_empty() {
            crate::policy::with_maintenance(|| -> SpiResult<()> {
                client.update(
                    "DELETE FROM tenancy.audit_events e
                      USING unnest($1::text[], $2::bigint[]) AS u(o, id)
                      WHERE e.organization_id OPERATOR(pg_catalog.=) u.o
                        AND e.event_id OPERATOR(pg_catalog.=) u.id",
                    None,
                    &[acked_orgs.clone().into(), acked_ids.clone().into()],
                )?;
                // Rows some of whose events were taken keep the others (a round may take
                // part of a row: see below); rows all of whose events were taken go.
                client.update(
                    "UPDATE tenancy.audit_pending p SET event_ids = k.ids, hashes = k.hs
                       FROM (SELECT q.ctid AS c, pg_catalog.array_agg(u.id ORDER BY u.i) AS ids,
                                    pg_catalog.string_agg(pg_catalog.substr(q.hashes, ((u.i - 1) * 32 + 1)::int4, 32),
                                                          ''::bytea ORDER BY u.i) AS hs
                               FROM tenancy.audit_pending q, unnest(q.event_ids) WITH ORDINALITY AS u(id, i)
                              WHERE q.event_ids OPERATOR(pg_catalog.&&) $1::bigint[]
                                AND NOT (u.id OPERATOR(pg_catalog.=) ANY ($1::bigint[]))
                              GROUP BY q.ctid) k
                      WHERE p.ctid OPERATOR(pg_catalog.=) k.c",
                    None,
                    &[acked_ids.clone().into()],
                )?;
                client.update(
                    "DELETE FROM tenancy.audit_pending
                      WHERE event_ids OPERATOR(pg_catalog.<@) $1::bigint[]",
                    None,
                    &[acked_ids.clone().into()],
                )?;
                Ok(())
            })?;
        }
        // Events in the order they lie, as many as fit OFFER_BYTES (and the first whatever its
        // size, so that no event can stop the others), with the part of each pending row
        // they make up: one huge statement cannot make an offer too large to send.
        let doc = client
            .select(
                "WITH p AS MATERIALIZED (SELECT ctid AS c, organization_id, event_ids, hashes, occurred_at
                                           FROM tenancy.audit_pending LIMIT $1),
                      x AS (SELECT p.c, p.organization_id, p.occurred_at, u.id, u.i,
                                   pg_catalog.substr(p.hashes, ((u.i - 1) * 32 + 1)::int4, 32) AS h
                              FROM p, unnest(p.event_ids) WITH ORDINALITY AS u(id, i)),
                      s AS (SELECT x.*, e AS ev,
                                   pg_catalog.sum(pg_catalog.pg_column_size(e.*)) OVER (ORDER BY x.c, x.i) AS cum,
                                   pg_catalog.row_number() OVER (ORDER BY x.c, x.i) AS rn
                              FROM x JOIN tenancy.audit_events e
                                ON e.organization_id OPERATOR(pg_catalog.=) x.organization_id
                               AND e.event_id OPERATOR(pg_catalog.=) x.id),
                      t AS MATERIALIZED (SELECT * FROM s WHERE s.cum OPERATOR(pg_catalog.<=) $2 OR s.rn OPERATOR(pg_catalog.=) 1)
                 SELECT pg_catalog.jsonb_build_object(
                          'pending', coalesce((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                                                        'organization_id', g.organization_id, 'event_ids', g.ids,
                                                        'hashes', g.hs, 'occurred_at', g.occurred_at))
                                                 FROM (SELECT t.c, t.organization_id, t.occurred_at,
                                                              pg_catalog.array_agg(t.id ORDER BY t.i) AS ids,
                                                              pg_catalog.string_agg(t.h, ''::bytea ORDER BY t.i) AS hs
                                                         FROM t GROUP BY t.c, t.organization_id, t.occurred_at) g), '[]'),
                          'events', coalesce((SELECT pg_catalog.jsonb_agg(pg_catalog.to_jsonb(t.ev)) FROM t), '[]'))",
                None,
                &[max_rows.into(), OFFER_BYTES.into()],
            )?
            .first()
            .get::<pgrx::JsonB>(1)?;
        Ok(doc.unwrap_or(pgrx::JsonB(serde_json::json!({"pending": [], "events": []}))))
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the audit outbox", e).report())
}
