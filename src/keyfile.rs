//! Reading secret files named by a setting (the signed-context key now, the PHI key ring
//! later), with the same refusal Postgres applies to `ssl_key_file`: the file must belong to
//! the server's OS user and must not be readable by group or others.

use std::fs;
use std::os::unix::fs::MetadataExt;
use zeroize::Zeroizing;

/// Largest secret file we read; a key file is a few hundred bytes.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why a key file was refused. The text names the file's properties, never its contents.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeyFileProblem(pub String);

/// Reads a secret file after checking owner and mode. The returned bytes are zeroised when
/// dropped.
pub(crate) fn read_secret_file(path: &str) -> Result<Zeroizing<Vec<u8>>, KeyFileProblem> {
    if !path.starts_with('/') {
        return Err(KeyFileProblem("the path must be absolute".into()));
    }
    let meta = fs::metadata(path).map_err(|e| KeyFileProblem(format!("cannot stat: {e}")))?;
    check_metadata(&meta, effective_uid())?;
    let bytes = fs::read(path).map_err(|e| KeyFileProblem(format!("cannot read: {e}")))?;
    Ok(Zeroizing::new(bytes))
}

/// Owner, type, size and permission checks, separated out so they can be unit tested.
pub(crate) fn check_metadata(meta: &fs::Metadata, server_uid: u32) -> Result<(), KeyFileProblem> {
    if !meta.is_file() {
        return Err(KeyFileProblem("not a regular file".into()));
    }
    if meta.uid() != server_uid {
        return Err(KeyFileProblem(format!(
            "owned by uid {}, but the server runs as uid {server_uid}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileProblem(format!(
            "permissions {mode:04o} allow group or other access; use 0600 or 0400"
        )));
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileProblem(format!(
            "{} bytes is too large for a key file",
            meta.len()
        )));
    }
    Ok(())
}

/// Decodes a hex key (surrounding whitespace ignored) of at least `min_len` bytes.
pub(crate) fn decode_hex_key(
    raw: &[u8],
    min_len: usize,
) -> Result<Zeroizing<Vec<u8>>, KeyFileProblem> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| KeyFileProblem("the key must be hex text".into()))?
        .trim();
    let key = Zeroizing::new(
        hex::decode(text).map_err(|_| KeyFileProblem("the key is not valid hex".into()))?,
    );
    if key.len() < min_len {
        return Err(KeyFileProblem(format!(
            "the key is {} bytes; at least {min_len} are required",
            key.len()
        )));
    }
    Ok(key)
}

/// Keys of a key file that may hold more than one (a rotation): one hex key per line, blank
/// lines and `#` comments ignored, at most `max`, each at least `min_len` bytes.
pub(crate) fn decode_hex_keys(
    raw: &[u8],
    min_len: usize,
    max: usize,
) -> Result<Vec<Zeroizing<Vec<u8>>>, KeyFileProblem> {
    let text =
        std::str::from_utf8(raw).map_err(|_| KeyFileProblem("the key must be hex text".into()))?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| decode_hex_key(l.as_bytes(), min_len))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(KeyFileProblem("the file holds no key".into()));
    }
    if keys.len() > max {
        return Err(KeyFileProblem(format!(
            "the file holds {} keys; at most {max} (the current one and, during a rotation, one more)",
            keys.len()
        )));
    }
    Ok(keys)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn temp_key(mode: u32, contents: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        (dir, path.to_string_lossy().into_owned())
    }

    #[test]
    fn test_private_file_is_read() {
        let (_d, path) = temp_key(0o600, "00ff\n");
        assert_eq!(&read_secret_file(&path).unwrap()[..], b"00ff\n");
    }

    #[test]
    fn test_group_or_world_readable_file_is_refused() {
        for mode in [0o640, 0o604, 0o644, 0o660] {
            let (_d, path) = temp_key(mode, "00");
            let err = read_secret_file(&path).unwrap_err();
            assert!(err.0.contains("group or other"), "{mode:o}: {}", err.0);
        }
    }

    #[test]
    fn test_foreign_owner_is_refused() {
        let (_d, path) = temp_key(0o600, "00");
        let meta = fs::metadata(&path).unwrap();
        let err = check_metadata(&meta, meta.uid() + 1).unwrap_err();
        assert!(err.0.contains("owned by uid"));
    }

    #[test]
    fn test_relative_path_and_directory_are_refused() {
        assert!(read_secret_file("key").unwrap_err().0.contains("absolute"));
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = read_secret_file(dir.path().to_str().unwrap()).unwrap_err();
        assert!(err.0.contains("regular file"));
    }

    #[test]
    fn test_hex_key_decoding() {
        let k = decode_hex_key(b"  0011223344556677 \n", 8).unwrap();
        assert_eq!(k.len(), 8);
        assert!(decode_hex_key(b"0011", 8)
            .unwrap_err()
            .0
            .contains("at least 8"));
        assert!(decode_hex_key(b"zz", 1)
            .unwrap_err()
            .0
            .contains("not valid hex"));
        // The problem text never echoes the file's contents.
        let secret = "ab".repeat(3) + "q";
        assert!(!decode_hex_key(secret.as_bytes(), 1)
            .unwrap_err()
            .0
            .contains("ababab"));
    }
}
