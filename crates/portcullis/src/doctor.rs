//! `portcullis doctor ...`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
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
