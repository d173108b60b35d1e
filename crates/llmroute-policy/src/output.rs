//! Output files of the commands that write results into a folder (`llmroute train` and
//! `llmroute eval`): an early check of the folder, and the replacement of a set of files in
//! it as a whole.
//!
//! [`replace_files`] writes each new file to a temporary file in the same folder, syncs it,
//! and renames the files into place only when every one of them is written. While it renames,
//! the previous version of each file is kept under a temporary name (a hard link, or a copy
//! where the file system has no hard links), so that a failed rename puts every earlier file
//! back. Temporary names start with a dot and the target's name and are unique, so two
//! writers in one folder never share one.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A failure to check an output folder or to replace files in it. Each variant names the path
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{path} is a file, not a folder. Pass the path of a folder, which is created if missing"
    )]
    NotAFolder { path: PathBuf },
    #[error("failed to create the folder {path}: {source}")]
    CreateFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot create files in the folder {path}: {source}. Make the folder writable or pass another folder"
    )]
    NotWritable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "failed to write {path}: {source}. No file was replaced. Free disk space or raise the file-size limit, then run again"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "failed to keep a copy of the previous {path} before replacing it: {source}. {restore}"
    )]
    Backup {
        path: PathBuf,
        source: std::io::Error,
        restore: RestoreReport,
    },
    #[error(
        "failed to move the new {path} into place: {source}. {restore} Check that {path} is not a folder and that this user may replace it"
    )]
    Replace {
        path: PathBuf,
        source: std::io::Error,
        restore: RestoreReport,
    },
}

/// The outcome of putting back the files that [`replace_files`] had replaced before it failed.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Files whose previous version could not be put back: the target, the temporary file that
    /// still contains the previous version (`None` when there was none), and the error.
    pub failures: Vec<(PathBuf, Option<PathBuf>, std::io::Error)>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.is_empty() {
            return write!(formatter, "The previous files are unchanged.");
        }
        for (path, backup, error) in &self.failures {
            match backup {
                Some(backup) => write!(
                    formatter,
                    "Restoring the previous {} failed too ({error}): rename {} to {} by hand.",
                    path.display(),
                    backup.display(),
                    path.display()
                )?,
                None => write!(
                    formatter,
                    "Removing the new {} failed too ({error}): it does not match the other files.",
                    path.display()
                )?,
            }
        }
        Ok(())
    }
}

