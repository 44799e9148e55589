//! A live status line for long CLI work (`bench`, `sub`): redrawn in place on stderr when it
//! is a terminal, cleared at the end, and silent otherwise (pipes, files, CI logs, `--json`),
//! so machine-read output never carries carriage returns or escape codes.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The status line. Every method is a no-op when it is inactive.
#[derive(Debug)]
pub struct Progress {
    active: bool,
    /// Whether a line is on screen (so `clear` erases only what was drawn).
    drawn: Mutex<bool>,
}

impl Progress {
    /// Active only when stderr is a terminal and the caller is not `quiet` (`--json`).
    pub fn new(quiet: bool) -> Progress {
        Progress::with_terminal(!quiet && std::io::stderr().is_terminal())
    }

    /// A line that is active exactly when `active` says (for callers with extra conditions).
    pub fn with_terminal(active: bool) -> Progress {
        Progress { active, drawn: Mutex::new(false) }
    }

    /// Whether anything will be drawn.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Replaces the line with `text`.
    pub fn show(&self, text: &str) {
        if !self.active {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
        *self.drawn.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Erases the line, leaving the cursor at the start of an empty line.
    pub fn clear(&self) {
        let mut drawn = self.drawn.lock().unwrap_or_else(|e| e.into_inner());
        if self.active && *drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            *drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

/// One status line: `PHASE ELAPSED[/TOTAL] | conns N | msgs X/s[ | EXTRA]`.
pub fn status_line(
    phase: &str,
    elapsed: Duration,
    total: Option<Duration>,
    connections: u64,
    messages_per_sec: f64,
    extra: &str,
) -> String {
    let mut line = format!("{phase} {:.0}", elapsed.as_secs_f64());
    if let Some(total) = total {
        line.push_str(&format!("/{:.0}", total.as_secs_f64()));
    }
    line.push_str(&format!("s | conns {connections} | msgs {}/s", human_rate(messages_per_sec)));
    if !extra.is_empty() {
        line.push_str(" | ");
        line.push_str(extra);
    }
    line
}

/// `950`, `12.3k`, `4.56M`: short enough for a status line.
pub fn human_rate(per_sec: f64) -> String {
    let r = per_sec.max(0.0);
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// Messages per second between successive calls.
#[derive(Debug)]
pub struct RateMeter {
    last: Instant,
    count: u64,
}

impl RateMeter {
    pub fn new(count: u64) -> RateMeter {
        RateMeter { last: Instant::now(), count }
    }

    /// The rate since the previous call, given the running total `count`.
    pub fn rate(&mut self, count: u64) -> f64 {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        let rate = count.saturating_sub(self.count) as f64 / secs;
        (self.last, self.count) = (now, count);
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_shows_phase_time_connections_and_rate() {
        let line = status_line(
            "measuring",
            Duration::from_millis(3_400),
            Some(Duration::from_secs(10)),
            2_000,
            45_678.0,
            "lost 0",
        );
        assert_eq!(line, "measuring 3/10s | conns 2000 | msgs 45.7k/s | lost 0");
        let line = status_line("receiving", Duration::from_secs(65), None, 1, 12.4, "");
        assert_eq!(line, "receiving 65s | conns 1 | msgs 12/s");
        assert!(!line.contains('\r') && !line.contains('\n'));
    }

    #[test]
    fn rates_are_short() {
        assert_eq!(human_rate(0.0), "0");
        assert_eq!(human_rate(-3.0), "0");
        assert_eq!(human_rate(9_999.0), "9999");
        assert_eq!(human_rate(12_345.0), "12.3k");
        assert_eq!(human_rate(4_560_000.0), "4.56M");
    }

    #[test]
    fn an_inactive_line_draws_nothing() {
        let p = Progress::with_terminal(false);
        p.show("x");
        assert!(!p.active());
        assert!(!*p.drawn.lock().unwrap());
    }
}
