//! The `ferrocast` binary: parses flags and dispatches to one module per subcommand.
//!
//! `ferrocast` with no subcommand runs `serve` with the built-in defaults: the gateway on
//! 127.0.0.1:8080, the demo market simulator and the live dashboard. The flags of `serve`
//! work there too (`ferrocast --listen 0.0.0.0:8080`).

mod bench;
mod config_cmd;
mod doctor;
mod generate;
mod progress;
mod publish;
mod serve;
mod simulate;
mod sub;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferrocast",
    version,
    about = "A standalone real-time push gateway: WebSocket, SSE and Socket.IO fan-out with \
             recovery, heartbeats, bounded memory and metrics.",
    after_help = "Run with no subcommand to serve with the built-in defaults \
                  (http://127.0.0.1:8080: demo market feed, dashboard, /ws, /api); \
                  the serve flags above apply then, e.g. `ferrocast --listen 0.0.0.0:8080`.\n\
                  Configuration keys, environment variables and close codes: docs/configuration.md, docs/protocol.md.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// The flags of `serve`, for running it without naming the subcommand.
    #[command(flatten)]
    serve: serve::ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve(serve::ServeArgs),
    /// Check, show or print an example of the configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Subscribe to channels and print messages as JSON lines.
    Sub(sub::SubArgs),
    /// Publish one message.
    Pub(publish::PubArgs),
    /// Load-test a running server (connections, fan-out rate, latency, server CPU and RSS).
    Bench(bench::BenchArgs),
    /// Check every hop between a client and a server (DNS, TCP, TLS, upgrade, proxy headers,
    /// protocol, latency, message size, idle timeout, SSE buffering); exit 0/1/2 = pass/warn/fail.
    Doctor(doctor::DoctorArgs),
    /// Write deployment files for the current settings: nginx site, systemd unit, Dockerfile,
    /// Kubernetes manifests, AWS Elastic Beanstalk bundle.
    #[command(subcommand)]
    Gen(generate::GenCommand),
    /// Simulate an upstream market-data service (Massive, Binance, Coinbase) for tests and demos.
    Simulate(simulate::SimulateArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    match command {
        Command::Config(cmd) => Ok(config_cmd::run(cmd)),
        Command::Gen(cmd) => generate::run(cmd),
        other => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if matches!(other, Command::Serve(_))
                && let Some(workers) = serve::egress_workers()
            {
                runtime.worker_threads(workers);
            }
            runtime.enable_all().build()?.block_on(async {
                match other {
                    Command::Serve(args) => serve::run(args).await,
                    Command::Sub(args) => sub::run(args).await,
                    Command::Pub(args) => publish::run(args).await,
                    Command::Bench(args) => bench::run(args).await,
                    Command::Doctor(args) => doctor::run(args).await,
                    Command::Simulate(args) => simulate::run(args).await,
                    Command::Config(_) | Command::Gen(_) => unreachable!("handled above"),
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn serve_flags_work_without_the_subcommand() {
        let cli =
            Cli::try_parse_from(["ferrocast", "--listen", "127.0.0.1:9000", "--no-simulator"])
                .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.flags.listen.as_deref(), Some("127.0.0.1:9000"));
        assert!(cli.serve.flags.no_simulator);

        let cli =
            Cli::try_parse_from(["ferrocast", "serve", "--listen", "127.0.0.1:9001"]).unwrap();
        let Some(Command::Serve(args)) = cli.command else { panic!("not serve") };
        assert_eq!(args.flags.listen.as_deref(), Some("127.0.0.1:9001"));

        // Top-level serve flags do not mix with another subcommand.
        assert!(Cli::try_parse_from(["ferrocast", "--listen", "127.0.0.1:1", "sub", "x"]).is_err());
        Cli::command().debug_assert();
    }
}
