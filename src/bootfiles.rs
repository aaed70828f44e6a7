//! Resolving a client-supplied file name beneath `boot_dir`, for TFTP and HTTP alike.
//!
//! Both services serve `boot_dir` read-only. A name is accepted only if it is made of plain
//! components (no `..`, no absolute path, no NUL) **and** the file it finally resolves to —
//! symlinks followed — still lies beneath the canonical `boot_dir`, so a symlink cannot lead out.

use std::path::{Component, Path, PathBuf};

/// Why a name is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootFileError {
    #[error("{0:?} is not a plain relative path")]
    BadName(String),
    #[error("{0:?} does not exist")]
    NotFound(String),
    #[error("{0:?} leads outside the boot folder")]
    Outside(String),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
}

/// The canonical path of `name` beneath `root`, if it is a regular file that stays inside.
pub fn resolve_beneath(root: &Path, name: &str) -> Result<PathBuf, BootFileError> {
    let trimmed = name.trim_start_matches('/');
    let bad = || BootFileError::BadName(name.to_string());
    if trimmed.is_empty() || trimmed.contains('\0') || trimmed.contains('\\') {
        return Err(bad());
    }
    let rel = Path::new(trimmed);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    let root = root
        .canonicalize()
        .map_err(|_| BootFileError::NotFound(name.to_string()))?;
    let full = root
        .join(rel)
        .canonicalize()
        .map_err(|_| BootFileError::NotFound(name.to_string()))?;
    if !full.starts_with(&root) {
        return Err(BootFileError::Outside(name.to_string()));
    }
    if !full.is_file() {
        return Err(BootFileError::NotAFile(name.to_string()));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("boot");
        std::fs::create_dir_all(root.join("efi")).unwrap();
        std::fs::write(root.join("ipxe.efi"), b"x").unwrap();
        std::fs::write(root.join("efi/grub.efi"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("ipxe.efi"), root.join("alias.efi")).unwrap();

        assert!(resolve_beneath(&root, "ipxe.efi").is_ok());
        assert!(resolve_beneath(&root, "/efi/grub.efi").is_ok());
        assert!(
            resolve_beneath(&root, "alias.efi").is_ok(),
            "symlinks inside are fine"
        );
        assert_eq!(
            resolve_beneath(&root, "escape"),
            Err(BootFileError::Outside("escape".into()))
        );
        for bad in [
            "../secret",
            "efi/../../secret",
            "",
            "a\0b",
            "..\\secret",
            "./ipxe.efi",
        ] {
            assert!(
                matches!(resolve_beneath(&root, bad), Err(BootFileError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            resolve_beneath(&root, "missing"),
            Err(BootFileError::NotFound(_))
        ));
        assert!(matches!(
            resolve_beneath(&root, "efi"),
            Err(BootFileError::NotAFile(_))
        ));
    }
}
