//! TOML configuration: read once at start, every error naming the file, the key and the reason.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message already names the key, the line and the column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("{path}: cannot write the configuration: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value TOML cannot hold, such as a path that is not UTF-8; the file is left as it was.
    #[error("{path}: cannot write the configuration as TOML: {message}")]
    Serialize { path: PathBuf, message: String },
}

/// The top-level keys two configurations give the same value (compared as they serialize).
/// A write-then-load test sets every key away from its starting value and expects none here:
/// a key the writer dropped or misspelled would otherwise round-trip unnoticed.
pub fn keys_with_equal_values<T: Serialize>(a: &T, b: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    a.iter()
        .filter(|(key, value)| b.get(key.as_str()) == Some(value))
        .map(|(key, _)| key.clone())
        .collect()
}

/// Configuration files are small; refuse anything that is clearly not one.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    parse_toml(&read_text(path)?, path)
}

/// The text of the configuration file at `path`: a regular file of at most a megabyte.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!(
                "not a configuration file (a regular file of at most {MAX_CONFIG_BYTES} bytes)"
            ),
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// Parses `text`, the configuration file at `path` (named in errors): what [`load_toml`] does
/// once the file is read.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

/// Writes `value` as the TOML file `path`, for [`load_toml`] to read back: the one writer of
/// every configuration file, so labs, benches and tests write them as typed values instead of
/// text. Relative paths in `value` stay relative, to be read from the file's directory.
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let text = toml::to_string(value).map_err(|e| ConfigError::Serialize {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The directory a configuration file's relative paths are read from: its own.
pub fn dir_of(config_file: &Path) -> &Path {
    config_file.parent().unwrap_or_else(|| Path::new("."))
}

/// Paths in a configuration file are relative to the file's directory.
pub fn resolve(config_file: &Path, path: &Path) -> PathBuf {
    resolve_in(dir_of(config_file), path)
}

/// `path` read from `dir`, unless it is absolute.
pub fn resolve_in(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

/// Why a `worker_threads` setting cannot be used, if it cannot.
pub fn worker_threads_problem(threads: Option<usize>) -> Option<String> {
    match threads {
        Some(n) if n == 0 || n > MAX_WORKER_THREADS => Some(format!(
            "{n} is not a thread count: give 1 to {MAX_WORKER_THREADS}, or leave it out for one per CPU"
        )),
        _ => None,
    }
}

const MAX_WORKER_THREADS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, Serialize)]
    struct Sample {
        id: u64,
        name: Option<String>,
        roots: Vec<PathBuf>,
    }

    #[test]
    fn what_write_toml_writes_load_toml_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.toml");
        let sample = Sample {
            id: 72057594037927939,
            name: None,
            roots: vec!["ca/root.crt".into()],
        };
        write_toml(&path, &sample).unwrap();
        assert_eq!(load_toml::<Sample>(&path).unwrap(), sample);
        // No null in TOML: an absent option is a missing key.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("name"), "{text}");
    }

    #[cfg(unix)]
    #[test]
    fn a_value_toml_cannot_hold_is_an_error_and_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.toml");
        std::fs::write(&path, "before").unwrap();
        use std::os::unix::ffi::OsStrExt;
        let sample = Sample {
            id: 1,
            name: None,
            roots: vec![PathBuf::from(std::ffi::OsStr::from_bytes(b"ca/\xff.crt"))],
        };
        match write_toml(&path, &sample) {
            Err(ConfigError::Serialize { path: named, .. }) => assert_eq!(named, path),
            other => panic!("expected a serialization error, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "before");
        let missing = dir.path().join("no-such-dir/sample.toml");
        assert!(matches!(
            write_toml(
                &missing,
                &Sample {
                    id: 1,
                    name: None,
                    roots: vec![]
                }
            ),
            Err(ConfigError::Write { .. })
        ));
    }

    #[test]
    fn relative_paths_are_read_from_the_file_directory() {
        let file = Path::new("/etc/portcullis/gateway.toml");
        assert_eq!(
            resolve(file, Path::new("ca/root.crt")),
            Path::new("/etc/portcullis/ca/root.crt")
        );
        assert_eq!(
            resolve(file, Path::new("/ca/root.crt")),
            Path::new("/ca/root.crt")
        );
        assert_eq!(
            resolve(Path::new("gateway.toml"), Path::new("ca/root.crt")),
            Path::new("ca/root.crt")
        );
    }
}
