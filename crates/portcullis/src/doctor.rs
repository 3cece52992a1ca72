//! `portcullis doctor ...`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use logs::diagnose::{Diagnosis, Rules};
use logs::parse::ParseError;
use pki::report::CertReport;
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet};
use time::OffsetDateTime;

#[derive(Subcommand)]
pub enum DoctorCommand {
    /// Run the connector's client-certificate filter chain on a store and explain it.
    ///
    /// Prints the chain exactly as the connector logs it, then every certificate's fate with
    /// the fix for each kind of rejection, then the selected certificate.
    ///
    /// Stages, in order: key usage includes Digital Signature; chains to an allowed root CA
    /// (and has a private key); the private key is usable; enhanced key usage includes Client
    /// Authentication (1.3.6.1.5.5.7.3.2); valid now. Among survivors the latest expiry wins,
    /// then the lowest thumbprint.
    ///
    /// The store is a directory of name.crt + name.key pairs, .pem files holding a
    /// certificate and its key, .pfx/.p12 files, and certificates without keys.
    ///
    /// Exit status: 0 a certificate is selected; 1 none is; 2 bad usage or unreadable input.
    Certs(CertsArgs),
    /// Read logs and name the known failure in them, with its evidence and the fix.
    ///
    /// Reads CMTrace logs (LocationServices.log, CcmMessaging.log, SMS_Cloud_ProxyConnector.log,
    /// ... and the older "$$<" SMS lines), IIS W3C extended logs (u_ex*.log, by their #Fields
    /// line), Portcullis console output (plain or JSON), and any other text line by line (lines
    /// pasted from a forum work too). The format and encoding (UTF-8, UTF-16 with or without
    /// BOM, Windows-1252) come from the content, not the file name. Directories are read
    /// recursively; files in them that are not text are skipped with a note.
    ///
    /// For each failure found: what it is, the cause, the evidence lines as file:line (the same
    /// failure seen by the device, the connector and the endpoint's IIS is one finding), the
    /// lines that explain it (such as the connector's certificate filter trail), and the
    /// resolution.
    ///
    /// Exit status: 0 no known failure found; 1 a failure was found; 2 bad usage or unreadable
    /// input (a missing file, a file that is not a text log).
    Logs(LogsArgs),
}

#[derive(Args)]
pub struct LogsArgs {
    /// Log files, or directories to read recursively.
    #[arg(value_name = "FILE|DIR", required = true)]
    pub paths: Vec<PathBuf>,
    /// Print one JSON object instead of text:
    /// {"findings":[{"id","title","cause","resolution","evidence":[{"file","line","text"}],"supporting":[...],"count"}],"files":[{"path","format","records","skipped",...}],"notes":[...]}
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CertsArgs {
    /// The certificate store: a directory (or one certificate file).
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Allowed root CA certificates: PEM/DER files or directories of them. Repeat for more.
    #[arg(long, value_name = "FILE", required = true)]
    pub allowed_roots: Vec<PathBuf>,
    /// Environment variable holding the password of .pfx/.p12 files in the store (when unset,
    /// the empty password is tried).
    #[arg(long, value_name = "VAR", default_value = "PORTCULLIS_PFX_PASSWORD")]
    pub pfx_password_env: String,
    /// Judge validity at this moment instead of now (RFC 3339, e.g. 2027-01-31T00:00:00Z):
    /// "will my certificate still be chosen next month?"
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<OffsetDateTime>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("\"{text}\" is not an RFC 3339 time like 2027-01-31T00:00:00Z: {e}"))
}

pub fn run(cmd: DoctorCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DoctorCommand::Certs(args) => certs(&args),
        DoctorCommand::Logs(args) => logs(&args),
    }
}

pub fn certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    let allowed = RootSet::load(&args.allowed_roots)?;
    let store = CertStore::load(
        &args.store,
        &Pkcs12Password::from_env(&args.pfx_password_env),
    )?;
    let now = args.at.unwrap_or_else(OffsetDateTime::now_utc);
    let selection = select_client_cert(&store, &allowed, now);
    let report = CertReport::new(&store, &allowed, &selection);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if selection.selected.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn logs(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let rules = Rules::builtin().context("the built-in rule table")?;
    // Every named path first: a typo should not wait for a long read.
    for path in &args.paths {
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    }
    let mut diagnosis = Diagnosis::new(&rules);
    for path in &args.paths {
        if path.is_dir() {
            let mut files = Vec::new();
            let mut notes = Vec::new();
            walk(path, 0, &mut files, &mut notes);
            for note in notes {
                diagnosis.note(note);
            }
            for file in files {
                announce_if_large(&file);
                match diagnosis.read_path(&file) {
                    Ok(_) => {}
                    Err(ParseError::NotText { why, .. }) => diagnosis.note(format!(
                        "skipped {}: not a text log ({why})",
                        file.display()
                    )),
                    Err(e @ (ParseError::Open { .. } | ParseError::IsDirectory { .. })) => {
                        diagnosis.note(format!("skipped {e}"))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        } else {
            announce_if_large(path);
            diagnosis.read_path(path)?;
        }
    }
    let report = diagnosis.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Files from this size on get a progress line on standard error while they are read.
const LARGE_FILE: u64 = 64 * 1024 * 1024;

fn announce_if_large(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.len() >= LARGE_FILE {
            eprintln!(
                "Reading {} ({} MiB)...",
                path.display(),
                meta.len() / (1024 * 1024)
            );
        }
    }
}

/// Directories deeper than this are not read.
const MAX_DEPTH: usize = 16;

/// Files under `dir`, sorted, recursively; symbolic links to directories are not followed.
fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, notes: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        notes.push(format!(
            "skipped {}: more than {MAX_DEPTH} directories deep",
            dir.display()
        ));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            notes.push(format!("skipped {}: {e}", dir.display()));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, depth + 1, files, notes),
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(meta) if meta.file_type().is_symlink() => {
                if path.is_file() {
                    files.push(path);
                } else {
                    notes.push(format!("skipped {}: a link to a directory", path.display()));
                }
            }
            Ok(_) => notes.push(format!("skipped {}: not a regular file", path.display())),
            Err(e) => notes.push(format!("skipped {}: {e}", path.display())),
        }
    }
}
