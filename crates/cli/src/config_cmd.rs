//! `ferrocast config check|show|example`: the same validation `serve` runs (the TLS
//! certificate and key included), without binding.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use ferrocast_server::config::EXAMPLE_CONFIG;

use crate::serve::ConfigFlags;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate FILE (with environment and --set overrides applied); exit 2 if invalid.
    Check {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Show {
        #[command(flatten)]
        flags: ConfigFlags,
    },
    /// Print a commented example configuration covering every option.
    Example,
}

pub fn run(cmd: ConfigCommand) -> ExitCode {
    match cmd {
        ConfigCommand::Check { file, sets } => {
            let flags = ConfigFlags { config: Some(file.clone()), sets, ..Default::default() };
            match flags.load() {
                Ok((config, _)) => {
                    if let Err(e) = ferrocast_server::tls::Tls::from_config(&config.server.tls) {
                        eprintln!("ferrocast: invalid configuration:\n  {}: {}", e.key, e.reason);
                        return ExitCode::from(2);
                    }
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        ConfigCommand::Show { flags } => match flags.load() {
            Ok((config, _)) => {
                print!("{}", toml::to_string(&config).expect("config serializes"));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        ConfigCommand::Example => {
            print!("{EXAMPLE_CONFIG}");
            ExitCode::SUCCESS
        }
    }
}
