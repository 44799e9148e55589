//! `ferrocast pub URL CHANNEL JSON`: publish one message, over the HTTP API (`http://` URLs,
//! `POST /api/publish`) or over the native WebSocket protocol (`ws://` URLs, `publish` op).

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ferrocast_client::{Client, ConnectOptions, HttpClient};
use serde_json::Value;

/// Publish one message and print where it landed.
#[derive(clap::Args, Debug)]
pub struct PubArgs {
    /// http://host:port (HTTP API) or ws://host:port/ws (WebSocket publish op).
    pub url: String,
    /// Channel to publish to.
    pub channel: String,
    /// The message data as JSON (`-` reads it from stdin). A bare string needs JSON quotes: '"hi"'.
    pub json: String,
    /// API key for the HTTP API, sent as `Authorization: Bearer KEY` (not needed from loopback).
    #[arg(long, env = "FERROCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Publishes the message and prints `{"channel":..,"offset":..,"epoch":..}` on stdout.
pub async fn run(args: PubArgs) -> anyhow::Result<ExitCode> {
    let text = if args.json == "-" {
        let mut buf = String::new();
        std::io::stdin().read_to_string(&mut buf).context("reading the message from stdin")?;
        buf
    } else {
        args.json.clone()
    };
    let data: Value = serde_json::from_str(&text).with_context(|| {
        format!("the message must be JSON (for a string, quote it: '\"{}\"')", text.trim())
    })?;
    let timeout = Duration::from_secs_f64(args.timeout);

    let scheme = args.url.split("://").next().unwrap_or_default();
    let result = match scheme {
        "http" | "https" => {
            let mut http = HttpClient::new(&args.url)?.with_timeout(timeout);
            if let Some(key) = &args.api_key {
                http = http.with_api_key(key);
            }
            http.publish(&args.channel, &data).await
        }
        "ws" | "wss" => {
            let opts = ConnectOptions::default().timeout(timeout);
            match Client::connect_with(&args.url, opts).await {
                Ok(mut client) => {
                    let result = client.publish(&args.channel, &data).await;
                    let _ = client.close().await;
                    result
                }
                Err(e) => Err(e),
            }
        }
        _ => bail!("URL must start with http:// or ws://, got {:?}", args.url),
    };
    match result {
        Ok(ack) => {
            println!("{}", serde_json::to_string(&ack)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("ferrocast pub: publish to {} failed: {e}", args.channel);
            Ok(ExitCode::FAILURE)
        }
    }
}
