//! A directory of a test's own, removed when dropped (also while a failed
//! assertion unwinds), so no lab test leaves files behind.

use std::path::{Path, PathBuf};

/// A directory removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<temp>/<name>-<pid>`, emptied and created.
    pub fn new(name: &str) -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
