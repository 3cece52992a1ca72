//! A running connector as its admin surface sees it: [`ConnectorControl`], its
//! `runtime::admin::Control`, which `portcullis connector`, `portcullis dev` and the tests
//! serve. Made by `RunningConnector::control`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use logs::Log;
use runtime::admin::{Control, ReloadError};
use runtime::metrics::{Expiry, Readiness};

use crate::config::ConnectorConfig;
use crate::dial::Tasks;
use crate::lock;
use crate::service::Service;

/// Reloads from the file at `path` (SIGHUP or `POST /reload`); turning verbose on replays the
/// certificate filter trail of the current choice.
pub struct ConnectorControl {
    pub(crate) path: PathBuf,
    pub(crate) service: Arc<Service>,
    pub(crate) tasks: Arc<Mutex<Tasks>>,
    /// The configuration it started with: what a reload cannot change is compared with it.
    pub(crate) started: Arc<ConnectorConfig>,
}

impl ConnectorControl {
    fn client_certificate(&self) -> Option<String> {
        self.service.client.load().selected_label()
    }
}

impl Control for ConnectorControl {
    fn log(&self) -> &Log {
        &self.service.log
    }

    fn reload(&self) -> Result<String, ReloadError> {
        let loaded = ConnectorConfig::load(&self.path)
            .map_err(ReloadError::from)
            .and_then(|c| {
                crate::run::reload(&self.service, &self.started, &c)
                    .map_err(|e| ReloadError::Refused(Box::new(e)))
            });
        runtime::admin::reloaded(self.log(), &self.path, loaded)
    }

    fn verbose_turned_on(&self) {
        let trail = lock(&self.service.trail);
        for (severity, line) in trail.iter() {
            self.service.log.write(*severity, line);
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "client_certificate": self.client_certificate(),
            "channels_kept": lock(&self.tasks).dials,
        })
    }

    fn metrics(&self) -> String {
        self.service
            .metrics
            .render(self.client_certificate().is_some())
    }

    fn certificates(&self) -> Vec<Expiry> {
        self.service.metrics.certificates()
    }

    fn readiness(&self) -> Readiness {
        let mut https: Vec<u64> = self
            .service
            .endpoints
            .load()
            .iter()
            .filter(|(_, url)| url.scheme_str() == Some("https"))
            .map(|(id, _)| *id)
            .collect();
        https.sort_unstable();
        self.service
            .metrics
            .readiness(self.client_certificate(), https)
    }
}