/// Checks that `folder` can take output files before a long run starts: creates it when it is
/// missing, and fails when it is a file or when no file can be created in it.
pub fn prepare_folder(folder: &Path) -> Result<(), OutputError> {
    match std::fs::metadata(folder) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => {
            return Err(OutputError::NotAFolder {
                path: folder.to_path_buf(),
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(folder).map_err(|source| OutputError::CreateFolder {
                path: folder.to_path_buf(),
                source,
            })?;
        }
        Err(source) => {
            return Err(OutputError::CreateFolder {
                path: folder.to_path_buf(),
                source,
            });
        }
    }
    // Permission bits do not tell whether a file can be created (root, ACLs, read-only
    // mounts, immutable folders), so create one and let it be deleted on drop.
    tempfile::Builder::new()
        .prefix(".llmroute-write-check-")
        .tempfile_in(folder)
        .map_err(|source| OutputError::NotWritable {
            path: folder.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// Writes each `(file name, contents)` of `files` into `folder`, replacing any previous
/// version, and returns the paths written, in order.
///
/// Every file is written and synced under a temporary name before the first rename. On any
/// error the temporary files are removed, and the files already renamed get their previous
/// version back (or are removed when there was none), so the folder keeps its previous
/// files. The error names any previous version that could not be put back and where it is kept.
/// A reader that opens the files while they are renamed can still see a mix of old and new
/// files, but two `replace_files` calls on one folder take turns (on Unix, through an
/// advisory lock on the folder).
///
/// # Panics
///
/// Panics when a file name is not a single path component.
pub fn replace_files<N: AsRef<Path>>(
    folder: &Path,
    files: &[(N, &[u8])],
) -> Result<Vec<PathBuf>, OutputError> {
    prepare_folder(folder)?;
    let mut staged = Vec::with_capacity(files.len());
    for (name, contents) in files {
        let name = name.as_ref();
        assert!(
            name.file_name() == Some(name.as_os_str()),
            "output file name {name:?} must be a single path component"
        );
        let target = folder.join(name);
        let temporary =
            write_temporary(folder, name, contents).map_err(|source| OutputError::Write {
                path: target.clone(),
                source,
            })?;
        staged.push((name, target, temporary));
    }

    let _lock = lock_folder(folder);
    let mut replaced: Vec<(PathBuf, Option<NamedTempFile<()>>)> = Vec::new();
    for (name, target, temporary) in staged {
        let previous = match keep_previous(folder, name, &target) {
            Ok(previous) => previous,
            Err(source) => {
                return Err(OutputError::Backup {
                    path: target,
                    source,
                    restore: restore(replaced),
                });
            }
        };
        if let Err(error) = temporary.persist(&target) {
            // `error.file` is dropped here, which deletes the temporary file. `previous` is
            // dropped too: the target was not replaced, so it still has that version.
            return Err(OutputError::Replace {
                path: target,
                source: error.error,
                restore: restore(replaced),
            });
        }
        replaced.push((target, previous));
    }
    sync_folder(folder);
    // Dropping the kept previous versions deletes them.
    Ok(replaced.into_iter().map(|(target, _)| target).collect())
}

/// Writes `contents` to a new temporary file for `name` in `folder` and syncs it.
fn write_temporary(folder: &Path, name: &Path, contents: &[u8]) -> std::io::Result<NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    // tempfile creates files readable by the owner only, but these outputs are read by other
    // programs (a sidecar, a report viewer), so ask for what `std::fs::write` would create.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut temporary = builder
        .prefix(&temporary_prefix(name))
        .suffix(".tmp")
        .tempfile_in(folder)?;
    temporary.write_all(contents)?;
    temporary.as_file().sync_all()?;
    Ok(temporary)
}

/// Keeps the current entry at `target` under a temporary name, or returns `None` when there
/// is none or it is a folder.
fn keep_previous(
    folder: &Path,
    name: &Path,
    target: &Path,
) -> std::io::Result<Option<NamedTempFile<()>>> {
    match std::fs::symlink_metadata(target) {
        // Renaming a file onto a folder fails, so a folder is never replaced.
        Ok(metadata) if metadata.is_dir() => return Ok(None),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    }
    // On Linux `hard_link` links a symbolic link itself, not the file it points to, so a
    // restored link still points where it did.
    let prefix = temporary_prefix(name);
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".previous");
    let linked = builder.make_in(folder, |path| std::fs::hard_link(target, path));
    match linked {
        Ok(previous) => Ok(Some(previous)),
        Err(error) => {
            tracing::debug!(path = %target.display(), %error, "failed to hard-link the previous file, so copying it");
            let copied = builder.make_in(folder, |path| {
                let mut copy = File::options().write(true).create_new(true).open(path)?;
                std::io::copy(&mut File::open(target)?, &mut copy)?;
                copy.sync_all()
            })?;
            Ok(Some(copied))
        }
    }
}

/// Returns `.{name}.`, the start of every temporary name for the file `name`: hidden, and
/// easy to trace back to its file.
fn temporary_prefix(name: &Path) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    prefix
}

/// Puts back the previous version of each replaced file, newest first, and reports the files
/// it could not put back.
fn restore(replaced: Vec<(PathBuf, Option<NamedTempFile<()>>)>) -> RestoreReport {
    let mut report = RestoreReport::default();
    for (target, previous) in replaced.into_iter().rev() {
        match previous {
            Some(previous) => {
                if let Err(error) = previous.persist(&target) {
                    let backup = error.file.into_temp_path().keep().ok();
                    tracing::error!(path = %target.display(), backup = ?backup, error = %error.error, "failed to restore the previous file");
                    report.failures.push((target, backup, error.error));
                }
            }
            None => {
                if let Err(error) = std::fs::remove_file(&target) {
                    tracing::error!(path = %target.display(), %error, "failed to remove a new file after a failed replacement");
                    report.failures.push((target, None, error));
                }
            }
        }
    }
    report
}

/// Takes an exclusive advisory lock on `folder` until the returned file is dropped. Only other
/// `replace_files` calls wait for it. A folder that cannot be locked (some network file
/// systems) is written without the lock.
fn lock_folder(folder: &Path) -> Option<File> {
    if !cfg!(unix) {
        return None;
    }
    let locked = File::open(folder).and_then(|handle| handle.lock().map(|()| handle));
    match locked {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(folder = %folder.display(), %error, "failed to lock the output folder, so a concurrent writer could mix its files with these");
            None
        }
    }
}

