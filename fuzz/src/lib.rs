//! What the fuzz targets share: a lab CA (a root, a CRL it signed, a leaf it issued) made once
//! per process, and the checks each parse's outcome gets.

use std::path::Path;
use std::sync::OnceLock;

use pki::crl::RevocationList;
use pki::{Certificate, RootSet};

pub use gateway::fuzzing::logged;

/// The lab root (fuzz/lab: the seeds of the certificate targets were issued by it), the CRL
/// it signed (revoking fuzz/corpus/pki_cert/revoked.der) and a device certificate it issued.
/// Fixed, so a crash found reproduces the same anywhere.
pub struct PkiLab {
    pub roots: RootSet,
    pub crls: Vec<RevocationList>,
    pub leaf: Certificate,
}

pub fn pki_lab() -> &'static PkiLab {
    static LAB: OnceLock<PkiLab> = OnceLock::new();
    LAB.get_or_init(|| match make_pki_lab() {
        Ok(lab) => lab,
        Err(why) => panic!("the fuzz PKI lab cannot be read: {why}"),
    })
}

fn make_pki_lab() -> Result<PkiLab, String> {
    let password = pki::Pkcs12Password::empty();
    let root = include_bytes!("../lab/root.crt");
    let roots = RootSet::from_certs(
        pki::read_bytes(Path::new("lab/root.crt"), root, &password)
            .map_err(|e| e.to_string())?
            .certs,
    );
    let crl = include_bytes!("../lab/root.crl");
    let crls = vec![
        RevocationList::from_bytes(Path::new("lab/root.crl"), crl.to_vec(), &roots)
            .map_err(|e| e.to_string())?,
    ];
    let leaf = Certificate::from_der(include_bytes!("../lab/device.der"))?;
    Ok(PkiLab { roots, crls, leaf })
}

/// Everything the gateway, the connector and `doctor certs` read off a parsed certificate.
pub fn use_certificate(cert: &Certificate) {
    let lab = pki_lab();
    logged(&cert.label());
    let _ = cert.common_name();
    let _ = cert.machine_names();
    if let Err(why) = cert.client_auth_usage(true) {
        logged(&why);
    }
    let _ = cert.has_digital_signature();
    let _ = cert.is_self_issued();
    let _ = cert.is_signed_by(&lab.leaf);
    let _ = pki::crl::status(cert, &lab.crls, time::OffsetDateTime::now_utc());
    let pool: Vec<&Certificate> = lab.roots.certs.iter().collect();
    logged(&pki::chain::build(cert, &pool).describe());
    let _ = serde_json::to_string(cert);
}

/// `doctor logs` reading `data` as `format`, whatever is in it (the encoding is still
/// sniffed): records come in file order, and the count the parser reports is the count it gave.
pub fn read_log_as(format: logs::parse::Format, data: &[u8]) {
    let mut records = 0u64;
    let mut last = 0;
    let read = logs::parse::read_as(Some(format), data, Path::new("fuzz.log"), |r| {
        assert!(r.line >= last, "records in file order");
        last = r.line;
        records += 1;
    });
    if let Ok(stats) = read {
        assert_eq!(stats.records, records);
    }
}
