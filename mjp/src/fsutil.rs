//! Small file-system helpers shared by every writer of results: nothing is ever half-written.

use std::io::Write;
use std::path::Path;

use crate::error::{MjpError, Result};

/// Writes `bytes` to `path` via a temporary file in the same directory and a rename, so readers
/// never see a partial file and a crash leaves the previous version intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomic(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| MjpError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| MjpError::io(tmp, e))
    })
}

/// Removes the temporary files an interrupted [`write_atomic`] or [`replace_atomic`] left in
/// `dir` (a kill between write and rename); returns how many. Call only where no other process
/// is writing into `dir`.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with('.') && name.contains(".tmp-")
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Like [`write_atomic`], for writers that stream into a file of their own: `write` creates and
/// fills the temporary path it is given; the file is then synced and renamed over `path`.
pub fn replace_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| MjpError::io(dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    // The pid alone is not unique: two containers sharing a volume are both pid 1, and the
    // coordinator and the adversary each write report.md (a shared temporary name made one
    // writer's rename fail). Random bits make every writer's temporary its own.
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| MjpError::io(&tmp, e))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| MjpError::io(path, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn concurrent_writers_of_one_file_never_share_a_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.md");
        std::thread::scope(|s| {
            for k in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        super::write_atomic(path, &[k; 4096]).unwrap();
                    }
                });
            }
        });
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() == 4096 && bytes.iter().all(|&b| b == bytes[0]));
        assert_eq!(super::remove_stale_temps(dir.path()), 0);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        super::write_atomic(&dir.path().join("state.json"), b"{}").unwrap();
        std::fs::write(dir.path().join(".state.json.tmp-4242"), b"half").unwrap();
        assert_eq!(super::remove_stale_temps(dir.path()), 1);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("state.json")]);
    }
}
