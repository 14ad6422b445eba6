//! Tenant, actor and label rules: what `set_org` and the PHI functions accept, and their
//! limits. A leaf: other modules validate through here.

use crate::error::{Result, TenancyError};
use crate::gucs::TenantIdFormat;

/// Longest text tenant id or actor id accepted.
pub(crate) const MAX_ID_LEN: usize = 128;
/// Longest accepted PHI context label.
pub(crate) const MAX_LABEL_LEN: usize = 255;

/// Validates and canonicalises a tenant id under `tenancy.tenant_id_format`.
pub(crate) fn parse_org(raw: Option<&str>, format: TenantIdFormat) -> Result<String> {
    let raw = raw.ok_or(TenancyError::NullTenant)?;
    if raw.is_empty() {
        return Err(TenancyError::EmptyTenant);
    }
    match format {
        TenantIdFormat::Uuid => uuid::Uuid::try_parse(raw)
            .map(|u| u.hyphenated().to_string())
            .map_err(|_| TenancyError::MalformedTenant {
                reason: format!(
                    "tenancy.tenant_id_format is 'uuid' and the value ({} characters) is not a UUID",
                    raw.chars().count()
                ),
            }),
        TenantIdFormat::Text => check_plain_id(raw)
            .map(str::to_string)
            .map_err(|reason| TenancyError::MalformedTenant { reason }),
    }
}

/// Validates an actor id: same rule as text tenant ids.
pub(crate) fn parse_actor(raw: Option<&str>) -> Result<Option<String>> {
    match raw {
        None => Ok(None),
        Some(a) => check_plain_id(a)
            .map(|a| Some(a.to_string()))
            .map_err(|reason| TenancyError::MalformedActor { reason }),
    }
}

/// 1..=128 printable ASCII characters, none of them a space, quote or backslash: nothing
/// that could break out of a log line, a token message or a quoted literal.
fn check_plain_id(id: &str) -> std::result::Result<&str, String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "the value must be 1 to {MAX_ID_LEN} characters, not {}",
            id.len()
        ));
    }
    if let Some(pos) = id
        .bytes()
        .position(|b| !b.is_ascii_graphic() || matches!(b, b'\'' | b'"' | b'\\'))
    {
        return Err(format!("character {} is not allowed", pos + 1));
    }
    Ok(id)
}

/// A PHI context label: NULL, or 1 to [`MAX_LABEL_LEN`] bytes.
pub(crate) fn check_label(label: Option<&str>) -> Result<()> {
    match label {
        Some(l) if l.is_empty() || l.len() > MAX_LABEL_LEN => Err(TenancyError::PhiBadLabel),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fuzz_tenant_ids_accepted_only_when_well_formed() {
        let mut rng = crate::fuzz::Rng::new(0x5eed_0003);
        let valid = "6f1c1f9e-8d3a-4c7e-9f1e-0a6b5d4c3b2a";
        let mut accepted = 0usize;
        for i in 0..crate::fuzz::iterations() {
            // Every hundredth input is valid: a parser that refused everything fails below.
            let input = if i % 100 == 0 {
                valid.to_string()
            } else if i % 2 == 0 {
                String::from_utf8_lossy(&rng.mutate(valid.as_bytes())).into_owned()
            } else {
                rng.string(140)
            };
            if let Ok(id) = parse_org(Some(&input), TenantIdFormat::Uuid) {
                accepted += 1;
                assert_eq!(
                    id,
                    uuid::Uuid::try_parse(&input)
                        .unwrap()
                        .hyphenated()
                        .to_string()
                );
            }
            if let Ok(id) = parse_org(Some(&input), TenantIdFormat::Text) {
                assert!((1..=128).contains(&id.len()), "{id:?}");
                assert!(
                    id.chars()
                        .all(|c| c.is_ascii_graphic() && !"'\"\\\\".contains(c)),
                    "{id:?}"
                );
            }
            let _ = parse_actor(Some(&input));
        }
        assert!(
            accepted >= crate::fuzz::iterations() / 100,
            "{accepted} accepted"
        );
    }

    #[test]
    fn test_uuid_ids_are_canonicalised() {
        let upper = "6F1C1F9E-8D3A-4C7E-9F1E-0A6B5D4C3B2A";
        assert_eq!(
            parse_org(Some(upper), TenantIdFormat::Uuid).unwrap(),
            upper.to_lowercase()
        );
    }

    #[test]
    fn test_bad_ids_are_refused() {
        use TenantIdFormat::*;
        assert!(matches!(
            parse_org(None, Uuid),
            Err(TenancyError::NullTenant)
        ));
        assert!(matches!(
            parse_org(Some(""), Text),
            Err(TenancyError::EmptyTenant)
        ));
        for bad in [
            "x'; RESET ALL; --",
            "not-a-uuid",
            " 11111111-1111-4111-8111-111111111111",
        ] {
            assert!(
                matches!(
                    parse_org(Some(bad), Uuid),
                    Err(TenancyError::MalformedTenant { .. })
                ),
                "{bad}"
            );
        }
        for bad in [
            "x'; RESET ALL; --",
            "a b",
            "tab\t",
            "q\"",
            "back\\",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    parse_org(Some(bad), Text),
                    Err(TenancyError::MalformedTenant { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(parse_org(Some("org_2xY-9.z"), Text).unwrap(), "org_2xY-9.z");
    }

    #[test]
    fn test_error_detail_does_not_echo_the_input() {
        let err = parse_org(Some("secret-looking-value"), TenantIdFormat::Uuid).unwrap_err();
        assert!(!err.detail().unwrap().contains("secret"));
    }
}
