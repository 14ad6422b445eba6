//! Digests kept outside the database, as SQL Server Ledger's digest storage keeps them:
//! `tenancy.audit_digest()` gives every tenant's newest sealed position and hash as one line
//! to store elsewhere; `tenancy.audit_verify(org, digest)` proves the current trail extends
//! such a line (so deleting the newest events, or rewriting and re-hashing the trail from an
//! edit on, shows even though the trail alone would verify).
//!
//! A digest line: `pg_tenancy-digest:1:<tenant>:<block>:<position>:<hash hex>`, where block
//! 0 names the end of the tenant's v1 chain (events written by 0.1.0/0.2.0).

use super::admin::{verify, Verdict};
use crate::error::TenancyError;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};

const PREFIX: &str = "pg_tenancy-digest:1:";

/// One tenant's newest sealed point.
pub(crate) struct Point {
    pub org: String,
    pub block: i64,
    pub seq: i64,
    pub hash: Vec<u8>,
}

impl Point {
    pub(crate) fn line(&self) -> String {
        format!(
            "{PREFIX}{}:{}:{}:{}",
            self.org,
            self.block,
            self.seq,
            hex::encode(&self.hash)
        )
    }

    fn parse(s: &str) -> Result<Point, TenancyError> {
        let bad = |reason: &str| TenancyError::BadDigest {
            reason: reason.into(),
        };
        // A line of the digest file starts with the time it was written.
        let at = s
            .find(PREFIX)
            .ok_or_else(|| bad("it holds no \"pg_tenancy-digest:1:\""))?;
        let rest = &s.trim_end()[at + PREFIX.len()..];
        // The tenant id may hold ':' (text ids): the last three fields are fixed.
        let mut parts = rest.rsplitn(4, ':');
        let hash = parts.next().unwrap_or_default();
        let seq = parts.next().unwrap_or_default();
        let block = parts.next().unwrap_or_default();
        let org = parts.next().ok_or_else(|| bad("it has too few fields"))?;
        let number = |v: &str, what: &str| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad(&format!("its {what} is not a number")))
        };
        let hash = unhex(hash).ok_or_else(|| bad("its hash is not 64 hex digits"))?;
        Ok(Point {
            org: org.to_string(),
            block: number(block, "block")?,
            seq: number(seq, "position")?,
            hash,
        })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len() == 64).then(|| hex::decode(s).ok()).flatten()
}

/// Every tenant's newest sealed point (its last block, or the end of its v1 chain).
pub(crate) fn points(client: &SpiClient<'_>) -> SpiResult<Vec<Point>> {
    let rows = client.select(
        "SELECT t.org, coalesce(b.block_no, 0), coalesce(b.first_seq + b.event_count - 1, v.seq), coalesce(b.hash, v.hash)
           FROM (SELECT DISTINCT organization_id AS org FROM tenancy.audit_events) t
           LEFT JOIN LATERAL (SELECT s.block_no, s.first_seq, s.event_count, s.hash FROM tenancy.audit_seals s
                               WHERE s.organization_id = t.org ORDER BY s.block_no DESC LIMIT 1) b ON true
           LEFT JOIN LATERAL (SELECT e.seq, e.hash FROM tenancy.audit_events e
                               WHERE e.organization_id = t.org AND e.seq IS NOT NULL
                               ORDER BY e.seq DESC LIMIT 1) v ON b.block_no IS NULL
          WHERE b.block_no IS NOT NULL OR v.seq IS NOT NULL
          ORDER BY 1",
        None,
        &[],
    )?;
    rows.map(|r| {
        Ok(Point {
            org: r.get::<String>(1)?.unwrap_or_default(),
            block: r.get::<i64>(2)?.unwrap_or(0),
            seq: r.get::<i64>(3)?.unwrap_or(0),
            hash: r.get::<Vec<u8>>(4)?.unwrap_or_default(),
        })
    })
    .collect()
}

/// Appends every tenant's digest line, after the time, to `path` and flushes it to disk; the
/// number of lines. Refuses a path inside the data directory (a superuser who can rewrite the
/// trail could rewrite it too). In a transaction.
pub(crate) fn append_to_file(path: &str) -> Result<usize, String> {
    use std::io::Write;
    let file = std::path::Path::new(path);
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or("the path must name a file in an existing directory")?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("directory of {path:?}: {e}"))?;
    // SAFETY: DataDir is set for every process of a running server.
    let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }
        .to_string_lossy()
        .into_owned();
    let data = std::path::Path::new(&data)
        .canonicalize()
        .map_err(|e| format!("data directory: {e}"))?;
    if dir.starts_with(&data) {
        return Err(format!(
            "{path:?} is inside the data directory: keep digests where the database cannot change them"
        ));
    }
    let points = Spi::connect(points).map_err(|e| e.to_string())?;
    // SAFETY: the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let stamp = pgrx::datum::TimestampWithTimeZone::try_from(now)
        .map(|t| t.to_iso_string())
        .unwrap_or_default();
    let mut text = String::new();
    for p in &points {
        text.push_str(&format!("{stamp} {}\n", p.line()));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| format!("{path:?}: {e}"))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{path:?}: {e}"))?;
    Ok(points.len())
}

/// Every tenant's newest sealed point, as a line to keep outside the database (superuser).
#[pg_extern(volatile, parallel_unsafe)]
fn audit_digest() -> TableIterator<
    'static,
    (
        name!(organization_id, String),
        name!(block_no, i64),
        name!(seq, i64),
        name!(hash, String),
        name!(digest, String),
    ),
