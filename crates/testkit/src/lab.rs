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

    pub fn config(&self, extra: &str) -> PathBuf {
        let file = self.path("mp.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"127.0.0.1:0\"\ncert = \"mp/server.crt\"\nkey = \"mp/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nw3c_log = \"logs/u_ex.log\"\n{extra}"
            ),
        )
        .unwrap();
        file
    }

    pub fn w3c(&self) -> String {
        std::fs::read_to_string(self.path("logs/u_ex.log")).unwrap_or_default()
    }
}

pub fn with_mp<T>(lab: &Lab, extra: &str, test: impl FnOnce(String) -> T) -> T {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = MpConfig::load(&lab.config(extra)).unwrap();
    let running = runtime.block_on(mp::start(config)).unwrap();
    let base = format!("https://localhost:{}", running.addr.port());
    let result = test(base);
    runtime.block_on(running.stop());
    result
}
