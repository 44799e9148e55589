//! `ferrocast sub URL CHANNEL...`: subscribe over the native WebSocket protocol and print each
//! message as one JSON line on stdout (a protocol-aware `websocat`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrocast_client::{Client, ConnectOptions, Event, Position};
use serde_json::value::RawValue;

use crate::progress::{Progress, RateMeter, status_line};

/// Subscribe to channels and print messages as JSON lines.
#[derive(clap::Args, Debug)]
pub struct SubArgs {
    /// Server WebSocket URL, e.g. ws://127.0.0.1:8080/ws
    pub url: String,
    /// Channels to subscribe to.
    #[arg(required = true)]
    pub channels: Vec<String>,
    /// Exit (status 0) after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Resume from a position: CHANNEL=EPOCH:OFFSET (repeatable); missed messages are replayed.
    #[arg(long, value_name = "CHANNEL=EPOCH:OFFSET")]
    pub recover: Vec<String>,
    /// Origin header to send with the upgrade.
    #[arg(long)]
    pub origin: Option<String>,
    /// Extra upgrade header "Name: value" (repeatable), e.g. an Authorization header.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Also print server heartbeats, errors and other non-message frames (to stderr).
    #[arg(long)]
    pub verbose: bool,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// One output line; `data` is copied through byte-for-byte.
#[derive(serde::Serialize)]
struct Line<'a> {
    channel: &'a str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    data: &'a RawValue,
}

/// Runs the subscriber until `--count` messages arrived, Ctrl-C, or the server closes.
pub async fn run(args: SubArgs) -> anyhow::Result<ExitCode> {
    let mut opts = ConnectOptions::default().timeout(Duration::from_secs_f64(args.timeout));
    opts.origin = args.origin.clone();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header {header:?} is not \"Name: value\""))?;
        opts = opts.header(name.trim(), value.trim());
    }
    let recover = parse_recover(&args.recover)?;

    let mut client = match Client::connect_with(&args.url, opts).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("ferrocast sub: cannot connect to {}: {e}", args.url);
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.verbose {
        eprintln!(
            "connected: session {} (ping every {} ms)",
            client.session(),
            client.ping_interval_ms()
        );
    }

    let channels: Vec<&str> = args.channels.iter().map(String::as_str).collect();
    let ack = client.subscribe_recover(&channels, &recover).await.context("subscribe failed")?;
    let mut failed = false;
    for (channel, result) in &ack.channels {
        match result {
            Ok(s) if args.verbose => eprintln!(
                "subscribed {channel} at epoch {:?} offset {}{}",
                s.epoch,
                s.offset,
                if s.recovered { " (recovered)" } else { "" }
            ),
            Ok(_) => {}
            Err(e) => {
                eprintln!(
                    "ferrocast sub: cannot subscribe to {channel}: {}: {}",
                    e.code, e.message
                );
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }

    let mut seen = 0u64;
    let stdout = std::io::stdout();
    // A status line only when messages go to a file or pipe and a person watches stderr; on
    // a terminal the messages themselves show progress, and --verbose writes to stderr.
    let progress = Progress::with_terminal(
        !args.verbose && !stdout.is_terminal() && std::io::stderr().is_terminal(),
    );
    let started = Instant::now();
    let mut meter = RateMeter::new(0);
    let mut redraw = tokio::time::interval(Duration::from_millis(500));
    loop {
        if args.count.is_some_and(|n| seen >= n) {
            let _ = client.close().await;
            return Ok(ExitCode::SUCCESS);
        }
        let event = tokio::select! {
            event = client.next_event() => event,
            _ = redraw.tick(), if progress.active() => {
                let extra = format!("{seen} received");
                progress.show(&status_line(
                    "receiving", started.elapsed(), None, 1, meter.rate(seen), &extra,
                ));
                continue;
            }
            _ = tokio::signal::ctrl_c() => {
                let _ = client.close().await;
                return Ok(ExitCode::SUCCESS);
            }
        };
        match event {
            Some(Event::Msg(m)) => {
                let line = Line {
                    channel: &m.channel,
                    offset: m.offset,
                    epoch: m.epoch.as_deref(),
                    data: &m.data,
                };
                let mut out = stdout.lock();
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
                // Flush per line so piping into `jq` or a test harness sees messages live.
                if let Err(e) = out.flush() {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e.into());
                }
                seen += 1;
            }
            Some(Event::Error(e)) => {
                progress.clear();
                eprintln!("server error: {e}");
            }
            Some(Event::Unsubscribed { channel, reason }) => {
                progress.clear();
                eprintln!("server unsubscribed {channel}: {reason}");
            }
            Some(Event::Ping) if args.verbose => eprintln!("ping"),
            Some(Event::Ping) => {}
            Some(Event::Other(v)) if args.verbose => eprintln!("frame: {v}"),
            Some(Event::Other(_)) => {}
            Some(Event::Closed(close)) => {
                if close.code == 1000 {
                    return Ok(ExitCode::SUCCESS);
                }
                progress.clear();
                eprintln!("ferrocast sub: server closed the connection: {close}");
                return Ok(ExitCode::FAILURE);
            }
            None => return Ok(ExitCode::FAILURE),
        }
    }
}

fn parse_recover(specs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, Position>> {
    let mut out = std::collections::BTreeMap::new();
    for spec in specs {
        let parsed = spec.split_once('=').and_then(|(channel, pos)| {
            let (epoch, offset) = pos.rsplit_once(':')?;
            Some((
                channel.to_owned(),
                Position { epoch: epoch.to_owned(), offset: offset.parse().ok()? },
            ))
        });
        let Some((channel, position)) = parsed else {
            bail!("--recover {spec:?} is not CHANNEL=EPOCH:OFFSET");
        };
        out.insert(channel, position);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_specs_parse() {
        let map = parse_recover(&["ticks.AAPL=e:1:41".to_owned()]).unwrap();
        assert_eq!(map["ticks.AAPL"], Position { epoch: "e:1".into(), offset: 41 });
        assert!(parse_recover(&["nope".to_owned()]).is_err());
        assert!(parse_recover(&["a=e:x".to_owned()]).is_err());
    }
}