/// Syncs `folder` so that the renames survive a crash. A failure only costs that guarantee,
/// so it is logged and not returned.
fn sync_folder(folder: &Path) {
    if !cfg!(unix) {
        return;
    }
    if let Err(error) = File::open(folder).and_then(|handle| handle.sync_all()) {
        tracing::warn!(folder = %folder.display(), %error, "failed to sync the output folder");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replace_files_writes_and_replaces() {
        let folder = tempfile::tempdir().unwrap();
        let out = folder.path().join("new");
        let written = replace_files(&out, &[("a.onnx", b"first"), ("a.json", b"{}")]).unwrap();
        assert_eq!(written, [out.join("a.onnx"), out.join("a.json")]);
        replace_files(&out, &[("a.onnx", b"second"), ("a.json", b"[]")]).unwrap();
        assert_eq!(std::fs::read(out.join("a.onnx")).unwrap(), b"second");
        assert_eq!(std::fs::read(out.join("a.json")).unwrap(), b"[]");
        assert_eq!(names_in(&out), ["a.json", "a.onnx"]);
    }

    #[cfg(unix)]
    #[test]
    fn replaced_files_are_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let folder = tempfile::tempdir().unwrap();
        replace_files(folder.path(), &[("a.onnx", b"bytes")]).unwrap();
        let mode = std::fs::metadata(folder.path().join("a.onnx"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o044, 0o044, "mode {mode:o}");
    }

    #[test]
    fn failed_rename_restores_earlier_files() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("a.onnx"), b"old onnx").unwrap();
        let blocker = folder.path().join("a.json");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("inside"), b"kept").unwrap();

        let error =
            replace_files(folder.path(), &[("a.onnx", b"new"), ("a.json", b"{}")]).unwrap_err();
        assert!(matches!(error, OutputError::Replace { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("a.json"), "{message}");
        assert!(
            message.contains("previous files are unchanged"),
            "{message}"
        );
        assert_eq!(
            std::fs::read(folder.path().join("a.onnx")).unwrap(),
            b"old onnx"
        );
        assert_eq!(std::fs::read(blocker.join("inside")).unwrap(), b"kept");
        assert_eq!(names_in(folder.path()), ["a.json", "a.onnx"]);
    }

    #[test]
    fn failed_rename_removes_files_that_were_new() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::create_dir(folder.path().join("b.md")).unwrap();
        let error =
            replace_files(folder.path(), &[("a.json", b"{}"), ("b.md", b"# new")]).unwrap_err();
        assert!(matches!(error, OutputError::Replace { .. }), "{error}");
        assert_eq!(names_in(folder.path()), ["b.md"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn failed_rename_restores_symbolic_link() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("real.onnx"), b"old onnx").unwrap();
        let link = folder.path().join("a.onnx");
        std::os::unix::fs::symlink("real.onnx", &link).unwrap();
        std::fs::create_dir(folder.path().join("a.json")).unwrap();

        replace_files(folder.path(), &[("a.onnx", b"new"), ("a.json", b"{}")]).unwrap_err();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("real.onnx"),
            "the link was not restored"
        );
        assert_eq!(std::fs::read(&link).unwrap(), b"old onnx");
        assert_eq!(names_in(folder.path()), ["a.json", "a.onnx", "real.onnx"]);
    }

    #[test]
    fn file_as_folder_is_rejected() {
        let folder = tempfile::tempdir().unwrap();
        let file = folder.path().join("out");
        std::fs::write(&file, b"not a folder").unwrap();
        let error = replace_files(&file, &[("a.json", b"{}")]).unwrap_err();
        assert!(matches!(error, OutputError::NotAFolder { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("is a file, not a folder"), "{message}");
        assert!(!message.contains("File exists"), "{message}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
    }

    #[test]
    fn prepare_folder_creates_missing_folders() {
        let folder = tempfile::tempdir().unwrap();
        let nested = folder.path().join("a").join("b");
        prepare_folder(&nested).unwrap();
        assert!(nested.is_dir());
        assert!(names_in(&nested).is_empty(), "the write check left a file");
    }

    #[test]
    fn prepare_folder_under_file_fails() {
        let folder = tempfile::tempdir().unwrap();
        let file = folder.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let error = prepare_folder(&file.join("sub")).unwrap_err();
        assert!(matches!(error, OutputError::CreateFolder { .. }), "{error}");
    }

    #[test]
    fn concurrent_writers_leave_matching_files() {
        let folder = tempfile::tempdir().unwrap();
        std::thread::scope(|scope| {
            for writer in 0..4u8 {
                let folder = folder.path();
                scope.spawn(move || {
                    for round in 0..25u8 {
                        let contents = [writer, round];
                        replace_files(folder, &[("a.onnx", &contents), ("a.json", &contents)])
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(
            std::fs::read(folder.path().join("a.onnx")).unwrap(),
            std::fs::read(folder.path().join("a.json")).unwrap()
        );
        assert_eq!(names_in(folder.path()), ["a.json", "a.onnx"]);
    }

    #[test]
    #[should_panic(expected = "single path component")]
    fn nested_file_name_panics() {
        let folder = tempfile::tempdir().unwrap();
        let _ = replace_files(folder.path(), &[("sub/a.json", b"{}")]);
    }
}