> {
    // SAFETY: superuser() only reads the current role (SECURITY DEFINER: ask the caller).
    if !unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) } {
        TenancyError::SuperuserOnly {
            what: "audit_digest",
        }
        .report();
    }
    let points = Spi::connect(points)
        .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    TableIterator::new(
        points
            .into_iter()
            .map(|p| {
                let line = p.line();
                (p.org, p.block, p.seq, hex::encode(&p.hash), line)
            })
            .collect::<Vec<_>>(),
    )
}

/// `audit_verify(org)`, and that the trail still holds the point `digest` names, unchanged:
/// a trail shorter than the digest was truncated; a different hash there means the trail was
/// rewritten (or reordered) since.
#[pg_extern(name = "audit_verify", volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn audit_verify_digest(
    org: &str,
    digest: &str,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(events, i64),
        name!(first_broken_seq, Option<i64>),
        name!(problem, Option<String>),
        name!(unsealed, i64),
        name!(oldest_unsealed, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    super::admin::check_verify_allowed(org);
    let point = Point::parse(digest).unwrap_or_else(|e| e.report());
    if point.org != org {
        TenancyError::BadDigest {
            reason: "it is another tenant's digest".into(),
        }
        .report();
    }
    let v: Verdict = Spi::connect(|client| -> SpiResult<Verdict> {
        let mut v = verify(client, org)?;
        if v.broken.is_none() {
            v.broken = against(client, &point)?;
        }
        Ok(v)
    })
    .unwrap_or_else(|e| TenancyError::spi("reading the audit trail", e).report());
    TableIterator::once(v.row())
}

/// What is wrong with the trail at the digest's point, if anything.
fn against(client: &SpiClient<'_>, p: &Point) -> SpiResult<Option<(Option<i64>, String)>> {
    let r = client
        .select(
            "SELECT (SELECT s.hash FROM tenancy.audit_seals s WHERE s.organization_id = $1 AND s.block_no = $2 AND $2 > 0),
                    (SELECT s.first_seq + s.event_count - 1 FROM tenancy.audit_seals s WHERE s.organization_id = $1 AND s.block_no = $2),
                    (SELECT e.hash FROM tenancy.audit_events e WHERE e.organization_id = $1 AND e.seq = $3 AND $2 = 0),
                    (SELECT coalesce(pg_catalog.max(s.block_no), 0) FROM tenancy.audit_seals s WHERE s.organization_id = $1),
                    (SELECT coalesce(pg_catalog.max(e.seq), 0) FROM tenancy.audit_events e WHERE e.organization_id = $1),
                    h.purged_through_seq, h.purged_anchor
               FROM (SELECT 1) one LEFT JOIN tenancy.audit_chain_heads h ON h.organization_id = $1",
            None,
            &[p.org.as_str().into(), p.block.into(), p.seq.into()],
        )?
        .first();
    let block_hash = r.get::<Vec<u8>>(1)?;
    let block_end = r.get::<i64>(2)?;
    let v1_hash = r.get::<Vec<u8>>(3)?;
    let last_block = r.get::<i64>(4)?.unwrap_or(0);
    let last_v1 = r.get::<i64>(5)?.unwrap_or(0);
    let purged = r.get::<i64>(6)?.unwrap_or(0);
    let anchor = r.get::<Vec<u8>>(7)?;
    let found = if p.block > 0 { block_hash } else { v1_hash };
    let at = Some(p.seq);
    Ok(match found {
        Some(h) if h == p.hash && (p.block == 0 || block_end == Some(p.seq)) => None,
        Some(_) => Some((
            at,
            format!(
                "the trail was rewritten since the digest: {} differs from it",
                if p.block > 0 {
                    format!("sealed block {}", p.block)
                } else {
                    format!("event {}", p.seq)
                }
            ),
        )),
        None if purged >= p.seq => {
            if purged == p.seq && anchor.as_deref() == Some(p.hash.as_slice()) {
                None // purged exactly through the digest's point, which is the anchor now
            } else {
                Some((
                    at,
                    format!("the digest's position {} has been purged (the trail starts after position {purged}): verify against a newer digest", p.seq),
                ))
            }
        }
        None => Some((
            at,
            if p.block > 0 {
                format!(
                    "the trail was truncated since the digest: it names sealed block {}, the trail ends at block {last_block}",
                    p.block
                )
            } else {
                format!(
                    "the trail was truncated since the digest: it names position {}, the v1 chain ends at {last_v1}",
                    p.seq
                )
            },
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::Point;

    #[test]
    fn lines_round_trip_and_bad_ones_are_refused() {
        let p = Point {
            org: "org:with:colons".into(),
            block: 7,
            seq: 1234,
            hash: (0..32).collect(),
        };
        let line = p.line();
        let q = Point::parse(&line).unwrap();
        assert_eq!(
            (q.org.as_str(), q.block, q.seq, q.hash.clone()),
            ("org:with:colons", 7, 1234, p.hash.clone())
        );
        for bad in [
            "",
            "pg_tenancy-digest:2:a:1:1:00",
            &line.replace(":7:", ":x:"),
            &line[..line.len() - 2],
            &format!("{line}zz"),
            "pg_tenancy-digest:1:1:1:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(Point::parse(bad).is_err(), "{bad}");
        }
    }
}
