//! `portcullis token ...`: the site's token keys, and device tokens signed with them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use gateway::token::{self, IssueRequest, TokenKind};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a site token key pair: DIR/token.key (private, PKCS#8) and DIR/token.pub.
    ///
    /// The private key signs device tokens (`portcullis token issue --key DIR/token.key`);
    /// the public key goes in the gateway's [tokens] keys. During a rotation list the old and
    /// the new public key; remove the old one (and reload the gateway with SIGHUP) once every
    /// device has a token signed by the new one.
    Keygen(KeygenArgs),
    /// Issue a device token (a JWT, ES256 or EdDSA by the key's type), printed on stdout.
    ///
    /// Devices send it as `Authorization: Bearer <token>` on CCM_PROXY_SERVERAUTH routes.
    /// The token id (jti), for the gateway's revocation list, is printed on stderr.
    ///
    /// Exit status: 0 issued; 2 bad usage or an unreadable key.
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct KeygenArgs {
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// An Ed25519 key (EdDSA tokens) instead of P-256 (ES256).
    #[arg(long)]
    pub ed25519: bool,
    /// Replace a key pair already there.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct IssueArgs {
    /// The site's private key (PEM PKCS#8, P-256 or Ed25519).
    #[arg(long, value_name = "SITEKEY")]
    pub key: PathBuf,
    /// The device the token names; the gateway forwards it as the device's identity.
    #[arg(long, value_name = "NAME")]
    pub subject: String,
    /// Days until it expires.
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
    /// Endpoint ids it is good for, comma-separated (default: every endpoint).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub endpoints: Vec<u64>,
    /// A bulk registration token: long-lived, accepted only on the registration paths.
    #[arg(long)]
    pub bulk: bool,
    #[arg(long, default_value_t = token::default_issuer())]
    pub issuer: String,
    #[arg(long, default_value_t = token::default_audience())]
    pub audience: String,
    /// Not valid until this many seconds from now (negative: already valid before now).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub not_before_secs: i64,
}

pub fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Keygen(args) => {
            let key = args.out.join("token.key");
            let public = args.out.join("token.pub");
            if !args.force && (key.exists() || public.exists()) {
                anyhow::bail!(
                    "{}: a key pair is already there; pass --force to replace it (tokens signed by the old key stop working)",
                    args.out.display()
                );
            }
            let (private_pem, public_pem) = pki::lab::token_key_pair(args.ed25519)?;
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            pki::lab::write_file(&key, private_pem.as_bytes(), true)
                .with_context(|| format!("writing {}", key.display()))?;
            std::fs::write(&public, public_pem)
                .with_context(|| format!("writing {}", public.display()))?;
            println!(
                "{}: the site's token signing key (keep it secret)\n{}: for the gateway's [tokens] keys",
                key.display(),
                public.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Issue(args) => {
            if args.subject.trim().is_empty() {
                anyhow::bail!("--subject: name the device");
            }
            let request = IssueRequest {
                subject: args.subject,
                days: args.days,
                endpoints: args.endpoints,
                issuer: args.issuer,
                audience: args.audience,
                kind: if args.bulk {
                    TokenKind::Bulk
                } else {
                    TokenKind::Device
                },
                not_before_offset_secs: args.not_before_secs,
            };
            let (token, id) = token::issue(&args.key, &request, time::OffsetDateTime::now_utc())?;
            println!("{token}");
            eprintln!("token id (jti): {id}; expires in {} days", args.days);
            Ok(ExitCode::SUCCESS)
        }
    }
}
