//! Measuring on a shared machine: each measurement starts once the CPUs are idle of other work, and is made again when they were busy right after it (docs/benchmark-method.md).

use super::*;

/// How the machine was during the benchmark: other work on the CPUs shifts every figure here,
/// and lock-step TFTP even gets faster on a busy machine (no core sleeps between two blocks).
pub(super) struct Machine {
    pub(super) loadavg_before: String,
    pub(super) loadavg_after: String,
    /// Timed measurements (perfdhcp runs, downloads, wrk runs), repeated ones included.
    pub(super) measurements: usize,
    /// Those that started with other work on the CPUs (the waiting budget spent).
    pub(super) started_busy: usize,
    /// Those measured again because other work showed up right after them.
    pub(super) repeated: usize,
    /// Those kept although other work showed up right after them (the last try).
    pub(super) kept_disturbed: usize,
}

pub(super) static MEASUREMENTS: AtomicUsize = AtomicUsize::new(0);
pub(super) static STARTED_BUSY: AtomicUsize = AtomicUsize::new(0);
pub(super) static REPEATED: AtomicUsize = AtomicUsize::new(0);
pub(super) static KEPT_DISTURBED: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds waited so far for the machine to fall idle.
pub(super) static WAITED_MS: AtomicUsize = AtomicUsize::new(0);

/// How long the whole benchmark may wait for the machine to fall idle; once spent, every
/// measurement starts at once and none is repeated.
pub(super) const WAIT_BUDGET: Duration = Duration::from_secs(60);
/// Idle: at most this share of all CPUs busy over [`IDLE_SAMPLE`] (the servers under test idle
/// meanwhile).
pub(super) const IDLE_BUSY: f64 = 0.1;
pub(super) const IDLE_SAMPLE: Duration = Duration::from_millis(300);
/// Tries of one measurement when other work keeps showing up right after it.
pub(super) const TRIES: usize = 3;

pub(super) fn budget_left() -> bool {
    (WAITED_MS.load(Ordering::Relaxed) as u128) < WAIT_BUDGET.as_millis()
}

/// The share of all CPUs busy over the next [`IDLE_SAMPLE`].
pub(super) fn busy_share() -> Result<f64> {
    let (busy0, total0) = cpu_ticks()?;
    std::thread::sleep(IDLE_SAMPLE);
    let (busy1, total1) = cpu_ticks()?;
    Ok((busy1 - busy0) as f64 / (total1 - total0).max(1) as f64)
}

/// Called right before each timed measurement: waits until the CPUs are idle of other work,
/// while the benchmark's waiting budget lasts, and counts the measurement.
pub(super) fn wait_until_idle() -> Result<()> {
    MEASUREMENTS.fetch_add(1, Ordering::Relaxed);
    let mut told = false;
    loop {
        let started = Instant::now();
        let busy = busy_share()?;
        if busy <= IDLE_BUSY {
            return Ok(());
        }
        if !budget_left() {
            eprintln!(
                "bench: warning: the CPUs are {:.0} % busy with other work and the waiting budget \
                 ({} s) is spent: measuring anyway",
                busy * 100.0,
                WAIT_BUDGET.as_secs()
            );
            STARTED_BUSY.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !told {
            eprintln!(
                "bench: the CPUs are {:.0} % busy with other work: waiting for them to fall idle",
                busy * 100.0
            );
            told = true;
        }
        WAITED_MS.fetch_add(started.elapsed().as_millis() as usize, Ordering::Relaxed);
    }
}

/// Runs a measurement (which calls [`wait_until_idle`] right before its timed part) and checks
/// that the CPUs are still idle right after it: other work that started meanwhile (a compiler,
/// say) slows the servers, and speeds lock-step TFTP up by keeping the cores awake, so such a
/// measurement is made again, up to [`TRIES`] times while the waiting budget lasts.
pub(super) fn undisturbed<T>(mut once: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 1;
    loop {
        let value = once()?;
        let started = Instant::now();
        let busy = busy_share()?;
        if busy <= IDLE_BUSY {
            return Ok(value);
        }
        if tries == TRIES || !budget_left() {
            eprintln!(
                "bench: warning: the CPUs were {:.0} % busy with other work right after the \
                 measurement; keeping it",
                busy * 100.0
            );
            KEPT_DISTURBED.fetch_add(1, Ordering::Relaxed);
            return Ok(value);
        }
        eprintln!(
            "bench: the CPUs were {:.0} % busy with other work right after the measurement: \
             measuring again",
            busy * 100.0
        );
        REPEATED.fetch_add(1, Ordering::Relaxed);
        WAITED_MS.fetch_add(started.elapsed().as_millis() as usize, Ordering::Relaxed);
        tries += 1;
    }
}

/// The first three fields of /proc/loadavg.
pub(super) fn loadavg() -> Result<String> {
    let text = fs::read_to_string("/proc/loadavg").context("cannot read /proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// Busy and total CPU ticks of all CPUs, from the first line of /proc/stat.
pub(super) fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    if ticks.len() < 5 {
        bail!("cannot read the CPU times in /proc/stat");
    }
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - ticks[3] - ticks[4], total))
}
