//! The sealer: links committed events into per-tenant blocks of the hash chain, after the
//! writing transactions committed, so that writers never wait for one another.
//!
//! A round (one transaction) takes the sealers' lock (`LOCK tenancy.audit_seals IN EXCLUSIVE
//! MODE`: only sealers and `audit_purge` take it; readers are not blocked, and the
//! application, which may only read the table, cannot take a conflicting lock), deletes up to
//! rows holding up to [`ROUND_EVENTS`] events of `tenancy.audit_pending` (each the ids and hashes of up to 40
//! events of one tenant, written with them by the writer), and seals their events tenant by
//! tenant in event-id order, at most [`BLOCK_EVENTS`] per block. It never reads the events
//! themselves: `audit_verify` checks that every sealed event is there and matches its hash.
//! A crash rolls the round back: its pending rows come back and the next round seals them.

use super::chain::BlockHasher;
use crate::error::TenancyError;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use std::collections::BTreeMap;

/// Events one round seals at most (whole pending rows of up to 40): a round is short.
const ROUND_EVENTS: i64 = 20_000;
/// Events per block: a bulk statement's events become several blocks.
const BLOCK_EVENTS: usize = 10_000;

/// What one round did.
pub(crate) struct Round {
    /// Whether more may be pending than this round took (the next one should follow at once).
    pub more: bool,
    pub blocks: i64,
    pub events: i64,
}

/// The tip of one tenant's chain: the last block's number and position, the last hash.
#[derive(Clone)]
struct Tip {
    block: i64,
    seq: i64,
    hash: Vec<u8>,
}

/// One event to seal: id, hash, time.
struct Pending {
    id: i64,
    hash: [u8; 32],
    at: i64,
}

/// Seals what is pending, in the current transaction (one round): take pending rows (one
/// statement), read the tenants' tips (one statement), write the blocks (one INSERT per
/// 256), move the tips (one statement).
///
/// On a Citus cluster ([`super::cluster`]) a worker seals nothing (its coordinator gathers
/// its events), and a coordinator first gathers its workers' events (every round when
/// `force`, otherwise once a second while they have none).
pub(crate) fn seal_round(force: bool) -> Round {
    let role = super::cluster::role();
    if matches!(role, super::cluster::Role::Worker) {
        return Round {
            more: false,
            blocks: 0,
            events: 0,
        };
    }
    Spi::connect_mut(|client| -> SpiResult<Round> {
        client.update("LOCK TABLE tenancy.audit_seals IN EXCLUSIVE MODE", None, &[])?;
        let mut gathered = 0;
        if let super::cluster::Role::Coordinator(nodes) = &role {
            if super::cluster::due(force) {
                gathered = super::cluster::gather(client, nodes)?;
            }
        }
        // Pending rows in the order they lie, as many as hold ROUND_EVENTS events at most
        // (and the first whatever its size, so that no row can stop the sealer).
        let taken = client.update(
            "DELETE FROM tenancy.audit_pending
              WHERE ctid = ANY (ARRAY(
                      SELECT s.ctid FROM (SELECT p.ctid, pg_catalog.sum(pg_catalog.cardinality(p.event_ids))
                                                   OVER (ROWS UNBOUNDED PRECEDING) AS n,
                                                 pg_catalog.row_number() OVER (ROWS UNBOUNDED PRECEDING) AS r
                                            FROM (SELECT ctid, event_ids FROM tenancy.audit_pending LIMIT $1) p) s
                       WHERE s.n OPERATOR(pg_catalog.<=) $1 OR s.r OPERATOR(pg_catalog.=) 1))
             RETURNING organization_id, event_ids, hashes, occurred_at",
            None,
            &[ROUND_EVENTS.into()],
        )?;
        let mut round = Round {
            more: false,
            blocks: 0,
            events: 0,
        };
        let mut taken_events = 0;
        let mut tenants: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
        for row in taken {
            let org = row.get::<String>(1)?.unwrap_or_default();
            let ids = row.get::<Vec<i64>>(2)?.unwrap_or_default();
            let hashes = row.get::<Vec<u8>>(3)?.unwrap_or_default();
            let at = row
                .get::<pgrx::datum::TimestampWithTimeZone>(4)?
                .map(|t| t.into_inner())
                .unwrap_or(0);
            if hashes.len() != ids.len() * 32 || ids.is_empty() {
                // Not written by pg_tenancy: set aside (its events, in no block and not
                // pending, make audit_verify report them), never blocking the others.
                pgrx::warning!(
                    "pg_tenancy: a malformed row of tenancy.audit_pending was discarded (tenant {org:?}, {} ids, {} hash bytes)",
                    ids.len(),
                    hashes.len()
                );
                continue;
            }
            taken_events += ids.len() as i64;
            let list = tenants.entry(org).or_default();
            for (id, hash) in ids.iter().zip(hashes.chunks_exact(32)) {
                list.push(Pending {
                    id: *id,
                    hash: hash.try_into().expect("chunks of 32"),
                    at,
                });
            }
        }
        // Full (or nearly: the next row would not have fitted): more is waiting.
        round.more = taken_events > ROUND_EVENTS - 40 || gathered > 0;
        if tenants.is_empty() {
            return Ok(round);
        }
        let orgs: Vec<String> = tenants.keys().cloned().collect();
        let mut tips = tips(client, &orgs)?;
        let start = tips.clone();
        let mut done: Vec<Sealed> = Vec::new();
        for (org, mut events) in tenants {
            events.sort_by_key(|e| e.id);
            events.dedup_by_key(|e| e.id);
            round.events += events.len() as i64;
            for chunk in events.chunks(BLOCK_EVENTS) {
                let tip = tips.get(&org).cloned().expect("every tip was read");
                let mut hasher = BlockHasher::new(&org, tip.block.saturating_add(1), tip.seq.saturating_add(1), &tip.hash);
                for e in chunk {
                    hasher.add(e.id, &e.hash);
                }
                done.push(finish(
                    Block {
                        org: org.clone(),
                        block_no: tip.block.saturating_add(1),
                        first_seq: tip.seq.saturating_add(1),
                        prev: tip.hash,
                        hasher,
                        ids: chunk.iter().map(|e| e.id).collect(),
                        newest: chunk.iter().map(|e| e.at).max().unwrap_or(0),
                    },
                    &mut tips,
                ));
                if done.len() >= 256 {
                    round.blocks += done.len() as i64;
                    write_blocks(client, std::mem::take(&mut done))?;
                }
            }
        }
        round.blocks += done.len() as i64;
        write_blocks(client, done)?;
        move_tips(client, &start, &tips)?;
        Ok(round)
    })
    .unwrap_or_else(|e| TenancyError::spi("sealing the audit trail", e).report())
}

