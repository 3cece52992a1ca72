//! A lab PKI in a temporary directory, and the reference management point serving from it
//! in-process, for tests of the management point and the probe.

use std::path::PathBuf;

use mp::{self, MpConfig};
use pki::lab::{LabOptions, LabPki};

pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

impl Lab {
    /// The lab `portcullis pki init` makes, with its defaults.
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        LabPki::issue(&LabOptions::default())
            .unwrap()
            .write(dir.path(), false)
            .unwrap();
        Lab { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes the management point's configuration (the lab's, with its W3C log in
    /// `logs/u_ex.log`), changed by `change`, to `mp.toml` in the lab.
    pub fn config(&self, change: impl FnOnce(&mut MpConfig)) -> PathBuf {
        let file = self.path("mp.toml");
        let mut config = MpConfig::lab();
        config.w3c_log = Some("logs/u_ex.log".into());
        change(&mut config);
        config.write(&file).unwrap();
        file
    }

    pub fn w3c(&self) -> String {
        std::fs::read_to_string(self.path("logs/u_ex.log")).unwrap_or_default()
    }
}

/// Runs `test` with the base URL of a management point serving from `lab`, its configuration
/// changed by `change`.
pub fn with_mp<T>(
    lab: &Lab,
    change: impl FnOnce(&mut MpConfig),
    test: impl FnOnce(String) -> T,
) -> T {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = MpConfig::load(&lab.config(change)).unwrap();
    let running = runtime.block_on(mp::start(config)).unwrap();
    let base = format!("https://localhost:{}", running.addr.port());
    let result = test(base);
    runtime.block_on(running.stop());
    result
}
