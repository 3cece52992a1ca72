//! The comparison's options and its median round.

use super::*;

/// Bad options are refused before anything starts, each named.
#[test]
fn options_out_of_range_are_refused_by_name() {
    let base = CompareOptions::new(PathBuf::from("/nonexistent/portcullis"));
    for (edit, needle) in [
        (
            CompareOptions {
                rounds: 0,
                ..base.clone()
            },
            "--rounds",
        ),
        (
            CompareOptions {
                threads: Some(0),
                ..base.clone()
            },
            "--threads: 0 is not a thread count",
        ),
        (
            CompareOptions {
                threads: Some(5000),
                ..base.clone()
            },
            "--threads: 5000",
        ),
        (
            CompareOptions {
                connections: vec![32, 0],
                ..base.clone()
            },
            "--connections",
        ),
    ] {
        let error = run(&edit).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
    }
}

fn row(rps: f64, errors: u64) -> Row {
    Row {
        system: System::Portcullis,
        mode: Mode::Keepalive,
        connections: 32,
        rps,
        p50_ms: rps / 1000.0,
        p99_ms: 0.0,
        cpu_s: 0.0,
        cpu_us_per_request: 0.0,
        peak_rss_mib: 0.0,
        errors,
        ok: 10,
        p90_ms: 0.0,
        p999_ms: 0.0,
        max_ms: 0.0,
        vs_portcullis: None,
        rps_rounds: vec![rps],
        processes: 2,
        answered_connections: 32,
        errors_by_kind: if errors > 0 {
            BTreeMap::from([("503 CMGService_Noconnectorchannel".to_string(), errors)])
        } else {
            BTreeMap::new()
        },
    }
}

#[test]
fn the_median_round_stands_for_the_rounds_and_no_error_is_hidden() {
    let median = median_round(vec![row(900.0, 0), row(1500.0, 2), row(1000.0, 1)]).unwrap();
    assert_eq!(median.rps, 1000.0);
    assert_eq!(median.p50_ms, 1.0, "the median round's own latency");
    assert_eq!(median.rps_rounds, [900.0, 1500.0, 1000.0]);
    assert_eq!((median.errors, median.ok), (3, 30));
    assert_eq!(
        median.errors_by_kind["503 CMGService_Noconnectorchannel"],
        3
    );
    // An even count takes the lower middle; no rounds, no row.
    assert_eq!(
        median_round(vec![row(2.0, 0), row(1.0, 0)]).unwrap().rps,
        1.0
    );
    assert!(median_round(Vec::new()).is_none());
}
