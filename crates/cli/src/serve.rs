//! `ferrocast serve`: load and validate the configuration, bind, serve until SIGTERM or
//! SIGINT, then drain and exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ferrocast_server::config::{Config, Sources};
use ferrocast_server::{AppState, Server};

/// Flags shared by `serve` and `config check`.
#[derive(Args, Debug, Default, Clone)]
pub struct ConfigFlags {
    /// TOML configuration file (see deploy/ferrocast.example.toml).
    #[arg(long, short = 'c', env = "FERROCAST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any key: --set server.ping_interval_ms=10000 (repeatable; wins over file and env).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Shorthand for --set server.listen=ADDR.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Shorthand for --set api.key=KEY.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Shorthand for --set log.level=LEVEL.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Shorthand for --set simulator.enabled=false.
    #[arg(long)]
    pub no_simulator: bool,
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
}

impl ConfigFlags {
    /// Loads the configuration these flags describe, or prints every problem found.
    pub fn load(&self) -> Result<(Config, Vec<(String, String)>), ExitCode> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = match &self.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some((path.as_path(), text)),
                Err(e) => {
                    eprintln!("ferrocast: cannot read config file {}: {e}", path.display());
                    return Err(ExitCode::from(2));
                }
            },
            None => None,
        };
        let mut sets = Vec::new();
        if let Some(listen) = &self.listen {
            sets.push(format!("server.listen={listen}"));
        }
        if let Some(key) = &self.api_key {
            sets.push(format!("api.key={key}"));
        }
        if let Some(level) = &self.log_level {
            sets.push(format!("log.level={level}"));
        }
        if self.no_simulator {
            sets.push("simulator.enabled=false".into());
        }
        sets.extend(self.sets.iter().cloned());
        match Config::load(&Sources { file, env: env.clone(), sets }) {
            Ok(config) => Ok((config, env)),
            Err(errors) => {
                eprintln!("ferrocast: invalid configuration:");
                for e in errors {
                    eprintln!("  {}: {}", e.key, e.reason);
                }
                Err(ExitCode::from(2))
            }
        }
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (config, env) = match args.flags.load() {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    init_logging(&config);
    let api_key = config.api_key(&env);
    if !config.api.key_env.is_empty() && api_key.is_none() && config.api.key.is_empty() {
        eprintln!("ferrocast: api.key_env names {:?}, which is not set", config.api.key_env);
        return Ok(ExitCode::from(2));
    }
    let app = AppState::new(config, api_key);
    let server = match Server::bind(app.clone(), None).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrocast: cannot listen on {}: {e}", app.config.server.listen);
            return Ok(ExitCode::from(1));
        }
    };
    let addr = server.local_addr();
    tracing::info!(
        "ferrocast {} listening on http://{addr} (websocket: ws://{addr}{}, dashboard: http://{addr}/)",
        env!("CARGO_PKG_VERSION"),
        app.config.server.ws_paths[0]
    );
    if app.api_key.is_none() {
        tracing::warn!(
            "no API key configured (api.key): POST /api/publish accepts loopback clients only"
        );
    }
    server.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// Starts the logger with `log.level`, which validation has already checked strictly (the
/// binary does not read `RUST_LOG`).
fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
