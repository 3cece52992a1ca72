//! The admin surface on a real loopback socket, called by curl: a web page open on the
//! admin's machine must not be able to read it through a rebound name (DNS rebinding) or
//! change a setting with a form or a script (CSRF); admin tools still can.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use runtime::admin::{self, Control, ReloadError};

struct Counting {
    log: logs::Log,
    reloads: AtomicUsize,
}

impl Control for Counting {
    fn log(&self) -> &logs::Log {
        &self.log
    }

    fn reload(&self) -> Result<String, ReloadError> {
        self.reloads.fetch_add(1, Ordering::SeqCst);
        Ok("reloaded".into())
    }
}

/// The status code and body of a curl call with `args` to `path` on `port`.
fn call(port: u16, method: &str, path: &str, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl must be installed");
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').unwrap_or((&all, ""));
    (code.to_string(), body.to_string())
}

#[test]
fn the_admin_surface_refuses_what_a_web_page_could_send() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let control = Arc::new(Counting {
        log: logs::Logger::new("TEST").into_log(),
        reloads: AtomicUsize::new(0),
    });
    let listening = runtime
        .block_on(admin::serve(
            "127.0.0.1:0".parse().unwrap(),
            control.clone(),
        ))
        .unwrap();
    let port = listening.addr.port();
    let verbose = || control.log.is_verbose();

    // A name that is not loopback, on any call (a rebound name reading /status too).
    for host in [
        "evil.example",
        "evil.example:80",
        "127.0.0.1.evil.example",
        "[::2]",
        "",
    ] {
        let header = format!("Host: {host}");
        let (code, body) = call(port, "GET", "/status", &["-H", &header]);
        assert_eq!(code, "403", "{host}: {body}");
        assert!(body.contains("loopback"), "{host}: {body}");
    }
    let (code, body) = call(
        port,
        "PUT",
        "/verbose",
        &[
            "-H",
            "Host: evil.example",
            "-H",
            "Content-Type: application/json",
            "--data",
            "\"on\"",
        ],
    );
    assert_eq!(code, "403", "{body}");
    // Loopback names and addresses, with and without a port.
    for host in [
        "localhost".to_string(),
        format!("LocalHost:{port}"),
        "127.0.0.1".to_string(),
        format!("127.1.2.3:{port}"),
        "[::1]".to_string(),
        format!("[::1]:{port}"),
    ] {
        let header = format!("Host: {host}");
        let (code, body) = call(port, "GET", "/status", &["-H", &header]);
        assert_eq!(code, "200", "{host}: {body}");
    }

    // Any Origin on a call that changes something (a script's fetch sends one).
    let (code, body) = call(
        port,
        "PUT",
        "/verbose",
        &[
            "-H",
            "Origin: http://evil.example",
            "-H",
            "Content-Type: application/json",
            "--data",
            "\"on\"",
        ],
    );
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("Origin"), "{body}");
    let (code, body) = call(port, "POST", "/reload", &["-H", "Origin: http://localhost"]);
    assert_eq!(code, "403", "{body}");

    // The content types an HTML form sends with no preflight.
    for content_type in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "Text/Plain; charset=utf-8",
    ] {
        let header = format!("Content-Type: {content_type}");
        let (code, body) = call(port, "PUT", "/verbose", &["-H", &header, "--data", "on"]);
        assert_eq!(code, "415", "{content_type}: {body}");
        assert!(body.contains("application/json"), "{body}");
        let (code, body) = call(port, "POST", "/reload", &["-H", &header, "--data", ""]);
        assert_eq!(code, "415", "{content_type}: {body}");
    }
    // curl --data's default is a form.
    let (code, body) = call(port, "PUT", "/verbose", &["--data", "on"]);
    assert_eq!(code, "415", "{body}");
    assert!(!verbose());
    assert_eq!(control.reloads.load(Ordering::SeqCst), 0);

    // What an admin tool sends: JSON, or a bare word with no content type.
    let (code, body) = call(
        port,
        "PUT",
        "/verbose",
        &["-H", "Content-Type: application/json", "--data", "\"on\""],
    );
    assert_eq!(code, "200", "{body}");
    assert!(verbose());
    let (code, body) = call(
        port,
        "PUT",
        "/verbose",
        &["-H", "Content-Type:", "--data-binary", "off"],
    );
    assert_eq!(code, "200", "{body}");
    assert!(!verbose());
    let (code, body) = call(
        port,
        "PUT",
        "/verbose",
        &["-H", "Content-Type: application/json", "--data", "true"],
    );
    assert_eq!(code, "200", "{body}");
    assert!(verbose());
    let (code, body) = call(port, "POST", "/reload", &[]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "reloaded\n"));
    assert_eq!(control.reloads.load(Ordering::SeqCst), 1);
    runtime.block_on(listening.stop());
}

/// A component whose configuration file is never valid, for what `POST /reload` answers then.
struct Refusing {
    log: logs::Log,
}

fn invalid() -> runtime::config::ConfigError {
    runtime::config::ConfigError::Invalid {
        path: "gateway.toml".into(),
        key: "verbose",
        reason: "is not true or false".into(),
    }
}

impl Control for Refusing {
    fn log(&self) -> &logs::Log {
        &self.log
    }

    fn reload(&self) -> Result<String, ReloadError> {
        Err(invalid().into())
    }
}

/// A refused reload is answered 422 with the reason as its error reads, nothing added; so is
/// one the component refused.
#[test]
fn a_refused_reload_answers_with_its_reason() {
    let refused = ReloadError::Refused(Box::new(std::io::Error::other("no key in the store")));
    assert_eq!(refused.to_string(), "no key in the store");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let control = Arc::new(Refusing {
        log: logs::Logger::new("TEST").into_log(),
    });
    let listening = runtime
        .block_on(admin::serve("127.0.0.1:0".parse().unwrap(), control))
        .unwrap();
    let (code, body) = call(listening.addr.port(), "POST", "/reload", &[]);
    assert_eq!((code.as_str(), body), ("422", format!("{}\n", invalid())));
    runtime.block_on(listening.stop());
}

/// The metrics surface may face a pod network: it serves at most METRICS_MAX_CONNECTIONS
/// connections at once and closes the rest on arrival, so idle connections cannot pile up;
/// a slot freed is served again.
#[test]
fn the_metrics_surface_closes_connections_over_its_cap() {
    use std::io::Read;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let control = Arc::new(Counting {
        log: logs::Logger::new("TEST").into_log(),
        reloads: AtomicUsize::new(0),
    });
    let listening = runtime
        .block_on(admin::serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            control,
        ))
        .unwrap();
    let port = listening.addr.port();
    let (code, _) = call(port, "GET", "/healthz", &[]);
    assert_eq!(code, "200");
    let mut held: Vec<std::net::TcpStream> = (0..admin::METRICS_MAX_CONNECTIONS)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Every slot is taken once the server has accepted them all: the next is closed.
    let over = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        extra
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut byte = [0u8; 1];
        if matches!(extra.read(&mut byte), Ok(0)) {
            break;
        }
        assert!(
            std::time::Instant::now() < over,
            "a connection over the cap of {} stayed open",
            admin::METRICS_MAX_CONNECTIONS
        );
    }
    held.pop();
    let freed = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while call(port, "GET", "/healthz", &[]).0 != "200" {
        assert!(
            std::time::Instant::now() < freed,
            "a freed slot is never served"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(held);
    runtime.block_on(listening.stop());
}
