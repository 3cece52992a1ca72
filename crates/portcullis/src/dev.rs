//! `portcullis dev`: the lab on this machine, set up in one command.
//!
//! Today it makes (or reuses) the lab PKI and runs the connector's certificate choice on it;
//! the gateway, connector and reference management point join it as they are built.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use pki::lab::layout;
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet};
use time::OffsetDateTime;

use crate::pki_cmd;

#[derive(Args)]
pub struct DevArgs {
    /// Where the lab keeps its state (PKI, configs, logs); reused on the next start.
    #[arg(long, value_name = "DIR", default_value = "portcullis-dev")]
    pub dir: PathBuf,
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let reused = dir.join(layout::ROOT_CERT).exists();
    if reused {
        println!("Lab PKI: reusing {}", dir.display());
    } else {
        pki_cmd::init(&pki_cmd::InitArgs {
            out: dir.clone(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            devices: 2,
            force: false,
        })?;
        println!(
            "Lab PKI: wrote {} (its README.md lists every file)",
            dir.display()
        );
    }

    let roots_path = dir.join(layout::ROOT_CERT);
    let store_path = dir.join(layout::CONNECTOR_STORE);
    let allowed = RootSet::load(std::slice::from_ref(&roots_path)).with_context(|| {
        format!(
            "the lab in {} is damaged; remove it to start afresh",
            dir.display()
        )
    })?;
    let store = CertStore::load(
        &store_path,
        &Pkcs12Password::from_env("PORTCULLIS_PFX_PASSWORD"),
    )
    .with_context(|| {
        format!(
            "the lab in {} is damaged; remove it to start afresh",
            dir.display()
        )
    })?;
    let selection = select_client_cert(&store, &allowed, OffsetDateTime::now_utc());

    println!("\nConnector certificate choice ({}):", store_path.display());
    for line in &selection.trail {
        println!("  {line}");
    }

    println!("\nTry:");
    println!(
        "  {} doctor certs --store {} --allowed-roots {}",
        crate::this_program(),
        shown(&store_path),
        shown(&roots_path)
    );
    println!(
        "  openssl verify -CAfile {} {}",
        shown(&roots_path),
        shown(&dir.join(layout::DEVICES).join("device-001.crt"))
    );
    println!(
        "  openssl x509 -noout -text -in {}",
        shown(&dir.join(layout::CLIENT_AUTH_CERT))
    );
    println!(
        "\nThis build has the lab PKI and the certificate doctor; the gateway, the connector and the \
         reference management point are not in it yet, so nothing is listening."
    );
    Ok(if selection.selected.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}