/// A block being built, then written.
struct Block {
    org: String,
    block_no: i64,
    first_seq: i64,
    prev: Vec<u8>,
    hasher: BlockHasher,
    ids: Vec<i64>,
    newest: i64,
}

/// The tips of `orgs` (sorted): each one's head row, or (first seal) the end of its v1
/// chain, the purge anchor, or the start.
fn tips(client: &SpiClient<'_>, orgs: &[String]) -> SpiResult<BTreeMap<String, Tip>> {
    let rows = client.select(
        "SELECT o.org, h.last_block, h.last_seq, h.last_hash, h.purged_through_seq, h.purged_anchor, v1.seq, v1.hash
           FROM unnest($1::text[]) AS o(org)
           LEFT JOIN tenancy.audit_chain_heads h ON h.organization_id = o.org
           LEFT JOIN LATERAL (SELECT e.seq, e.hash FROM tenancy.audit_events e
                               WHERE e.organization_id = o.org AND e.seq IS NOT NULL
                               ORDER BY e.seq DESC LIMIT 1) v1 ON h.last_seq IS NULL",
        None,
        &[orgs.to_vec().into()],
    )?;
    let mut out = BTreeMap::new();
    for r in rows {
        let org = r.get::<String>(1)?.unwrap_or_default();
        let block = r.get::<i64>(2)?.unwrap_or(0);
        let tip = match (r.get::<i64>(3)?, r.get::<Vec<u8>>(4)?, r.get::<i64>(7)?) {
            (Some(seq), Some(hash), _) => Tip { block, seq, hash },
            (_, _, Some(seq)) => Tip {
                block,
                seq,
                hash: r.get::<Vec<u8>>(8)?.unwrap_or_default(),
            },
            _ => Tip {
                block,
                seq: r.get::<i64>(5)?.unwrap_or(0),
                hash: r.get::<Vec<u8>>(6)?.unwrap_or_else(|| vec![0u8; 32]),
            },
        };
        out.insert(org, tip);
    }
    Ok(out)
}

/// A finished block, ready to be written.
struct Sealed {
    org: String,
    block_no: i64,
    first_seq: i64,
    count: i32,
    ids: String,
    newest: pgrx::datum::TimestampWithTimeZone,
    prev: Vec<u8>,
    hash: Vec<u8>,
}

