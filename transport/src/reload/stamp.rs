//! Whether a watched file changed ([`FileStamp`]).

use std::path::Path;

/// A file's metadata, read through its path (symlinks followed): which
/// file it is (device, inode), its size and its times. A Secret volume's
/// swap puts another file behind the path (another inode, whatever its
/// times); a write in place moves the size or the times, the change time
/// included, so a same-length rewrite within one modification-time tick
/// is seen too. The relay's TLS files, the edge's, the route agent's CA
/// and the admin token files are all watched by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// `path`'s [`FileStamp`]; `None` when it cannot be read (absent).
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// What [`TlsPaths::stamp`](super::TlsPaths::stamp) compares: each
/// file's [`FileStamp`].
pub type Stamp = Vec<Option<FileStamp>>;

/// The stamps of `paths` (see [`Stamp`]), following symlinks (a
/// Kubernetes volume swaps its files by replacing a symlink).
pub fn stamp_of(paths: &[&Path]) -> Stamp {
    paths.iter().map(|p| file_stamp(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// What a stamp of modification time and length missed: a file
    /// swapped in behind the path with the same length and modification
    /// time (another inode), and one rewritten in place to the same length
    /// with its modification time put back (its change time moved).
    #[test]
    fn a_stamp_sees_a_swap_and_a_rewrite_that_keep_length_and_mtime() {
        use std::os::unix::fs::MetadataExt;
        let dir = TempDir::new("relay-stamp");
        let path = dir.0.join("tls.crt");
        std::fs::write(&path, b"first").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mtime = meta.modified().unwrap();
        // A file system keeping whole seconds (nanoseconds 0) needs one to
        // pass before a change time can move.
        let tick = if meta.ctime_nsec() == 0 { 1100 } else { 20 };
        let before = file_stamp(&path).unwrap();
        assert_eq!(file_stamp(&path), Some(before), "nothing changed");
        // A Secret volume's swap: another file, same length and time.
        let next = dir.0.join("next");
        std::fs::write(&next, b"other").unwrap();
        set_mtime(&next, mtime);
        std::fs::rename(&next, &path).unwrap();
        let swapped = file_stamp(&path).unwrap();
        assert_ne!(swapped, before, "swapped in behind the path");
        // Rewritten in place, same length, the modification time put back.
        std::thread::sleep(Duration::from_millis(tick));
        std::fs::write(&path, b"third").unwrap();
        set_mtime(&path, mtime);
        let rewritten = file_stamp(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5);
        assert_ne!(rewritten, swapped, "rewritten in place");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file_stamp(&path), None, "gone");
        assert_eq!(stamp_of(&[path.as_path()]), vec![None]);
    }

    /// A directory of this test process's, removed when dropped (a failed
    /// assertion included).
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn set_mtime(path: &Path, at: SystemTime) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(at).unwrap();
    }
}
