//! What `portcullis doctor certs` prints: the trail exactly as the connector logs it, every
//! certificate's fate with its fix, and the choice. Text for people, one JSON object for
//! machines; both built from the same [`Selection`].

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::cert::{Certificate, ExtendedKeyUsage, KeyUsage};
use crate::chain::ChainEnd;
use crate::filter::{date_text, Fate, Selection};
use crate::roots::RootSet;
use crate::store::{CertStore, KeyState};

#[derive(Debug, Serialize)]
pub struct CertReport {
    pub store: PathBuf,
    pub allowed_roots: Vec<String>,
    pub ignored_files: Vec<PathBuf>,
    pub notes: Vec<String>,
    pub evaluated_at: String,
    /// The trail, line by line, as the connector logs it.
    pub trail: Vec<String>,
    pub certificates: Vec<CertRow>,
    pub selected: Option<Chosen>,
}

#[derive(Debug, Serialize)]
pub struct CertRow {
    /// 1-based, as the text table numbers them.
    pub number: usize,
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub key_usage: Option<KeyUsage>,
    pub extended_key_usage: Option<ExtendedKeyUsage>,
    pub thumbprint: String,
    pub sha256: String,
    pub file: PathBuf,
    pub key_file: Option<PathBuf>,
    pub key: KeyState,
    /// Subjects from the certificate up to where its chain ends.
    pub chain: Vec<String>,
    pub chain_complete: bool,
    /// `selected`, `passed` or `rejected`.
    pub fate: &'static str,
    /// For a rejected certificate: the stage, the kind of rejection, the reason and the fix.
    pub stage: Option<&'static str>,
    pub rejection: Option<&'static str>,
    pub reason: Option<String>,
    pub fix: Option<&'static str>,
    pub extension_problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Chosen {
    pub number: usize,
    pub subject: String,
    pub thumbprint: String,
    pub why: String,
    pub file: PathBuf,
}

impl CertReport {
    pub fn new(store: &CertStore, allowed: &RootSet, selection: &Selection) -> CertReport {
        let certificates: Vec<CertRow> = selection
            .judged
            .iter()
            .map(|judged| {
                let entry = &store.entries[judged.entry];
                let c: &Certificate = &entry.cert;
                let (fate, rejection) = match &judged.fate {
                    Fate::Selected => ("selected", None),
                    Fate::Passed => ("passed", None),
                    Fate::Rejected { rejection } => ("rejected", Some(rejection)),
                };
                CertRow {
                    number: judged.entry + 1,
                    subject: c.subject.clone(),
                    issuer: c.issuer.clone(),
                    sans: c.sans.clone(),
                    serial: c.serial.clone(),
                    not_before: date_text(c.not_before),
                    not_after: date_text(c.not_after),
                    key_usage: c.key_usage.clone(),
                    extended_key_usage: c.extended_key_usage.clone(),
                    thumbprint: c.thumbprint.clone(),
                    sha256: c.sha256.clone(),
                    file: entry.source.clone(),
                    key_file: entry.key_source.clone(),
                    key: entry.key.clone(),
                    chain: judged
                        .chain
                        .certs
                        .iter()
                        .map(|c| c.subject.clone())
                        .collect(),
                    chain_complete: judged.chain.end == ChainEnd::Root,
                    fate,
                    stage: rejection.map(|r| r.stage().count_words()),
                    rejection: rejection.map(|r| r.short()),
                    reason: rejection.map(|r| r.reason()),
                    fix: rejection.map(|r| r.fix()),
                    extension_problems: c.extension_problems.clone(),
                }
            })
            .collect();
        let selected = selection.selected.map(|i| {
            let why = selection
                .trail
                .iter()
                .find_map(|l| match l {
                    crate::filter::TrailLine::Selected { why, .. } => Some(why.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            Chosen {
                number: i + 1,
                subject: store.entries[i].cert.subject.clone(),
                thumbprint: store.entries[i].cert.thumbprint.clone(),
                why,
                file: store.entries[i].source.clone(),
            }
        });
        CertReport {
            store: store.location.clone(),
            allowed_roots: allowed.certs.iter().map(|c| c.label()).collect(),
            ignored_files: store.ignored.clone(),
            notes: store.notes.clone(),
            evaluated_at: date_text(selection.evaluated_at),
            trail: selection.trail.iter().map(|l| l.to_string()).collect(),
            certificates,
            selected,
        }
    }

    /// The human-readable report.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Certificate store: {}", self.store.display());
        let _ = writeln!(out, "Allowed root CAs ({}):", self.allowed_roots.len());
        for root in &self.allowed_roots {
            let _ = writeln!(out, "  {root}");
        }
        let _ = writeln!(out, "Evaluated at: {}", self.evaluated_at);
        for file in &self.ignored_files {
            let _ = writeln!(
                out,
                "Ignored (not a certificate or key file): {}",
                file.display()
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "Note: {note}");
        }

        let _ = writeln!(out, "\nFilter chain, as the connector logs it:");
        for line in &self.trail {
            let _ = writeln!(out, "  {line}");
        }

        let _ = writeln!(out, "\nEvery certificate's fate:");
        let width = self
            .certificates
            .iter()
            .map(|c| c.subject.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let _ = writeln!(
            out,
            "  {:>3}  {:<width$}  {:<40}  {:<10}  FATE",
            "#", "SUBJECT", "THUMBPRINT", "EXPIRES"
        );
        for row in &self.certificates {
            let fate = match row.rejection {
                Some(kind) => format!("rejected: {kind}"),
                None => row.fate.to_string(),
            };
            let _ = writeln!(
                out,
                "  {:>3}  {:<width$}  {:<40}  {:<10}  {}",
                row.number,
                row.subject,
                row.thumbprint,
                row.not_after.get(..10).unwrap_or(&row.not_after),
                fate
            );
        }

        let _ = writeln!(out, "\nDetails:");
        for row in &self.certificates {
            let _ = writeln!(out, "  #{} {}", row.number, row.subject);
            let _ = writeln!(out, "      issuer:     {}", row.issuer);
            if !row.sans.is_empty() {
                let _ = writeln!(out, "      SANs:       {}", row.sans.join(", "));
            }
            let _ = writeln!(out, "      serial:     {}", row.serial);
            let _ = writeln!(
                out,
                "      valid:      {} to {}",
                row.not_before, row.not_after
            );
            let ku = row
                .key_usage
                .as_ref()
                .map(|k| k.names.join(", "))
                .unwrap_or_else(|| "(no extension)".into());
            let _ = writeln!(out, "      key usage:  {ku}");
            let eku = row
                .extended_key_usage
                .as_ref()
                .map(|e| e.purposes.join(", "))
                .unwrap_or_else(|| "(no extension)".into());
            let _ = writeln!(out, "      EKU:        {eku}");
            let _ = writeln!(out, "      SHA-256:    {}", row.sha256);
            let _ = writeln!(out, "      file:       {}", row.file.display());
            let key = match &row.key {
                KeyState::Absent => "none".to_string(),
                KeyState::Usable => "usable".to_string(),
                KeyState::Unusable(why) => format!("unusable: {why}"),
            };
            let key_from = row
                .key_file
                .as_ref()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default();
            let _ = writeln!(out, "      key:        {key}{key_from}");
            let mut chain = row.chain.join(" <- ");
            if !row.chain_complete {
                chain.push_str(" <- ? (incomplete)");
            }
            let _ = writeln!(out, "      chain:      {chain}");
            for problem in &row.extension_problems {
                let _ = writeln!(out, "      problem:    {problem}");
            }
            match (&row.reason, row.fix) {
                (Some(reason), Some(fix)) => {
                    let _ = writeln!(
                        out,
                        "      fate:       rejected at {}: {reason}",
                        row.stage.unwrap_or("?")
                    );
                    let _ = writeln!(out, "      fix:        {fix}");
                }
                _ => {
                    let _ = writeln!(out, "      fate:       {}", row.fate);
                }
            }
        }

        // One fix per kind of rejection, with the certificates it applies to.
        let mut fixes: Vec<(&str, Vec<usize>)> = Vec::new();
        for row in &self.certificates {
            if let Some(fix) = row.fix {
                match fixes.iter_mut().find(|(f, _)| *f == fix) {
                    Some((_, numbers)) => numbers.push(row.number),
                    None => fixes.push((fix, vec![row.number])),
                }
            }
        }
        if !fixes.is_empty() {
            let _ = writeln!(out, "\nFixes:");
            for (fix, numbers) in fixes {
                let list: Vec<String> = numbers.iter().map(|n| format!("#{n}")).collect();
                let _ = writeln!(out, "  {}: {fix}", list.join(", "));
            }
        }

        let _ = writeln!(out);
        match &self.selected {
            Some(chosen) => {
                let _ = writeln!(
                    out,
                    "Selected: #{} {} (thumbprint {})\n  why: {}\n  file: {}",
                    chosen.number,
                    chosen.subject,
                    chosen.thumbprint,
                    chosen.why,
                    chosen.file.display()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "Selected: none. The connector has no client authentication certificate: every HTTPS endpoint that requires one answers 403, and devices see 403 CMGConnector_Clientcertificaterequired. Apply a fix above."
                );
            }
        }
        out
    }
}
