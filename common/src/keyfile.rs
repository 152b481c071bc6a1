//! Private keys on disk: a key another user could read is as good as handed out, so agent and
//! coordinator refuse to start with one.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Refuses a private key file that group or others may read or write, naming the file and the fix.
pub fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the private key {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the private key {} has mode {mode:04o}, so users other than its owner can read it; run `chmod 600 {}` (and keep it owned by the user bbupgrade runs as), then start again",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_other_bits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        std::fs::write(&key, "x").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private(&key);
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600"), "{e}");
                assert!(e.to_string().contains(&key.display().to_string()), "{e}");
            }
        }
        assert!(check_private(&dir.path().join("missing")).is_err());
    }
}
