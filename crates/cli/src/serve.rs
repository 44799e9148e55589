//! `ferrocast serve`: load and validate the configuration (the TLS certificate and key
//! included), bind, serve until SIGTERM or SIGINT, then drain and exit 0. SIGHUP reloads the
//! TLS certificate and key.

use std::io::IsTerminal;
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

/// A loaded configuration, the environment it was read from, and the loader's notes.
pub type LoadedConfig = (Config, Vec<(String, String)>, Vec<String>);

impl ConfigFlags {
    /// Loads the configuration these flags describe, or prints every problem found.
    pub fn load(&self) -> Result<(Config, Vec<(String, String)>), ExitCode> {
        self.load_with_notes().map(|(config, env, _)| (config, env))
    }

    /// [`ConfigFlags::load`], also returning the loader's notes (see
    /// [`Config::load_with_notes`]) for `serve` to log.
    pub fn load_with_notes(&self) -> Result<LoadedConfig, ExitCode> {
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
        match Config::load_with_notes(&Sources { file, env: env.clone(), sets }) {
            Ok((config, notes)) => Ok((config, env, notes)),
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

/// Worker threads of the main (egress) runtime: one per core but the one left to the
/// ingress runtime (see `ferrocast_server::ingress`), at least one. `None` when
/// `TOKIO_WORKER_THREADS` is set, which tokio then follows.
pub fn egress_workers() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(cores.saturating_sub(1).max(1))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (config, env, notes) = match args.flags.load_with_notes() {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    init_logging(&config);
    for note in notes {
        tracing::info!("{note}");
    }
    let api_keys = match ferrocast_server::access::ApiKeys::from_config(&config.api, &env) {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("ferrocast: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let auth = match ferrocast_server::auth::Auth::from_config(&config.auth, &env) {
        Ok(auth) => auth,
        Err(e) => {
            eprintln!("ferrocast: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let tls = match ferrocast_server::tls::Tls::from_config(&config.server.tls) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("ferrocast: invalid configuration:\n  {}: {}", e.key, e.reason);
            return Ok(ExitCode::from(2));
        }
    };
    let app = AppState::with_auth(config, api_keys, auth);
    let ingress = IngressRuntime(Some(ferrocast_server::ingress::runtime()?));
    let _ = app.ingress.set(ingress.handle());
    let mut server = match Server::bind(app.clone(), None).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrocast: cannot listen on {}: {e}", app.config.server.listen);
            return Ok(ExitCode::from(1));
        }
    };
    let addr = server.local_addr();
    let (http, ws) = if tls.is_some() { ("https", "wss") } else { ("http", "ws") };
    reload_on_sighup(tls.clone());
    if let Some(tls) = tls {
        server = server.with_tls(tls);
    }
    tracing::info!(
        "ferrocast {} listening on {http}://{addr} (websocket: {ws}://{addr}{}, dashboard: {http}://{addr}/)",
        env!("CARGO_PKG_VERSION"),
        app.config.server.ws_paths[0]
    );
    if app.api_keys.is_empty() {
        tracing::warn!(
            "no API key configured (api.key, api.keys): the HTTP API (publish, channels, history, \
             stats) answers loopback clients only"
        );
    }
    let cookies = !app.config.auth.cookie.is_empty()
        || (app.proxy.any()
            && app.config.proxy.forward_headers.iter().any(|h| h.eq_ignore_ascii_case("cookie")));
    if cookies && app.config.server.allowed_origins.is_empty() {
        tracing::warn!(
            "connections may authenticate with cookies (auth.cookie, or the proxy forwards Cookie) \
             but server.allowed_origins is empty: any web page can open a connection with a \
             visitor's cookies; list your site's origins"
        );
    }
    server.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// The ingress runtime, shut down without waiting for its tasks when `run` returns, on
/// every path: by then its connections have closed, the grace period is over, or the
/// server never started. A plain drop would block inside the main runtime and panic.
struct IngressRuntime(Option<tokio::runtime::Runtime>);

impl IngressRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("runtime present until drop").handle().clone()
    }
}

impl Drop for IngressRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts the logger with `log.level`, which validation has already checked strictly (the
/// binary does not read `RUST_LOG`).
fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let ansi = use_colour(std::io::stderr().is_terminal(), |name| std::env::var_os(name));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Whether log lines get ANSI colours: only on a terminal (not under systemd, into a file or
/// a container's log), and never with `NO_COLOR` set to a non-empty value (no-color.org).
/// `FORCE_COLOR` (non-empty, not `0`) colours even when stderr is not a terminal.
fn use_colour(stderr_is_terminal: bool, var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.is_empty());
    if set("NO_COLOR") {
        return false;
    }
    if var("FORCE_COLOR").is_some_and(|v| !v.is_empty() && v != "0") {
        return true;
    }
    stderr_is_terminal
}

/// Reloads the TLS certificate and key on every SIGHUP (a failed reload keeps the current
/// pair and is logged; see [`ferrocast_server::tls::Tls::reload`]). Without TLS a SIGHUP
/// (a service manager's generic reload) is logged and otherwise ignored.
fn reload_on_sighup(tls: Option<ferrocast_server::tls::Tls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).expect("installing the SIGHUP handler");
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match &tls {
                    Some(tls) => {
                        tracing::info!("SIGHUP received: reloading the TLS certificate and key");
                        let _ = tls.reload();
                    }
                    None => tracing::info!("SIGHUP received: nothing to reload (no [server.tls])"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
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

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsString;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn colour_only_on_a_terminal_and_without_no_color() {
        assert!(use_colour(true, env(&[])));
        assert!(!use_colour(false, env(&[])));
        assert!(!use_colour(true, env(&[("NO_COLOR", "1")])));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(use_colour(true, env(&[("NO_COLOR", "")])));
        assert!(use_colour(false, env(&[("FORCE_COLOR", "1")])));
        assert!(!use_colour(false, env(&[("FORCE_COLOR", "0")])));
        assert!(!use_colour(false, env(&[("FORCE_COLOR", "1"), ("NO_COLOR", "1")])));
    }
}
