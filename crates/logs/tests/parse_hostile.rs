//! Hostile and odd files: encodings, binary junk, records that never end, huge lines, nothing.

use std::io::Write;
use std::path::Path;

use logs::parse::{self, Encoding, Format, ParseError, Record, Stats, MAX_RECORD};
use proptest::prelude::*;

fn read(bytes: &[u8]) -> Result<(Stats, Vec<Record>), ParseError> {
    let mut records = Vec::new();
    let stats = parse::read_from(bytes, Path::new("hostile.log"), |r| records.push(r))?;
    Ok((stats, records))
}

const SEED: &str = "<![LOG[[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"LocationServices\" context=\"\" type=\"3\" thread=\"5460\" file=\"\">\r\n";

fn utf16(text: &str, big_endian: bool, bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if bom {
        out.extend_from_slice(if big_endian {
            &[0xFE, 0xFF]
        } else {
            &[0xFF, 0xFE]
        });
    }
    for u in text.encode_utf16() {
        out.extend_from_slice(&if big_endian {
            u.to_be_bytes()
        } else {
            u.to_le_bytes()
        });
    }
    out
}

#[test]
fn utf16le_with_bom_from_a_file() {
    let text = format!(
        "{SEED}{}",
        SEED.replace("5460", "7")
            .replace("LocationServices", "Ünïcode 😀")
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("LocationServices.log");
    std::fs::write(&path, utf16(&text, false, true)).unwrap();
    let mut records = Vec::new();
    let stats = parse::read_path(&path, |r| records.push(r)).unwrap();
    assert_eq!(stats.encoding, Encoding::Utf16Le);
    assert_eq!(stats.format, Format::CmTrace);
    assert_eq!(records.len(), 2);
    assert!(records[0]
        .message
        .ends_with("CMGConnector_Clientcertificaterequired"));
    assert_eq!(records[1].component.as_deref(), Some("Ünïcode 😀"));
}

#[test]
fn utf16_other_shapes() {
    let (stats, records) = read(&utf16(SEED, true, true)).unwrap();
    assert_eq!((stats.encoding, records.len()), (Encoding::Utf16Be, 1));
    let (stats, records) = read(&utf16(SEED, false, false)).unwrap();
    assert_eq!((stats.encoding, records.len()), (Encoding::Utf16Le, 1));
    let mut bom8 = vec![0xEF, 0xBB, 0xBF];
    bom8.extend_from_slice(SEED.as_bytes());
    let (stats, records) = read(&bom8).unwrap();
    assert_eq!((stats.encoding, records.len()), (Encoding::Utf8Bom, 1));
    assert!(records[0].message.starts_with("[CCMHTTP]"));
}

#[test]
fn windows_1252_is_text() {
    let bytes = b"Caf\xe9 \x93quoted\x94 \x80 price\r\n[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Forbidden\r\n";
    let (stats, records) = read(bytes).unwrap();
    assert_eq!(stats.format, Format::Text);
    assert_eq!(records[0].message, "Café “quoted” € price");
    assert!(records[1].message.contains("CMGConnector_Forbidden"));
}

#[test]
fn binary_junk_is_refused_with_the_file_named() {
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 32) as u8).collect();
    let err = read(&junk).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("not a text log: hostile.log:"), "{text}");
    let mut pe = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00".to_vec();
    pe.resize(2048, 0);
    assert!(matches!(read(&pe), Err(ParseError::NotText { .. })));
}

#[test]
fn a_record_without_its_end_marker_is_skipped_and_good_ones_still_read() {
    let text = format!(
        "{SEED}<![LOG[truncated record, the writer died here\r\n{SEED}{SEED}<![LOG[never ends\r\nat all\r\n"
    );
    let (stats, records) = read(text.as_bytes()).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(
        records.iter().map(|r| r.line).collect::<Vec<_>>(),
        [1, 3, 4]
    );
    assert_eq!(stats.skipped, 2);
    assert_eq!(stats.skipped_examples[0].0, 2);
    assert!(
        stats.skipped_examples[0].1.contains("no end marker"),
        "{:?}",
        stats.skipped_examples
    );
    assert_eq!(stats.skipped_examples[1].0, 5);
    assert!(stats.skipped_examples[1].1.contains("end of the file"));
}

#[test]
fn a_huge_single_line_is_skipped_without_holding_it() {
    // 50 MB of one line after a good record, then a good record. The reader's buffer is
    // capped at MAX_RECORD by design (decode::LineReader); this checks the outcome.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.log");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    f.write_all(SEED.as_bytes()).unwrap();
    f.write_all(b"<![LOG[").unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..50 {
        f.write_all(&chunk).unwrap();
    }
    f.write_all(b"\r\n").unwrap();
    f.write_all(SEED.as_bytes()).unwrap();
    f.into_inner().unwrap().sync_all().unwrap();
    let mut records = Vec::new();
    let stats = parse::read_path(&path, |r| records.push(r)).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].line, 3);
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.skipped_examples[0].0, 2);
    assert!(stats.skipped_examples[0].1.contains("longer than"));
    assert!(records.iter().all(|r| r.message.len() < MAX_RECORD));
}

#[test]
fn a_record_growing_past_the_cap_over_many_lines_is_skipped() {
    let mut text = String::from("<![LOG[start\n");
    let line = "y".repeat(1000);
    for _ in 0..(MAX_RECORD / 1000 + 10) {
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str("end]LOG]!><time=\"1\">\n");
    text.push_str(SEED);
    let (stats, records) = read(text.as_bytes()).unwrap();
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.skipped_examples[0].0, 1);
    assert_eq!(
        records.len(),
        1,
        "the rest of the long record is dropped, not read as text"
    );
    assert!(records[0].message.contains("StatusText="));
}

#[test]
fn an_empty_file() {
    let (stats, records) = read(b"").unwrap();
    assert_eq!(stats.format, Format::Empty);
    assert_eq!((stats.records, stats.skipped), (0, 0));
    assert!(records.is_empty());
    let (stats, _) = read(b"\r\n\r\n  \n").unwrap();
    assert_eq!((stats.format, stats.records), (Format::Text, 0));
}

#[test]
fn nul_padding_after_a_crash_is_dropped() {
    let mut bytes = SEED.as_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 64]);
    let (_, records) = read(&bytes).unwrap();
    assert_eq!(records.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read(&bytes);
    }

    #[test]
    fn random_text_around_markers_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("<![LOG[".to_string()),
                Just("]LOG]!>".to_string()),
                Just("<time=\"".to_string()),
                Just("\" type=\"3\">".to_string()),
                Just("\r\n".to_string()),
                Just("\n  ".to_string()),
                Just("#Fields: a b".to_string()),
                Just("$$<".to_string()),
                Just("{\"message\":".to_string()),
                "[ -~]{0,12}",
                "\\PC{0,4}",
            ],
            0..60,
        ),
        utf16le in any::<bool>(),
    ) {
        let text: String = parts.concat();
        let bytes = if utf16le { utf16(&text, false, true) } else { text.into_bytes() };
        if let Ok((stats, records)) = read(&bytes) {
            prop_assert_eq!(stats.records as usize, records.len());
            for r in &records {
                prop_assert!(r.line >= 1);
            }
        }
    }
}
