//! Writes bites as `.ogg` files under a directory, one folder per
//! conversation: `DIR/<conversation>/<start>-<userid>-<clientid>.ogg`.
//! Ids are percent-encoded into file names, so no id can name a path
//! outside `DIR` (`..`, `/`, NUL and friends are all encoded).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use percent_encoding::utf8_percent_encode;

use crate::permissions::SEGMENT;
use crate::sfu::FinishedBite;

/// An id as a safe single path component.
pub fn safe_component(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

/// Where a bite is written under `dir`.
pub fn bite_path(dir: &Path, b: &FinishedBite) -> PathBuf {
    dir.join(safe_component(&b.conversation)).join(format!(
        "{}-{}-{}.ogg",
        b.start_unix_ms,
        safe_component(&b.userid),
        safe_component(&b.clientid)
    ))
}

/// Writes the bite (to a temporary name first, so readers never see half a file).
pub fn write_bite(dir: &Path, b: &FinishedBite, ogg: &[u8]) -> io::Result<PathBuf> {
    let path = bite_path(dir, b);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("ogg.part");
    fs::write(&tmp, ogg)?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bite(conv: &str, user: &str) -> FinishedBite {
        FinishedBite {
            conversation: conv.into(),
            userid: user.into(),
            clientid: "c/1".into(),
            start_unix_ms: 17,
            packets: 1,
            duration_ms: 20,
            audio: Default::default(),
        }
    }

    #[test]
    fn ids_cannot_escape_the_directory() {
        let dir = Path::new("/srv/bites");
        let p = bite_path(dir, &bite("..", "../../etc/passwd"));
        assert_eq!(
            p,
            Path::new("/srv/bites/%2E%2E/17-%2E%2E%2F%2E%2E%2Fetc%2Fpasswd-c%2F1.ogg")
        );
        assert!(p.starts_with(dir));
        assert_eq!(p.components().count(), dir.components().count() + 2);
    }

    #[test]
    fn writes_atomically() {
        let dir = std::env::temp_dir().join(format!("beep-sfu-files-{}", std::process::id()));
        let p = write_bite(&dir, &bite("room 1", "alice"), b"OggS").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"OggS");
        assert!(!p.with_extension("ogg.part").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
