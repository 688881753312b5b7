//! Operators' switches (a paused facade) in `controls.json` beside the
//! database file: small, rarely written, replaced whole and atomically.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sagaflow::log::LogError;

/// The switches' file for the database file at `db`.
pub(crate) fn path(db: &Path) -> PathBuf {
    db.with_file_name("controls.json")
}

/// The switches, none if the file does not exist yet.
pub(crate) fn read(path: &Path) -> Result<BTreeMap<String, String>, LogError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| LogError::corrupt(format!("operator switches in {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(LogError::unavailable(format!("cannot read {}", path.display()), e)),
    }
}

/// Sets or clears one switch: the whole file is written aside, synced, and
/// renamed over the old one, so a crash leaves either version.
pub(crate) fn set(path: &Path, key: &str, value: Option<&str>) -> Result<(), LogError> {
    let mut controls = read(path)?;
    match value {
        Some(value) => controls.insert(key.to_owned(), value.to_owned()),
        None => controls.remove(key),
    };
    let failed = |e: std::io::Error| LogError::unavailable(format!("cannot write {}", path.display()), e);
    let aside = path.with_extension("json.new");
    let mut file = std::fs::File::create(&aside).map_err(failed)?;
    let json = serde_json::to_vec_pretty(&controls)
        .map_err(|e| LogError::corrupt("operator switches cannot be serialized", e))?;
    file.write_all(&json).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&aside, path).map_err(failed)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_set_cleared_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(&dir.path().join("sagas.redb"));
        assert!(read(&file).unwrap().is_empty());
        set(&file, "pause:A", Some("ops")).unwrap();
        set(&file, "pause:B", Some("ops")).unwrap();
        set(&file, "pause:A", None).unwrap();
        assert_eq!(read(&file).unwrap().into_iter().collect::<Vec<_>>(), [("pause:B".to_owned(), "ops".to_owned())]);
        std::fs::write(&file, b"{ not json").unwrap();
        assert!(matches!(read(&file), Err(LogError::Corrupt { .. })));
    }
}