/// Finishes a block: its hash, and the tenant's tip moved past it.
fn finish(b: Block, tips: &mut BTreeMap<String, Tip>) -> Sealed {
    let n = b.hasher.count();
    let hash = b.hasher.finish(b.newest).to_vec();
    tips.insert(
        b.org.clone(),
        Tip {
            block: b.block_no,
            seq: b.first_seq.saturating_add(n - 1),
            hash: hash.clone(),
        },
    );
    let list: Vec<String> = b.ids.iter().map(i64::to_string).collect();
    Sealed {
        org: b.org,
        block_no: b.block_no,
        first_seq: b.first_seq,
        count: n as i32,
        ids: format!("{{{}}}", list.join(",")),
        newest: pgrx::datum::TimestampWithTimeZone::try_from(b.newest)
            .expect("an event's time is a valid timestamp"),
        prev: b.prev,
        hash,
    }
}

/// Writes finished blocks in one INSERT.
fn write_blocks(client: &mut SpiClient<'_>, blocks: Vec<Sealed>) -> SpiResult<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut orgs = Vec::with_capacity(blocks.len());
    let mut nos = Vec::with_capacity(blocks.len());
    let mut firsts = Vec::with_capacity(blocks.len());
    let mut counts = Vec::with_capacity(blocks.len());
    let mut ids = Vec::with_capacity(blocks.len());
    let mut newest = Vec::with_capacity(blocks.len());
    let mut prevs = Vec::with_capacity(blocks.len());
    let mut hashes = Vec::with_capacity(blocks.len());
    for b in blocks {
        orgs.push(b.org);
        nos.push(b.block_no);
        firsts.push(b.first_seq);
        counts.push(b.count);
        ids.push(b.ids);
        newest.push(b.newest);
        prevs.push(b.prev);
        hashes.push(b.hash);
    }
    client.update(
        "INSERT INTO tenancy.audit_seals (organization_id, block_no, first_seq, event_count, event_ids,
                                          newest_event_at, sealed_at, prev_hash, hash)
         SELECT u.o, u.b, u.f, u.n, u.ids::bigint[], u.t, pg_catalog.clock_timestamp(), u.p, u.h
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int4[], $5::text[], $6::timestamptz[],
                       $7::bytea[], $8::bytea[]) AS u(o, b, f, n, ids, t, p, h)",
        None,
        &[
            orgs.into(),
            nos.into(),
            firsts.into(),
            counts.into(),
            ids.into(),
            newest.into(),
            prevs.into(),
            hashes.into(),
        ],
    )?;
    Ok(())
}

/// Records the tips that moved in `tenancy.audit_chain_heads`, in one statement.
fn move_tips(
    client: &mut SpiClient<'_>,
    start: &BTreeMap<String, Tip>,
    tips: &BTreeMap<String, Tip>,
) -> SpiResult<()> {
    let moved: Vec<(&String, &Tip)> = tips
        .iter()
        .filter(|(org, t)| start.get(*org).is_none_or(|s| s.block != t.block))
        .collect();
    if moved.is_empty() {
        return Ok(());
    }
    client.update(
        "INSERT INTO tenancy.audit_chain_heads AS h (organization_id, last_block, last_seq, last_hash)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])
         ON CONFLICT (organization_id) DO UPDATE
           SET last_block = EXCLUDED.last_block, last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash",
        None,
        &[
            moved.iter().map(|m| m.0.clone()).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.block).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.seq).collect::<Vec<_>>().into(),
            moved.iter().map(|m| m.1.hash.clone()).collect::<Vec<_>>().into(),
        ],
    )?;
    Ok(())
}

/// Seals everything pending now, in the current transaction: `SELECT tenancy.audit_seal()`
/// (superuser), for databases the background worker does not serve (it seals
/// `tenancy.audit_database` continuously). Returns the number of events sealed.
#[pg_extern(volatile, parallel_unsafe)]
fn audit_seal() -> i64 {
    // SAFETY: superuser() only reads the current role.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::SuperuserOnly { what: "audit_seal" }.report();
    }
    if matches!(super::cluster::role(), super::cluster::Role::Worker) {
        pgrx::notice!("pg_tenancy: this Citus worker's audit events are sealed by its coordinator");
        return 0;
    }
    let mut total = 0;
    loop {
        let round = seal_round(true);
        total += round.events;
        if !round.more {
            return total;
        }
    }
}
