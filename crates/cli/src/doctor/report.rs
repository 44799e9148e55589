//! What a check found and how the doctor shows it: PASS/WARN/FAIL/SKIP lines with the cause
//! and the exact fix for people, one JSON document for scripts, and the exit code.

use std::io::Write;

use serde::Serialize;
use serde_json::Value;

/// The verdict of one check. Ordered from best to worst for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not run: not applicable to this target, or an earlier check it needs failed.
    Skip,
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Skip => "SKIP",
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }

    /// The exit code of a run whose worst result is `self`: 0 pass, 1 warn, 2 fail.
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Skip | Status::Pass => 0,
            Status::Warn => 1,
            Status::Fail => 2,
        }
    }
}

/// A configuration change that removes the problem, for one kind of intermediary.
#[derive(Debug, Clone, Serialize)]
pub struct Fix {
    /// Where it goes: "nginx", "HAProxy", "ferrocast", "AWS ALB", ...
    pub target: String,
    pub snippet: String,
}

impl Fix {
    pub fn new(target: impl Into<String>, snippet: impl Into<String>) -> Fix {
        Fix { target: target.into(), snippet: snippet.into() }
    }
}

/// What one check found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub status: Status,
    /// One line: what was observed.
    pub summary: String,
    /// Supporting observations, one per line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    /// The likely cause, for WARN and FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fixes: Vec<Fix>,
    /// Measurements, for scripts.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Outcome {
    fn new(status: Status, summary: impl Into<String>) -> Outcome {
        Outcome {
            status,
            summary: summary.into(),
            details: Vec::new(),
            cause: None,
            fixes: Vec::new(),
            data: Value::Null,
        }
    }

    pub fn pass(summary: impl Into<String>) -> Outcome {
        Outcome::new(Status::Pass, summary)
    }

    pub fn warn(summary: impl Into<String>) -> Outcome {
        Outcome::new(Status::Warn, summary)
    }

    pub fn fail(summary: impl Into<String>) -> Outcome {
        Outcome::new(Status::Fail, summary)
    }

    pub fn skip(summary: impl Into<String>) -> Outcome {
        Outcome::new(Status::Skip, summary)
    }

    pub fn detail(mut self, line: impl Into<String>) -> Outcome {
        self.details.push(line.into());
        self
    }

    pub fn details(mut self, lines: impl IntoIterator<Item = String>) -> Outcome {
        self.details.extend(lines);
        self
    }

    pub fn cause(mut self, cause: impl Into<String>) -> Outcome {
        self.cause = Some(cause.into());
        self
    }

    pub fn fixes(mut self, fixes: impl IntoIterator<Item = Fix>) -> Outcome {
        self.fixes.extend(fixes);
        self
    }

    pub fn data(mut self, data: Value) -> Outcome {
        self.data = data;
        self
    }
}

/// One finished check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub id: &'static str,
    pub title: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Prints checks as they run (unless quiet, for `--json`) and collects them.
#[derive(Debug)]
pub struct Reporter {
    quiet: bool,
    total: usize,
    pub checks: Vec<CheckReport>,
}

/// Writes to standard output, ignoring errors: a reader that went away (`| head`) must not
/// turn a diagnosis into a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, $($arg)*);
    }};
}

/// Width of the check title column, dots included.
const TITLE_WIDTH: usize = 28;

impl Reporter {
    pub fn new(quiet: bool, total: usize) -> Reporter {
        Reporter { quiet, total, checks: Vec::new() }
    }

    pub fn header(&self, line: &str) {
        if !self.quiet {
            out!("{line}");
        }
    }

    /// Shows that a check started (its title, no newline yet), so a slow probe shows progress.
    pub fn start(&self, title: &str) {
        if self.quiet {
            return;
        }
        let n = self.checks.len() + 1;
        let dots = TITLE_WIDTH.saturating_sub(title.chars().count() + 1);
        let mut stdout = std::io::stdout().lock();
        let _ = write!(stdout, "{n:>3}/{} {title} {} ", self.total, ".".repeat(dots));
        let _ = stdout.flush();
    }

    /// Prints the verdict of the check announced by [`Reporter::start`] and records it.
    pub fn finish(&mut self, id: &'static str, title: &'static str, outcome: Outcome) {
        if !self.quiet {
            print_outcome(&outcome);
        }
        self.checks.push(CheckReport { id, title, outcome });
    }

    pub fn worst(&self) -> Status {
        self.checks.iter().map(|c| c.outcome.status).max().unwrap_or(Status::Pass)
    }

    /// The closing summary line for people.
    pub fn footer(&self) {
        if self.quiet {
            return;
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.outcome.status == s).count();
        out!(
            "\n{} passed, {} warnings, {} failed, {} skipped; exit code {}",
            count(Status::Pass),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skip),
            self.worst().exit_code()
        );
    }
}

fn print_outcome(o: &Outcome) {
    const INDENT: &str = "        ";
    out!("{}  {}", o.status.label(), o.summary);
    for d in &o.details {
        out!("{INDENT}{d}");
    }
    if let Some(cause) = &o.cause {
        out!("{INDENT}cause: {cause}");
    }
    for fix in &o.fixes {
        out!("{INDENT}fix ({}):", fix.target);
        for line in fix.snippet.lines() {
            out!("{INDENT}    {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_status_decides_the_exit_code() {
        let mut r = Reporter::new(true, 3);
        r.finish("a", "A", Outcome::pass("ok"));
        r.finish("b", "B", Outcome::skip("n/a"));
        assert_eq!(r.worst().exit_code(), 0);
        r.finish("c", "C", Outcome::warn("hmm"));
        assert_eq!(r.worst().exit_code(), 1);
        r.finish("d", "D", Outcome::fail("no"));
        assert_eq!(r.worst(), Status::Fail);
        assert_eq!(r.worst().exit_code(), 2);
    }

    #[test]
    fn json_shape() {
        let o = Outcome::fail("426").cause("proxy").fixes([Fix::new("nginx", "x;")]);
        let v =
            serde_json::to_value(CheckReport { id: "upgrade", title: "T", outcome: o }).unwrap();
        assert_eq!(v["status"], "fail");
        assert_eq!(v["id"], "upgrade");
        assert_eq!(v["fixes"][0]["target"], "nginx");
        assert!(v.get("details").is_none());
    }
}
