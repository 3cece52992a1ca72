//! Driving a system that is up: waiting for it to answer, then the measured load.

use super::*;

pub(super) fn load_options(url: &str, lab: &Lab, mode: Mode, connections: usize) -> LoadOptions {
    let (cert, key) = lab.device();
    LoadOptions {
        cert: Some(cert),
        key: Some(key),
        mode,
        timeout: Duration::from_secs(10),
        ..LoadOptions::new(url, vec![lab.root()], connections)
    }
}

type Measured = (LoadReport, f64, u64, usize);

pub(super) fn measure(
    runtime: &tokio::runtime::Runtime,
    up: &mut Up,
    lab: &Lab,
    mode: Mode,
    connections: usize,
    options: &CompareOptions,
    mp: &mut Mp,
) -> Result<Measured, String> {
    wait_ready(runtime, up, lab, options, mp)?;
    if options.rate.is_some() || lab.devices.is_some() {
        return measure_open_loop(runtime, up, lab, mode, connections, options);
    }
    if !options.warmup.is_zero() {
        let mut warm = load_options(&up.url, lab, mode, connections);
        warm.duration = Some(options.warmup);
        runtime
            .block_on(load::run(&warm))
            .map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut pids: Vec<u32> = up.procs.iter().map(Proc::pid).collect();
    pids.extend(procstat::descendants(&pids));
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|&p| procstat::cpu_seconds(p)).sum() };
    let before = cpu(&pids);
    let mut measured = load_options(&up.url, lab, mode, connections);
    measured.duration = Some(options.duration);
    measured.progress = options.progress;
    let report = runtime
        .block_on(load::run(&measured))
        .map_err(|e| e.to_string())?;
    let cpu_s = (cpu(&pids) - before).max(0.0);
    let peak_rss_kib = pids.iter().filter_map(|&p| procstat::peak_rss_kib(p)).sum();
    Ok((report, cpu_s, peak_rss_kib, pids.len()))
}

/// Waits, bounded, until one device request through the system is answered 2xx.
pub(super) fn wait_ready(
    runtime: &tokio::runtime::Runtime,
    up: &mut Up,
    lab: &Lab,
    options: &CompareOptions,
    mp: &mut Mp,
) -> Result<(), String> {
    let mut probe = load_options(&up.url, lab, Mode::Handshake, 1);
    probe.requests = Some(1);
    probe.duration = Some(Duration::from_secs(3));
    probe.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        for proc in &mut up.procs {
            if let Some(why) = proc.exited() {
                return Err(format!("{why} before answering"));
            }
        }
        if let Some(why) = mp.proc.exited() {
            return Err(format!(
                "the reference management point stopped: {why}{}",
                mp.proc.tail()
            ));
        }
        match runtime.block_on(load::run(&probe)) {
            Ok(report) if report.ok == 1 => return Ok(()),
            Ok(report) => {
                if let Some(kind) = report.errors_by_kind.keys().next() {
                    last = kind.clone();
                }
            }
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() > options.ready_timeout {
            return Err(format!(
                "no 2xx answer at {} within {:.0} s (last: {last})",
                up.url,
                options.ready_timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// At a fixed rate or as a fleet: one load run that connects every device, warms up on the
/// same connections and then measures; the system's CPU time is read at the measured run's
/// start and end.
fn measure_open_loop(
    runtime: &tokio::runtime::Runtime,
    up: &mut Up,
    lab: &Lab,
    mode: Mode,
    connections: usize,
    options: &CompareOptions,
) -> Result<Measured, String> {
    let mut pids: Vec<u32> = up.procs.iter().map(Proc::pid).collect();
    pids.extend(procstat::descendants(&pids));
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|&p| procstat::cpu_seconds(p)).sum() };
    let readings = std::sync::Arc::new(std::sync::Mutex::new((None::<f64>, None::<f64>)));
    let marks = {
        let (pids, readings) = (pids.clone(), readings.clone());
        load::Marks(std::sync::Arc::new(move |mark| {
            let now = cpu(&pids);
            let mut readings = readings.lock().unwrap_or_else(|p| p.into_inner());
            match mark {
                load::Mark::MeasureStart => readings.0 = Some(now),
                load::Mark::MeasureEnd => readings.1 = Some(now),
            }
        }))
    };
    let mut measured = load_options(&up.url, lab, mode, connections);
    measured.rate = options.rate;
    measured.devices = lab.devices.clone();
    measured.connect_first = lab.devices.is_some();
    measured.warmup = options.warmup;
    measured.duration = Some(options.duration);
    measured.progress = options.progress;
    measured.marks = Some(marks);
    let report = runtime
        .block_on(load::run(&measured))
        .map_err(|e| e.to_string())?;
    let (start, end) = *readings.lock().unwrap_or_else(|p| p.into_inner());
    let cpu_s = match (start, end) {
        (Some(start), Some(end)) => (end - start).max(0.0),
        _ => 0.0,
    };
    let peak_rss_kib = pids.iter().filter_map(|&p| procstat::peak_rss_kib(p)).sum();
    Ok((report, cpu_s, peak_rss_kib, pids.len()))
}
