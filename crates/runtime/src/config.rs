//! TOML configuration: read once at start, every error naming the file, the key and the reason.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

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
}

/// Configuration files are small; refuse anything that is clearly not one.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
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
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

/// Paths in a configuration file are relative to the file's directory.
pub fn resolve(config_file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        config_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(path)
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
