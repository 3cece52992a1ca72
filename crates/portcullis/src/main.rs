//! The `portcullis` binary: command-line parsing and wiring. The work is done in the crates.

/// mimalloc instead of glibc's malloc: a device request allocates and frees some thirty small
/// blocks in each of the gateway and the connector, and glibc's free and consolidation cost
/// several thousand instructions of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its arenas eagerly on Linux by default, which doubled the gateway's and
/// the connector's resident memory under load (26 -> 52 MiB together); committing pages as
/// they are used keeps it where glibc had it. The option must be set before the first Rust
/// allocation creates the arena (the runtime allocates before `main`), so it is set from the
/// ELF constructors, which run before the Rust runtime starts.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static COMMIT_MEMORY_ON_DEMAND: extern "C" fn() = commit_memory_on_demand;

#[cfg(target_os = "linux")]
extern "C" fn commit_memory_on_demand() {
    // mimalloc's `mi_option_arena_eager_commit` (mimalloc.h, `mi_option_e`).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: sets one global option; nothing else runs yet.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
}

mod analyze_cmd;
mod bench_cmd;
mod dev;
mod doctor;
mod mp_cmd;
mod pki_cmd;
mod probe_cmd;
mod serve_cmd;
mod token_cmd;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Portcullis: a self-hosted cloud management gateway.
///
/// Devices on the internet reach management services inside a private network through an
/// internet-facing gateway fed by an on-premise connector that only dials out. Every hop is
/// certificate-authenticated; when one fails, Portcullis says which, why, and what to do.
#[derive(Parser)]
#[command(name = "portcullis", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Variants without a doc comment take their arguments' (about and the long help, with the
// configuration each one reads), so `--help` shows all of it.
#[derive(Subcommand)]
enum Command {
    /// Bring the lab system up on this machine and print what to try.
    Dev(dev::DevArgs),
    Gateway(serve_cmd::GatewayArgs),
    Connector(serve_cmd::ConnectorArgs),
    Mp(mp_cmd::MpArgs),
    Probe(probe_cmd::ProbeArgs),
    /// Lab PKI: make a root CA and every certificate a lab needs.
    #[command(subcommand)]
    Pki(pki_cmd::PkiCommand),
    Analyze(analyze_cmd::AnalyzeArgs),
    /// Load, idle connections, and the side-by-side comparison with nginx and rathole.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Site token keys, and device tokens for CCM_PROXY_SERVERAUTH routes.
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
    /// Diagnose: explain what a component would do, and what to fix.
    #[command(subcommand)]
    Doctor(doctor::DoctorCommand),
}

/// Exit status for bad usage or unreadable input, as clap uses for usage errors.
pub const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Pki(cmd) => pki_cmd::run(cmd),
        Command::Gateway(args) => serve_cmd::gateway(args),
        Command::Connector(args) => serve_cmd::connector(args),
        Command::Mp(args) => mp_cmd::run(args),
        Command::Probe(args) => probe_cmd::run(args),
        Command::Doctor(cmd) => doctor::run(cmd),
        Command::Analyze(args) => analyze_cmd::run(args),
        Command::Token(cmd) => token_cmd::run(cmd),
        Command::Bench(cmd) => bench_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// How to run this very binary from the current directory, so printed lines work when pasted
/// (after `cargo run`, `portcullis` is not on PATH).
pub fn this_program() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "portcullis".into();
    };
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(|p| Path::new(".").join(p)));
    relative.unwrap_or(exe).display().to_string()
}
