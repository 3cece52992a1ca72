//! `portcullis pki ...`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use pki::lab::{LabOptions, LabPki, MAX_LAB_DEVICES};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Write a lab PKI: root CA, gateway and management point server certificates, the
    /// connector's channel and client-auth certificates, and device certificates.
    ///
    /// Every key is ECDSA P-256; every certificate has the key usages and EKUs a real
    /// deployment needs. DIR/README.md lists each file and its use. For labs and tests only:
    /// the root CA's key is written in the clear.
    Init(InitArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Names and IP addresses for the gateway's and management point's server certificates,
    /// comma-separated.
    #[arg(
        long,
        value_name = "a,b",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub hosts: Vec<String>,
    /// How many device certificates (devices/device-NNN.crt and .key).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=MAX_LAB_DEVICES as i64))]
    pub devices: u32,
    /// Replace a lab PKI already in DIR.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCommand::Init(args) => {
            let lab = init(&args)?;
            println!("Wrote a lab PKI to {}:", args.out.display());
            for file in &lab.files {
                println!("  {:<36} {}", file.path.display(), file.purpose);
            }
            println!(
                "\nCheck the connector's certificate choice:\n  {} doctor certs --store {} --allowed-roots {}",
                crate::this_program(),
                args.out.join(pki::lab::layout::CONNECTOR_STORE).display(),
                args.out.join(pki::lab::layout::ROOT_CERT).display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn init(args: &InitArgs) -> anyhow::Result<LabPki> {
    let hosts: Vec<String> = args.hosts.iter().map(|h| h.trim().to_string()).collect();
    let options = LabOptions {
        hosts,
        devices: args.devices as usize,
    };
    if options.devices > 100 {
        eprintln!("issuing {} device certificates...", options.devices);
    }
    let lab = LabPki::issue(&options)?;
    lab.write(&args.out, args.force)
        .with_context(|| format!("writing the lab PKI to {}", args.out.display()))?;
    Ok(lab)
}
