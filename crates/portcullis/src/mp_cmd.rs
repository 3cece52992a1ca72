//! `portcullis mp --config FILE`: the reference management point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use mp::{self, MpConfig};

/// Run the reference management point (labs and tests).
///
/// An HTTPS endpoint that answers like a Configuration Manager management point behind IIS:
/// `GET /SMS_MP/.sms_aut?MPLIST` (also MPLIST2, SITESIGNCERT, MPKEYINFORMATION), and
/// `POST /portcullis/echo`, which streams the request body back; `GET /portcullis/echo` answers
/// its query string back and `GET /portcullis/trickle?chunks=N&bytes=B&every_ms=M` sends a
/// body a chunk at a time (at most 1,000 chunks of 64 KiB, 10 s apart), for the fault drill.
/// Client certificates follow
/// IIS's settings; refusals carry IIS's 403 sub-status (7 none, 16 untrusted, 17 expired), in
/// the body, in the `x-iis-substatus` header and in the W3C log.
///
/// Configuration (TOML; paths relative to the file):
///
///   listen = "127.0.0.1:8443"
///   cert = "mp/server.crt"
///   key = "mp/server.key"
///   client_certificates = "require"   # ignore | accept | require
///   trusted_roots = ["ca/root.crt"]
///   w3c_log = "logs/u_ex.log"          # optional
///   name = "mp.portcullis.lab"         # optional
///   site_code = "PCL"                  # optional
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct MpArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

pub fn run(args: MpArgs) -> anyhow::Result<ExitCode> {
    let config = MpConfig::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let running = mp::start(config).await?;
        println!(
            "reference management point listening on https://{}",
            running.addr
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        running.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
