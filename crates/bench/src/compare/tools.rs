//! Finding the off-the-shelf tools a comparison needs: nginx, rathole, a baseline build.

use super::*;

pub(super) struct Tools {
    pub(super) nginx: Result<PathBuf, String>,
    pub(super) rathole: Result<PathBuf, String>,
    pub(super) baseline: Result<PathBuf, String>,
}

pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    })
}

pub(super) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Tools {
    pub(super) fn find(options: &CompareOptions) -> Tools {
        let nginx = match &options.nginx {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "nginx not found at {} (--nginx); {INSTALL_SCRIPT} installs it",
                p.display()
            )),
            None => Some(PathBuf::from("/usr/sbin/nginx"))
                .filter(|p| is_executable(p))
                .or_else(|| on_path("nginx"))
                .ok_or_else(|| {
                    format!(
                        "nginx not found (/usr/sbin/nginx or on PATH); run {INSTALL_SCRIPT} (apt-get install nginx)"
                    )
                }),
        };
        let rathole = match &options.rathole {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "rathole not found at {} (--rathole); {INSTALL_SCRIPT} installs it",
                p.display()
            )),
            None => {
                let mut places = vec![PathBuf::from("target/bench-tools/bin/rathole")];
                // target/release/portcullis -> target/bench-tools/bin/rathole
                if let Some(target) = options.program.parent().and_then(Path::parent) {
                    places.push(target.join("bench-tools/bin/rathole"));
                }
                on_path("rathole")
                    .or_else(|| places.into_iter().find(|p| is_executable(p)))
                    .ok_or_else(|| {
                        format!(
                            "rathole not found (on PATH or in target/bench-tools/bin); run {INSTALL_SCRIPT}"
                        )
                    })
            }
        };
        let baseline = match &options.baseline {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "the baseline portcullis {} is not an executable file (--baseline)",
                p.display()
            )),
            None => Err("no baseline binary given (--baseline FILE)".into()),
        };
        Tools {
            nginx,
            rathole,
            baseline,
        }
    }

    pub(super) fn missing_for(&self, system: System) -> Option<String> {
        let needs: &[&Result<PathBuf, String>] = match system {
            System::Direct | System::Portcullis => &[],
            System::PortcullisBaseline => &[&self.baseline],
            System::Nginx => &[&self.nginx],
            System::NginxRathole => &[&self.nginx, &self.rathole],
        };
        let missing: Vec<&str> = needs
            .iter()
            .filter_map(|t| t.as_ref().err().map(String::as_str))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    pub(super) fn nginx(&self) -> Result<&Path, String> {
        self.nginx.as_deref().map_err(Clone::clone)
    }
    pub(super) fn rathole(&self) -> Result<&Path, String> {
        self.rathole.as_deref().map_err(Clone::clone)
    }
    pub(super) fn baseline(&self) -> Result<&Path, String> {
        self.baseline.as_deref().map_err(Clone::clone)
    }
}
