//! `ferrocast gen nginx|systemd|container|kubernetes|elastic-beanstalk`: deployment files
//! written for the current settings (the same `--config`, `--set` and environment as
//! `serve`), so the proxy's timeouts follow the heartbeat, the locations follow the WebSocket
//! paths, the unit's limits follow the connection limit and grace periods follow the drain.
//! The examples in `deploy/` are this command's output (a test keeps them identical).
//!
//! TLS: `gen nginx --tls-cert/--tls-key` terminates TLS in nginx (with HTTP/2 for browsers);
//! when ferrocast serves TLS itself (`[server.tls]` in the settings), every output follows:
//! nginx re-encrypts to it (`--upstream-ca` checks its certificate), the systemd unit reloads
//! the certificate with SIGHUP, the container's health check speaks https, and the Kubernetes
//! manifest mounts a TLS Secret with HTTPS probes and backends. On Elastic Beanstalk the load
//! balancer terminates TLS (`--certificate-arn`).

mod beanstalk;
mod kubernetes;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ferrocast_server::config::{Config, env_name};

use crate::serve::ConfigFlags;

#[derive(Subcommand, Debug)]
pub enum GenCommand {
    /// An nginx site (map, upstream and server blocks) in front of ferrocast.
    Nginx(NginxArgs),
    /// A hardened systemd unit.
    Systemd(SystemdArgs),
    /// A Dockerfile (multi-stage build, unprivileged, health check).
    Container(ContainerArgs),
    /// Kubernetes manifests: ConfigMap, Deployment (probes, drain), Service, ingress-nginx Ingress.
    Kubernetes(KubernetesArgs),
    /// An AWS Elastic Beanstalk bundle: nginx locations, load balancer settings, Procfile.
    ElasticBeanstalk(ElasticBeanstalkArgs),
}

#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Write to FILE instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct NginxArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// The public host name (nginx `server_name`).
    #[arg(long, default_value = "_", value_name = "NAME")]
    pub server_name: String,
    /// nginx `listen` address (repeatable). Default: port 80 (or 443 with TLS) on IPv4 and IPv6.
    #[arg(long = "bind", value_name = "ADDR")]
    pub binds: Vec<String>,
    /// Certificate chain for TLS (e.g. /etc/letsencrypt/live/NAME/fullchain.pem).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// Private key for TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<String>,
    /// When ferrocast serves TLS itself (server.tls): the CA certificate (PEM) nginx checks
    /// ferrocast's certificate against. Without it the hop is encrypted but not verified.
    #[arg(long, value_name = "PEM")]
    pub upstream_ca: Option<String>,
    /// Address nginx connects to (default: from server.listen). Repeat it for several nodes:
    /// WebSocket is then balanced by least connections, and Socket.IO and SSE are pinned to
    /// one node per client address (their sessions live on one node).
    #[arg(long = "upstream", value_name = "HOST:PORT")]
    pub upstreams: Vec<String>,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug, Clone)]
pub struct SystemdArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Where the binary is installed.
    #[arg(long, default_value = "/usr/local/bin/ferrocast", value_name = "PATH")]
    pub binary: String,
    /// The configuration file the service reads.
    #[arg(long, default_value = "/etc/ferrocast/ferrocast.toml", value_name = "PATH")]
    pub config_path: String,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug, Clone)]
pub struct ContainerArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Rust toolchain image tag for the build stage.
    #[arg(long, default_value = "1.95", value_name = "VERSION")]
    pub rust_version: String,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug, Clone)]
pub struct KubernetesArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Container image (built from `ferrocast gen container`'s Dockerfile).
    #[arg(long, default_value_t = kubernetes::default_image(), value_name = "IMAGE")]
    pub image: String,
    /// Namespace of every object.
    #[arg(long, default_value = "ferrocast", value_name = "NAME")]
    pub namespace: String,
    /// Name of every object (and its app.kubernetes.io/name label).
    #[arg(long, default_value = "ferrocast", value_name = "NAME")]
    pub name: String,
    /// Pods in the Deployment (more than one adds a PodDisruptionBudget).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub replicas: u32,
    /// The public host name the Ingress answers for.
    #[arg(long, default_value = "push.example.com", value_name = "NAME")]
    pub host: String,
    /// The Ingress class of the ingress-nginx controller.
    #[arg(long, default_value = "nginx", value_name = "CLASS")]
    pub ingress_class: String,
    /// A TLS Secret (e.g. from cert-manager) for the Ingress host.
    #[arg(long, value_name = "SECRET")]
    pub tls_secret: Option<String>,
    #[command(flatten)]
    pub out: Output,
}

#[derive(Args, Debug, Clone)]
pub struct ElasticBeanstalkArgs {
    #[command(flatten)]
    pub flags: ConfigFlags,
    /// Directory to write the bundle's files into (created if missing; the application
    /// source bundle is this directory plus the ferrocast binary).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Address nginx connects to (default: 127.0.0.1 and the port of server.listen).
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// An ACM certificate for an HTTPS listener (port 443) on the load balancer, which then
    /// terminates TLS (wss://, https://, HTTP/2 for browsers).
    #[arg(long, value_name = "ARN")]
    pub certificate_arn: Option<String>,
}

pub fn run(cmd: GenCommand) -> anyhow::Result<ExitCode> {
    let (flags, out) = match &cmd {
        GenCommand::Nginx(a) => (&a.flags, Some(&a.out)),
        GenCommand::Systemd(a) => (&a.flags, Some(&a.out)),
        GenCommand::Container(a) => (&a.flags, Some(&a.out)),
        GenCommand::Kubernetes(a) => (&a.flags, Some(&a.out)),
        GenCommand::ElasticBeanstalk(a) => (&a.flags, None),
    };
    let config = match flags.load() {
        Ok((config, _)) => config,
        Err(code) => return Ok(code),
    };
    let text = match &cmd {
        GenCommand::Nginx(a) => nginx(&config, &NginxOptions::from(a)),
        GenCommand::Systemd(a) => systemd(&config, &a.binary, &a.config_path),
        GenCommand::Container(a) => container(&config, &a.rust_version),
        GenCommand::Kubernetes(a) => kubernetes::kubernetes(&config, &KubernetesOptions::from(a)),
        GenCommand::ElasticBeanstalk(a) => {
            if config.server.tls.enabled() {
                eprintln!(
                    "ferrocast: server.tls is set, but on Elastic Beanstalk the load balancer \
                     terminates TLS and the instance's nginx speaks plain HTTP to ferrocast: \
                     generate without server.tls, and pass --certificate-arn for an HTTPS listener"
                );
                return Ok(ExitCode::from(2));
            }
            let files = beanstalk::elastic_beanstalk(
                &config,
                a.upstream.as_deref(),
                a.certificate_arn.as_deref(),
            );
            write_tree(&a.out, &files)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let out = out.expect("every single-file target has -o");
    match &out.output {
        Some(path) => {
            std::fs::write(path, text)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `files` (paths relative to `dir`), creating directories as needed.
fn write_tree(dir: &Path, files: &[(&str, String)]) -> anyhow::Result<()> {
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub use kubernetes::KubernetesOptions;

impl From<&KubernetesArgs> for KubernetesOptions {
    fn from(a: &KubernetesArgs) -> Self {
        KubernetesOptions {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            image: a.image.clone(),
            replicas: a.replicas,
            host: a.host.clone(),
            ingress_class: a.ingress_class.clone(),
            tls_secret: a.tls_secret.clone(),
        }
    }
}

/// The configuration file for a cluster or platform: the settings that differ from the
/// defaults, with `server.listen` set to `listen` and the API key left out (a secret, passed
/// in the environment instead).
pub fn cluster_config_toml(config: &Config, listen: &str) -> String {
    let default = toml::Value::try_from(Config::default()).expect("defaults serialize");
    let mut current = toml::Value::try_from(config).expect("config serializes");
    prune_defaults(&mut current, &default);
    let table = current.as_table_mut().expect("the configuration is a table");
    let server = table
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("server is a table");
    server.insert("listen".into(), toml::Value::String(listen.into()));
    if let Some(api) = table.get_mut("api").and_then(toml::Value::as_table_mut) {
        api.remove("key");
        if api.is_empty() {
            table.remove("api");
        }
    }
    toml::to_string(&current).expect("config serializes")
}

/// Removes from `value` every key whose value equals the one in `default`, recursively.
fn prune_defaults(value: &mut toml::Value, default: &toml::Value) {
    let (Some(table), Some(default)) = (value.as_table_mut(), default.as_table()) else {
        return;
    };
    table.retain(|key, v| match default.get(key) {
        Some(d) if v.is_table() && d.is_table() => {
            prune_defaults(v, d);
            v.as_table().is_some_and(|t| !t.is_empty())
        }
        Some(d) => v != d,
        None => true,
    });
}

/// The nginx generator's inputs besides the configuration.
#[derive(Debug, Clone, Default)]
pub struct NginxOptions {
    pub server_name: String,
    pub binds: Vec<String>,
    pub tls: Option<(String, String)>,
    /// The nodes nginx balances over; empty means one, at `server.listen`.
    pub upstreams: Vec<String>,
    /// The CA that signed ferrocast's own certificate, when it serves TLS.
    pub upstream_ca: Option<String>,
}

impl From<&NginxArgs> for NginxOptions {
    fn from(a: &NginxArgs) -> Self {
        NginxOptions {
            server_name: a.server_name.clone(),
            binds: a.binds.clone(),
            tls: a.tls_cert.clone().zip(a.tls_key.clone()),
            upstreams: a.upstreams.clone(),
            upstream_ca: a.upstream_ca.clone(),
        }
    }
}

/// The address a local proxy reaches ferrocast at: the listen address, with a wildcard
/// replaced by loopback.
fn upstream_addr(config: &Config) -> String {
    let addr: SocketAddr = config.listen_addr();
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        other => other.to_string(),
    }
}

/// Proxy timeout for long-lived connections: three heartbeats, and never under 60 s.
pub fn proxy_timeout_secs(config: &Config) -> u64 {
    (config.server.ping_interval_ms * 3).div_ceil(1000).max(60)
}

/// An nginx size (`64k`, `4m`, or bytes).
fn nginx_size(bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if bytes.is_multiple_of(MIB) {
        format!("{}m", bytes / MIB)
    } else if bytes.is_multiple_of(1024) {
        format!("{}k", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

/// `allow` lines for loopback, then `deny all`.
const LOOPBACK_ONLY: &str = "        allow 127.0.0.1;\n        allow ::1;\n        deny all;\n";

/// The nginx site for `config`.
pub fn nginx(config: &Config, opts: &NginxOptions) -> String {
    let s = &config.server;
    let timeout = proxy_timeout_secs(config);
    let nodes: Vec<String> = if opts.upstreams.is_empty() {
        vec![upstream_addr(config)]
    } else {
        opts.upstreams.clone()
    };
    let several = nodes.len() > 1;
    // Where requests that belong to a session on one node go (see `several_nodes_upstreams`).
    let sticky = if several { STICKY_UPSTREAM } else { "ferrocast" };
    // HTTP/2 for browsers: their SSE streams and API requests share one connection instead of
    // competing for HTTP/1.1's six per origin. (nginx 1.25.1+ also accepts `http2 on;`.)
    let tls_suffix = if opts.tls.is_some() { " ssl http2" } else { "" };
    let default_port = if opts.tls.is_some() { 443 } else { 80 };
    let binds: Vec<String> = if opts.binds.is_empty() {
        vec![default_port.to_string(), format!("[::]:{default_port}")]
    } else {
        opts.binds.clone()
    };
    let no_api_key = config.api.key.is_empty() && config.api.key_env.is_empty();
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "# ferrocast behind nginx, generated by `ferrocast gen nginx` for these settings:"
    );
    let _ = writeln!(
        w,
        "#   server.listen = {}, server.ws_paths = {:?}, server.ping_interval_ms = {},",
        s.listen, s.ws_paths, s.ping_interval_ms
    );
    let _ = writeln!(
        w,
        "#   socketio.enabled = {}, api key {}.",
        config.socketio.enabled,
        if no_api_key { "not set" } else { "set" }
    );
    let _ = writeln!(
        w,
        "# Put it in /etc/nginx/conf.d/ (it holds http-level blocks), run `nginx -t`, reload, then"
    );
    let _ = writeln!(
        w,
        "# check the whole path with `ferrocast doctor {}://{}/`.",
        if opts.tls.is_some() { "https" } else { "http" },
        if opts.server_name == "_" { "HOST" } else { &opts.server_name }
    );
    if several {
        let _ = writeln!(w, "# Nodes (--upstream): {}.", nodes.join(", "));
        let _ = writeln!(
            w,
            "# Each node is a whole gateway; for a message published on one node to reach clients of"
        );
        let _ = writeln!(
            w,
            "# the others, run them with the Redis broker (docs/cluster.md: setup, failures, this"
        );
        let _ = writeln!(
            w,
            "# balancer's rules); which paths are pinned and why: docs/deployment.md, \"Several nodes\"."
        );
    }
    let _ =
        writeln!(w, "# Regenerate it (same --config/--set flags) whenever those settings change.");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# WebSocket upgrades need \"Connection: upgrade\"; everything else gets no Connection"
    );
    let _ = writeln!(w, "# header, so connections to ferrocast are kept alive and reused.");
    let _ = writeln!(
        w,
        "map $http_upgrade $ferrocast_connection {{\n    default upgrade;\n    ''      '';\n}}\n"
    );
    if several {
        several_nodes_upstreams(w, &nodes);
    } else {
        let _ =
            writeln!(w, "upstream ferrocast {{\n    server {};\n    keepalive 32;\n}}\n", nodes[0]);
    }
    if opts.tls.is_some() && opts.binds.is_empty() {
        let _ = writeln!(
            w,
            "# Plain HTTP only redirects. WebSocket clients do not follow redirects: use wss:// URLs.\n\
             server {{\n    listen 80;\n    listen [::]:80;\n    server_name {};\n    return 301 https://$host$request_uri;\n}}\n",
            opts.server_name
        );
    }
    let _ = writeln!(w, "server {{");
    for b in &binds {
        let _ = writeln!(w, "    listen {b}{tls_suffix};");
    }
    let _ = writeln!(w, "    server_name {};", opts.server_name);
    if let Some((cert, key)) = &opts.tls {
        let _ = writeln!(w, "\n    ssl_certificate     {cert};\n    ssl_certificate_key {key};");
        let _ = writeln!(
            w,
            "    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:ferrocast_tls:10m;"
        );
    }
    if config.server.tls.enabled() {
        upstream_tls(w, opts);
    }
    let _ = writeln!(
        w,
        "\n    # Every location proxies with HTTP/1.1 (nginx's default, 1.0, cannot upgrade), forwards\n    \
         # the upgrade, and tells ferrocast who the client is. Locations below set none of these,\n    \
         # so they all inherit them.\n    \
         proxy_http_version 1.1;\n    \
         proxy_set_header Upgrade $http_upgrade;\n    \
         proxy_set_header Connection $ferrocast_connection;\n    \
         proxy_set_header Host $host;\n    \
         proxy_set_header X-Real-IP $remote_addr;\n    \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    \
         proxy_set_header X-Forwarded-Proto $scheme;\n\n    \
         # Idle WebSocket and SSE connections carry a heartbeat every {} ms; the proxy must wait\n    \
         # longer than that (here three heartbeats) before it calls a connection dead.\n    \
         proxy_read_timeout {timeout}s;\n    \
         proxy_send_timeout {timeout}s;",
        s.ping_interval_ms
    );
    if several {
        let _ = writeln!(
            w,
            "\n    # A node that does not accept the connection within 3 s is skipped for the next one\n    \
             # (proxy_next_upstream's default: on a connection error or timeout, for requests that\n    \
             # can be repeated), and counts toward its max_fails.\n    \
             proxy_connect_timeout 3s;"
        );
    }
    let _ = writeln!(
        w,
        "\n    # Native WebSocket endpoint{} (server.ws_paths).",
        if s.ws_paths.len() > 1 { "s" } else { "" }
    );
    for path in &s.ws_paths {
        let _ =
            writeln!(w, "    location = {path} {{\n        proxy_pass http://ferrocast;\n    }}");
    }
    if several {
        let _ = writeln!(
            w,
            "\n    # Server-Sent Events: unbuffered and uncompressed, or events arrive in bursts. Pinned\n    \
             # like Socket.IO, because a stream's POST /sse/control requests must reach the node that\n    \
             # holds the stream. Streams that never use /sse/control (channels only in the URL) could\n    \
             # use the ferrocast upstream instead.\n    \
             location = /sse {{\n        proxy_pass http://{sticky};\n        proxy_buffering off;\n        \
             proxy_cache off;\n        gzip off;\n        \
             # nginx Plus only (the open-source nginx has no active checks):\n        \
             # health_check uri=/readyz interval=5s fails=2 passes=2;\n    }}\n\n    \
             # Changes to a live SSE stream (bodies up to server.max_frame_bytes).\n    \
             location = /sse/control {{\n        proxy_pass http://{sticky};\n        \
             client_max_body_size {};\n    }}",
            nginx_size(s.max_frame_bytes)
        );
    } else {
        let _ = writeln!(
            w,
            "\n    # Server-Sent Events: unbuffered and uncompressed, or events arrive in bursts.\n    \
             location = /sse {{\n        proxy_pass http://ferrocast;\n        proxy_buffering off;\n        \
             proxy_cache off;\n        gzip off;\n    }}"
        );
    }
    if config.socketio.enabled {
        let path = config.socketio.path.trim_end_matches('/');
        let _ = writeln!(
            w,
            "\n    # Socket.IO: long-polling (request bodies up to server.max_frame_bytes) and WebSocket.{}\n    \
             location {path}/ {{\n        proxy_pass http://{sticky};\n        proxy_buffering off;\n        \
             client_max_body_size {};\n    }}",
            if several {
                "\n    # Pinned: a polling session's requests (and its upgrade) must reach the node that opened it."
            } else {
                ""
            },
            nginx_size(s.max_frame_bytes)
        );
    }
    if no_api_key && several {
        let _ = writeln!(
            w,
            "\n    # No API key is configured: ferrocast then accepts publishes from loopback only, and\n    \
             # this location lets only clients on this host through. Set api.key (on every node) to\n    \
             # publish from elsewhere.\n    \
             location = /api/publish {{\n{LOOPBACK_ONLY}        proxy_pass http://ferrocast;\n    }}"
        );
    } else if no_api_key {
        let _ = writeln!(
            w,
            "\n    # No API key is configured, and ferrocast then accepts publishes from loopback, which\n    \
             # every request through this proxy is: publishing stays local until api.key is set.\n    \
             location = /api/publish {{\n{LOOPBACK_ONLY}        proxy_pass http://ferrocast;\n    }}"
        );
    } else {
        let _ = writeln!(
            w,
            "\n    # Publishing (needs the API key); bodies up to api.max_body_bytes.\n    \
             location = /api/publish {{\n        client_max_body_size {};\n        proxy_pass http://ferrocast;\n    }}",
            nginx_size(config.api.max_body_bytes)
        );
    }
    let _ = writeln!(
        w,
        "\n    # Prometheus metrics stay private.{}\n    location = /metrics {{\n{LOOPBACK_ONLY}        proxy_pass http://ferrocast;\n    }}",
        if several {
            " Through here they are whichever node's the balancer picks:\n    # let Prometheus scrape every node directly."
        } else {
            ""
        }
    );
    let _ = writeln!(
        w,
        "\n    # Everything else: the HTTP API, /api/diagnostics (for ferrocast doctor), health, dashboard.\n    \
         location / {{\n        proxy_pass http://ferrocast;{}\n    }}\n}}",
        if several {
            "\n        # nginx Plus only: health_check uri=/readyz interval=5s fails=2 passes=2;"
        } else {
            ""
        }
    );
    if config.server.tls.enabled() {
        o = o.replace("proxy_pass http://", "proxy_pass https://");
    }
    o
}

/// The directives for a ferrocast that serves TLS itself (`[server.tls]`): nginx connects to
/// it over TLS, and checks its certificate when the CA is given.
fn upstream_tls(w: &mut String, opts: &NginxOptions) {
    let name = if opts.server_name == "_" { "localhost" } else { &opts.server_name };
    let _ = writeln!(
        w,
        "\n    # ferrocast serves TLS itself (server.tls): nginx connects to it over TLS too, naming\n    \
         # the host its certificate is for, and reuses sessions across connections.\n    \
         proxy_ssl_server_name on;\n    \
         proxy_ssl_name {name};\n    \
         proxy_ssl_protocols TLSv1.2 TLSv1.3;\n    \
         proxy_ssl_session_reuse on;"
    );
    match &opts.upstream_ca {
        Some(ca) => {
            let _ = writeln!(
                w,
                "    # ferrocast's certificate must chain to this CA and be valid for {name}.\n    \
                 proxy_ssl_verify on;\n    \
                 proxy_ssl_trusted_certificate {ca};"
            );
        }
        None => {
            let _ = writeln!(
                w,
                "    # Encrypted, but ferrocast's certificate is not checked: regenerate with\n    \
                 # --upstream-ca CA.pem to verify it.\n    \
                 proxy_ssl_verify off;"
            );
        }
    }
}

/// The upstream whose nodes keep sessions: Socket.IO polling, SSE and its control requests.
const STICKY_UPSTREAM: &str = "ferrocast_sticky";

/// The two upstreams of a site in front of several nodes: `ferrocast`, balanced by least
/// connections, and [`STICKY_UPSTREAM`], which keeps each client on one node.
fn several_nodes_upstreams(w: &mut String, nodes: &[String]) {
    let servers: String =
        nodes.iter().map(|n| format!("    server {n} max_fails=3 fail_timeout=10s;\n")).collect();
    let _ = writeln!(
        w,
        "# Health: the open-source nginx checks nodes passively only. A node that refuses, drops or\n\
         # times out max_fails connections is skipped for fail_timeout; a node that answers but is\n\
         # not ready (ferrocast's /readyz is 503 while draining or while a required feed is down)\n\
         # is only noticed by an active check: nginx Plus's `health_check uri=/readyz` (commented\n\
         # in the locations below), or the load balancer or orchestrator in front (an AWS target\n\
         # group's health check path, a Kubernetes readiness probe). `zone` shares connection\n\
         # counts and failures among nginx's worker processes.\n\
         \n\
         # WebSocket, the HTTP API and the dashboard hold no session that another node lacks: the\n\
         # node with the fewest open connections takes each new one.\n\
         upstream ferrocast {{\n    zone ferrocast 64k;\n    least_conn;\n{servers}    keepalive 32;\n}}\n\
         \n\
         # Socket.IO long-polling and SSE keep a session on the node that opened it, and every\n\
         # later request of that session must reach the same node: another one answers 400\n\
         # {{\"code\":1,\"message\":\"Session ID unknown\"}} (Socket.IO) or 404 unknown_session\n\
         # (/sse/control). Those requests cannot be routed by their session id: the Engine.IO\n\
         # handshake has none yet (the sid comes in its answer) and /sse/control carries it in the\n\
         # JSON body. The client's address is the same on all of them, so a consistent hash of it\n\
         # pins each client to one node, and adding or removing a node moves only about 1/N of the\n\
         # clients. (ip_hash would hash only the first three octets of an IPv4 address and put\n\
         # whole /24 networks on one node; hash $arg_sid or $cookie_io would send every handshake\n\
         # to one node and its later requests to another.) Behind another proxy or load balancer,\n\
         # give nginx the client's address with the realip module, or all clients share one node:\n\
         #   set_real_ip_from 10.0.0.0/8;  real_ip_header X-Forwarded-For;\n\
         # A client whose address changes (a phone switching networks) gets a new session; its\n\
         # client reconnects and recovers with offsets.\n\
         upstream {STICKY_UPSTREAM} {{\n    zone {STICKY_UPSTREAM} 64k;\n    hash $remote_addr consistent;\n{servers}    keepalive 32;\n}}\n"
    );
}

/// The systemd unit for `config`.
pub fn systemd(config: &Config, binary: &str, config_path: &str) -> String {
    let s = &config.server;
    let port = config.listen_addr().port();
    let stop_timeout = s.shutdown_grace_ms.div_ceil(1000) + 5;
    let nofile = s.max_connections.saturating_add(1024).max(65_536);
    let caps = if port < 1024 { "CAP_NET_BIND_SERVICE" } else { "" };
    let config_dir = config_path.rsplit_once('/').map_or("/etc/ferrocast", |(dir, _)| dir);
    let tls = &s.tls;
    let tls_lines = if tls.enabled() {
        format!(
            "# TLS (server.tls): SIGHUP (systemctl reload ferrocast) reads the certificate and key\n\
             # again; new handshakes use them, open connections stay. The throwaway user reads them\n\
             # through the group ferrocast-tls (create it once: groupadd --system ferrocast-tls).\n\
             # After each renewal, e.g. as certbot's --deploy-hook:\n\
             #   install -m 0640 -g ferrocast-tls \"$RENEWED_LINEAGE/fullchain.pem\" {cert}\n\
             #   install -m 0640 -g ferrocast-tls \"$RENEWED_LINEAGE/privkey.pem\" {key}\n\
             #   systemctl reload ferrocast\n\
             ExecReload=/bin/kill -HUP $MAINPID\n\
             SupplementaryGroups=ferrocast-tls\n",
            cert = tls.cert_file,
            key = tls.key_file,
        )
    } else {
        String::new()
    };
    format!(
        "# ferrocast.service, generated by `ferrocast gen systemd` for server.listen = {listen}.\n\
         # Install:\n\
         #   install -m 0755 target/release/ferrocast {binary}\n\
         #   install -D -m 0644 deploy/ferrocast.example.toml {config_path}   # then edit it\n\
         #   cp ferrocast.service /etc/systemd/system/ && systemctl daemon-reload\n\
         #   systemctl enable --now ferrocast && journalctl -u ferrocast -f\n\
         # Secrets (FERROCAST_API_KEY=...) go in {config_dir}/ferrocast.env, mode 0600.\n\
         \n\
         [Unit]\n\
         Description=ferrocast real-time push gateway (WebSocket, SSE, Socket.IO)\n\
         Documentation=https://github.com/ferrocast/ferrocast/blob/main/docs/deployment.md\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         # Refuse to start on an invalid configuration, with every problem in the journal.\n\
         ExecStartPre={binary} config check {config_path}\n\
         ExecStart={binary} serve --config {config_path}\n\
         EnvironmentFile=-{config_dir}/ferrocast.env\n\
         Environment=NO_COLOR=1\n\
         # SIGTERM drains: readiness turns 503 and clients are closed with 1001 and a reconnect\n\
         # hint, for up to server.shutdown_grace_ms ({grace} ms).\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec={stop_timeout}\n\
         {tls_lines}\
         Restart=on-failure\n\
         RestartSec=2\n\
         # One descriptor per connection (server.max_connections = {max_conn}), plus headroom.\n\
         LimitNOFILE={nofile}\n\
         \n\
         # Sandbox: an unprivileged throwaway user that can read its configuration and open\n\
         # sockets, and nothing else.\n\
         DynamicUser=yes\n\
         ConfigurationDirectory=ferrocast\n\
         NoNewPrivileges=yes\n\
         CapabilityBoundingSet={caps}\n\
         AmbientCapabilities={caps}\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         PrivateDevices=yes\n\
         PrivateUsers={private_users}\n\
         ProtectHostname=yes\n\
         ProtectClock=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectProc=invisible\n\
         ProcSubset=pid\n\
         RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         RemoveIPC=yes\n\
         SystemCallArchitectures=native\n\
         SystemCallFilter=@system-service\n\
         SystemCallFilter=~@privileged @resources\n\
         SystemCallErrorNumber=EPERM\n\
         UMask=0077\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        listen = s.listen,
        grace = s.shutdown_grace_ms,
        max_conn = s.max_connections,
        // A user namespace would drop the capability needed for a port below 1024.
        private_users = if caps.is_empty() { "yes" } else { "no" },
    )
}

/// The Dockerfile for `config`: settings that differ from the defaults become `ENV` lines.
pub fn container(config: &Config, rust_version: &str) -> String {
    let port = config.listen_addr().port();
    let (envs, unrepresentable) = changed_settings(config);
    let mut env_lines = format!("ENV FERROCAST_SERVER_LISTEN=0.0.0.0:{port}\n");
    for (key, value) in &envs {
        let _ = writeln!(env_lines, "ENV {key}={value}");
    }
    let mut notes = String::new();
    let cmd = if unrepresentable.is_empty() {
        "CMD [\"serve\"]".to_owned()
    } else {
        let _ = writeln!(
            notes,
            "# These settings cannot be passed as environment variables ({}):\n\
             # mount your configuration file: -v $PWD/ferrocast.toml:/etc/ferrocast/ferrocast.toml:ro",
            unrepresentable.join(", ")
        );
        "CMD [\"serve\", \"--config\", \"/etc/ferrocast/ferrocast.toml\"]".to_owned()
    };
    let tls = &config.server.tls;
    let (health, curl) = if tls.enabled() {
        let dirs: Vec<&str> = [&tls.cert_file, &tls.key_file]
            .iter()
            .map(|f| f.rsplit_once('/').map_or(".", |(dir, _)| dir))
            .collect();
        let mut mounts = format!("-v {0}:{0}:ro", dirs[0]);
        if dirs[1] != dirs[0] {
            let _ = write!(mounts, " -v {0}:{0}:ro", dirs[1]);
        }
        let _ = writeln!(
            notes,
            "# TLS (server.tls): ferrocast serves wss:// and https:// itself. Mount the certificate\n\
             # and key, readable by uid 65532:  {mounts}\n\
             # After a renewal, reload them without dropping connections:\n\
             #   docker kill --signal=HUP CONTAINER"
        );
        (
            format!(
                "# The health check speaks https, so this image has curl. The certificate is for the public\n\
                 # name, not 127.0.0.1: -k checks that the server answers, not who it is.\n\
                 HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \\\n    \
                 CMD [\"curl\", \"-fsSk\", \"-o\", \"/dev/null\", \"https://127.0.0.1:{port}/healthz\"]\n"
            ),
            "RUN apt-get update && apt-get install -y --no-install-recommends curl \\\n    \
             && rm -rf /var/lib/apt/lists/*\n",
        )
    } else {
        (
            format!(
                "# bash's /dev/tcp instead of curl, which the slim image does not have.\n\
                 HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \\\n    \
                 CMD [\"bash\", \"-c\", \"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /healthz HTTP/1.0\\\\r\\\\n\\\\r\\\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '\"]\n"
            ),
            "",
        )
    };
    format!(
        "# syntax=docker/dockerfile:1\n\
         # ferrocast container image, generated by `ferrocast gen container`.\n\
         #\n\
         # Build from the repository root:\n\
         #   docker build -f deploy/container/Dockerfile -t ferrocast .\n\
         # Run:\n\
         #   docker run --rm -p {port}:{port} -e FERROCAST_API_KEY=change-me ferrocast\n\
         # Settings are FERROCAST_* variables (docs/configuration.md); override any with -e.\n\
         # SIGTERM drains connections for up to server.shutdown_grace_ms: give `docker stop` (or a\n\
         # Kubernetes terminationGracePeriodSeconds) more than that. Probes: /healthz, /readyz.\n\
         {notes}\n\
         ARG RUST_VERSION={rust_version}\n\
         FROM docker.io/library/rust:${{RUST_VERSION}}-slim-bookworm AS build\n\
         WORKDIR /src\n\
         COPY . .\n\
         RUN --mount=type=cache,target=/usr/local/cargo/registry \\\n    \
             --mount=type=cache,target=/src/target \\\n    \
             cargo build --release --locked -p ferrocast \\\n    \
             && install -m 0755 target/release/ferrocast /usr/local/bin/ferrocast\n\
         \n\
         # No CA bundle needed: upstream TLS uses Mozilla's roots compiled into the binary.\n\
         FROM docker.io/library/debian:bookworm-slim\n\
         {curl}\
         COPY --from=build /usr/local/bin/ferrocast /usr/local/bin/ferrocast\n\
         {env_lines}\
         USER 65532:65532\n\
         EXPOSE {port}\n\
         STOPSIGNAL SIGTERM\n\
         {health}\
         ENTRYPOINT [\"/usr/local/bin/ferrocast\"]\n\
         {cmd}\n"
    )
}

/// Settings that differ from the defaults, as `(FERROCAST_* variable, value)` pairs, and the
/// keys an environment variable cannot set (namespaces the defaults do not have). Secrets
/// (`api.key`) are left out: they belong in the runtime environment, not in an image.
fn changed_settings(config: &Config) -> (Vec<(String, String)>, Vec<String>) {
    let default = toml::Value::try_from(Config::default()).expect("defaults serialize");
    let current = toml::Value::try_from(config).expect("config serializes");
    let mut leaves = Vec::new();
    collect_leaves(&current, "", &mut leaves);
    let mut envs = Vec::new();
    let mut unrepresentable = Vec::new();
    for (path, value) in leaves {
        if path == "server.listen" || path == "api.key" {
            continue;
        }
        let old = path.split('.').try_fold(&default, |v, part| v.as_table()?.get(part));
        match old {
            Some(old) if *old == value => {}
            Some(_) => envs.push((env_name(&path), env_value(&value))),
            None => {
                let table = path.rsplit_once('.').map_or(path.as_str(), |(t, _)| t).to_owned();
                if !unrepresentable.contains(&table) {
                    unrepresentable.push(table);
                }
            }
        }
    }
    (envs, unrepresentable)
}

fn collect_leaves(value: &toml::Value, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                collect_leaves(v, &path, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// A value as the environment override parser reads it, quoted for a Dockerfile `ENV`.
fn env_value(value: &toml::Value) -> String {
    let raw = match value {
        toml::Value::String(s) => s.clone(),
        // Lists of strings also parse from a comma-separated value, which needs no escaping.
        toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
            items.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    };
    format!("\"{}\"", raw.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocast_server::config::Sources;

    /// The example files in `deploy/` are this generator's output for the defaults; rerun
    /// with UPDATE_DEPLOY_EXAMPLES=1 to rewrite them after a deliberate change.
    fn golden(rel: &str, generated: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel);
        if std::env::var_os("UPDATE_DEPLOY_EXAMPLES").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{rel} differs from the generator's output; run UPDATE_DEPLOY_EXAMPLES=1 cargo test -p ferrocast generate::tests"
        );
    }

    /// The deploy/nginx example: TLS for push.example.com with certbot's paths.
    pub fn nginx_example_options() -> NginxOptions {
        NginxOptions {
            server_name: "push.example.com".into(),
            tls: Some((
                "/etc/letsencrypt/live/push.example.com/fullchain.pem".into(),
                "/etc/letsencrypt/live/push.example.com/privkey.pem".into(),
            )),
            ..Default::default()
        }
    }

    /// The nodes of the deploy/nginx/ferrocast-nodes.conf example.
    fn example_nodes() -> Vec<String> {
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"].map(String::from).to_vec()
    }

    #[test]
    fn deploy_examples_are_the_generated_files() {
        let config = Config::default();
        golden("deploy/nginx/ferrocast.conf", &nginx(&config, &nginx_example_options()));
        golden(
            "deploy/nginx/ferrocast-nodes.conf",
            &nginx(
                &config,
                &NginxOptions { upstreams: example_nodes(), ..nginx_example_options() },
            ),
        );
        golden(
            "deploy/systemd/ferrocast.service",
            &systemd(&config, "/usr/local/bin/ferrocast", "/etc/ferrocast/ferrocast.toml"),
        );
        golden("deploy/container/Dockerfile", &container(&config, "1.95"));
        golden(
            "deploy/kubernetes/ferrocast.yaml",
            &kubernetes::kubernetes(&config, &KubernetesOptions::default()),
        );
        for (rel, text) in beanstalk::elastic_beanstalk(&config, None, None) {
            golden(&format!("deploy/elastic-beanstalk/{rel}"), &text);
        }
    }

    #[test]
    fn kubernetes_follows_the_settings() {
        let c = config(&[
            "server.listen=0.0.0.0:443",
            "server.shutdown_grace_ms=30000",
            "server.ping_interval_ms=40000",
            "server.ws_paths=[\"/ws\",\"/ws/price\"]",
            "api.key=secret",
        ]);
        let opts = KubernetesOptions { replicas: 1, ..Default::default() };
        let text = kubernetes::kubernetes(&c, &opts);
        assert!(text.contains("terminationGracePeriodSeconds: 40\n"), "{text}");
        assert!(text.contains("proxy-read-timeout: \"120\""), "{text}");
        assert!(text.contains("containerPort: 443\n"), "{text}");
        assert!(text.contains("net.ipv4.ip_unprivileged_port_start"), "{text}");
        assert!(text.contains("    listen = \"0.0.0.0:443\"\n"), "{text}");
        assert!(text.contains("- path: \"/ws/price\"\n            pathType: Exact"), "{text}");
        assert!(!text.contains("secret\n") && !text.contains("key = "), "{text}");
        assert!(!text.contains("PodDisruptionBudget"), "one replica has no budget: {text}");
        let defaults = kubernetes::kubernetes(&Config::default(), &KubernetesOptions::default());
        assert!(!defaults.contains("ip_unprivileged_port_start"));
        assert!(defaults.contains("kind: PodDisruptionBudget"));
        let no_sio = kubernetes::kubernetes(
            &config(&["socketio.enabled=false", "server.dashboard=false"]),
            &KubernetesOptions::default(),
        );
        assert!(!no_sio.contains("/socket.io") && !no_sio.contains("/app.js"), "{no_sio}");
    }

    #[test]
    fn cluster_config_keeps_only_changed_settings() {
        let c = config(&["server.ping_interval_ms=5000", "api.key=k", "log.format=json"]);
        let text = cluster_config_toml(&c, "0.0.0.0:8080");
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["server"]["ping_interval_ms"].as_integer(), Some(5000), "{text}");
        assert_eq!(parsed["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(parsed["log"]["format"].as_str(), Some("json"));
        assert!(parsed.get("api").is_none(), "the key is a secret: {text}");
        assert!(parsed["server"].get("max_connections").is_none(), "{text}");
    }

    #[test]
    fn elastic_beanstalk_follows_the_settings() {
        let c = config(&["server.ping_interval_ms=50000", "server.listen=127.0.0.1:9000"]);
        let files: std::collections::BTreeMap<_, _> =
            beanstalk::elastic_beanstalk(&c, None, None).into_iter().collect();
        assert!(files[beanstalk::HTTP_CONF].contains("server 127.0.0.1:9000;"));
        let server = &files[beanstalk::SERVER_CONF];
        assert!(server.contains("proxy_read_timeout 150s;"), "{server}");
        assert!(!server.contains("location / "), "Elastic Beanstalk has its own: {server}");
        let ext = &files[beanstalk::EBEXTENSION];
        assert!(ext.contains("IdleTimeout: 150\n") && ext.contains("PORT: \"9000\""), "{ext}");
        assert!(files[beanstalk::CONFIG_FILE].contains("listen = \"127.0.0.1:9000\""));
    }

    fn config(sets: &[&str]) -> Config {
        Config::load(&Sources {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn nginx_follows_the_settings() {
        let c = config(&[
            "server.ws_paths=[\"/ws\",\"/ws/price\"]",
            "server.ping_interval_ms=40000",
            "server.listen=0.0.0.0:9000",
        ]);
        let text = nginx(&c, &NginxOptions { server_name: "_".into(), ..Default::default() });
        assert!(
            text.contains("location = /ws {") && text.contains("location = /ws/price {"),
            "{text}"
        );
        assert!(text.contains("proxy_read_timeout 120s;"), "{text}");
        assert!(text.contains("server 127.0.0.1:9000;"), "{text}");
        assert!(text.contains("proxy_http_version 1.1;"));
        assert!(text.contains("proxy_set_header Connection $ferrocast_connection;"));
        assert!(text.contains("listen 80;") && !text.contains("ssl"), "{text}");
        // Without an API key, publishing through the proxy is refused.
        assert!(text.contains("location = /api/publish {\n        allow 127.0.0.1;"), "{text}");
        let keyed = nginx(&config(&["api.key=k"]), &NginxOptions::default());
        assert!(keyed.contains("client_max_body_size 4m;"), "{keyed}");
        assert_eq!(proxy_timeout_secs(&config(&["server.ping_interval_ms=2000"])), 60);
    }

    /// `--set` flags for a ferrocast that serves TLS itself.
    const SERVES_TLS: [&str; 2] = [
        "server.tls.cert_file=/etc/ferrocast/tls/cert.pem",
        "server.tls.key_file=/etc/ferrocast/tls/key.pem",
    ];

    #[test]
    fn tls_variants_follow_server_tls() {
        let plain = Config::default();
        let tls = config(&SERVES_TLS);
        // nginx terminating TLS offers HTTP/2; in front of a TLS ferrocast it re-encrypts,
        // verifying only when given the CA.
        let front = nginx(&plain, &nginx_example_options());
        assert!(front.contains("listen 443 ssl http2;"), "{front}");
        assert!(!front.contains("proxy_pass https://") && !front.contains("proxy_ssl"), "{front}");
        let opts = NginxOptions {
            server_name: "push.example.com".into(),
            upstream_ca: Some("/etc/nginx/ferrocast-ca.pem".into()),
            ..Default::default()
        };
        let reencrypt = nginx(&tls, &opts);
        assert!(!reencrypt.contains("proxy_pass http://"), "{reencrypt}");
        assert!(reencrypt.contains("proxy_pass https://ferrocast;"), "{reencrypt}");
        assert!(reencrypt.contains("proxy_ssl_name push.example.com;"), "{reencrypt}");
        assert!(reencrypt.contains("proxy_ssl_verify on;"), "{reencrypt}");
        assert!(reencrypt.contains("proxy_ssl_trusted_certificate /etc/nginx/ferrocast-ca.pem;"));
        let unverified = nginx(&tls, &NginxOptions::default());
        assert!(unverified.contains("proxy_ssl_verify off;"), "{unverified}");
        assert!(unverified.contains("--upstream-ca"), "{unverified}");
        // systemd reloads with SIGHUP and reads the files through a group.
        let unit = systemd(&tls, "/b", "/etc/ferrocast/ferrocast.toml");
        assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"), "{unit}");
        assert!(unit.contains("SupplementaryGroups=ferrocast-tls"), "{unit}");
        assert!(unit.contains("/etc/ferrocast/tls/key.pem"), "{unit}");
        assert!(!systemd(&plain, "/b", "/c").contains("ExecReload"));
        // The container's health check speaks https, with the curl it installs.
        let image = container(&tls, "1.95");
        assert!(image.contains("\"https://127.0.0.1:8080/healthz\""), "{image}");
        assert!(image.contains("apt-get install -y --no-install-recommends curl"), "{image}");
        assert!(image.contains("-v /etc/ferrocast/tls:/etc/ferrocast/tls:ro"), "{image}");
        assert!(image.contains("docker kill --signal=HUP"), "{image}");
        assert!(!container(&plain, "1.95").contains("curl\""));
        // Kubernetes: a TLS Secret mounted where the configuration points, HTTPS everywhere.
        let k8s = kubernetes::kubernetes(&tls, &KubernetesOptions::default());
        assert!(k8s.contains("cert_file = \"/etc/ferrocast-tls/tls.crt\""), "{k8s}");
        assert!(k8s.contains("secretName: \"ferrocast-tls\""), "{k8s}");
        assert_eq!(k8s.matches("scheme: HTTPS").count(), 2, "{k8s}");
        assert!(k8s.contains("backend-protocol: \"HTTPS\""), "{k8s}");
        assert!(!k8s.contains("name: http\n"), "{k8s}");
        // Elastic Beanstalk: TLS ends at the load balancer.
        let eb = beanstalk::elastic_beanstalk(
            &plain,
            None,
            Some("arn:aws:acm:eu-west-1:1:certificate/x"),
        );
        let ext = &eb.iter().find(|(p, _)| *p == beanstalk::EBEXTENSION).unwrap().1;
        assert!(ext.contains("aws:elbv2:listener:443:"), "{ext}");
        assert!(ext.contains("SSLCertificateArns: arn:aws:acm:eu-west-1:1:certificate/x"), "{ext}");
    }

    #[test]
    fn nginx_in_front_of_several_nodes_pins_sessions_only() {
        let opts = NginxOptions { upstreams: example_nodes(), ..Default::default() };
        let text = nginx(&config(&["server.ws_paths=[\"/ws\",\"/ws/price\"]"]), &opts);
        let block = |name: &str| {
            let start = text.find(&format!("upstream {name} {{")).expect(name);
            text[start..start + text[start..].find('}').unwrap()].to_owned()
        };
        let (free, sticky) = (block("ferrocast"), block(STICKY_UPSTREAM));
        // The header sends the operator to the cluster guide; one node's site does not.
        assert!(text.contains("(docs/cluster.md:"), "{text}");
        assert!(!nginx(&Config::default(), &Default::default()).contains("docs/cluster.md"));
        assert!(free.contains("least_conn;") && !free.contains("hash"), "{free}");
        assert!(sticky.contains("hash $remote_addr consistent;"), "{sticky}");
        for b in [&free, &sticky] {
            for node in example_nodes() {
                assert!(b.contains(&format!("server {node} max_fails=3 fail_timeout=10s;")), "{b}");
            }
            // nginx wants the balancing method before keepalive.
            assert!(b.find("keepalive 32;") > b.find("least_conn").or(b.find("hash")), "{b}");
        }
        let location = |path: &str| {
            let start = text.find(&format!("location {path} {{")).expect(path);
            text[start..start + text[start..].find('}').unwrap()].to_owned()
        };
        for path in ["= /ws", "= /ws/price", "= /api/publish", "= /metrics", "/"] {
            assert!(location(path).contains("proxy_pass http://ferrocast;"), "{path}: {text}");
        }
        for path in ["= /sse", "= /sse/control", "/socket.io/"] {
            let l = location(path);
            assert!(l.contains(&format!("proxy_pass http://{STICKY_UPSTREAM};")), "{path}: {l}");
        }
        assert!(location("= /sse/control").contains("client_max_body_size 64k;"));
        assert!(text.contains("proxy_connect_timeout 3s;") && text.contains("uri=/readyz"));
        assert!(text.contains("proxy_read_timeout 75s;"), "{text}");

        // One node, given or not, keeps the single upstream.
        let one = NginxOptions { upstreams: vec!["10.0.0.9:80".into()], ..Default::default() };
        let single = nginx(&Config::default(), &one);
        assert!(
            single.contains("upstream ferrocast {\n    server 10.0.0.9:80;\n    keepalive 32;\n}")
        );
        assert!(!single.contains(STICKY_UPSTREAM) && !single.contains("least_conn"), "{single}");
        assert!(!single.contains("/sse/control"), "{single}");
    }

    #[test]
    fn systemd_follows_the_settings() {
        let low = systemd(
            &config(&["server.listen=0.0.0.0:443", "server.max_connections=500000"]),
            "/b",
            "/etc/f/f.toml",
        );
        assert!(low.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"), "{low}");
        assert!(low.contains("PrivateUsers=no"));
        assert!(low.contains("LimitNOFILE=501024"), "{low}");
        let high = systemd(&Config::default(), "/b", "/etc/f/f.toml");
        assert!(high.contains("CapabilityBoundingSet=\n"), "{high}");
        assert!(high.contains("ExecStart=/b serve --config /etc/f/f.toml"));
        assert!(high.contains("TimeoutStopSec=15"));
    }

    #[test]
    fn container_bakes_in_changed_settings_but_not_secrets() {
        let c = config(&[
            "server.listen=127.0.0.1:9000",
            "server.ping_interval_ms=10000",
            "server.ws_paths=[\"/ws\",\"/api/socket\"]",
            "api.key=secret",
        ]);
        let text = container(&c, "1.95");
        assert!(text.contains("ENV FERROCAST_SERVER_LISTEN=0.0.0.0:9000"), "{text}");
        assert!(text.contains("ENV FERROCAST_SERVER_PING_INTERVAL_MS=\"10000\""), "{text}");
        assert!(text.contains("ENV FERROCAST_SERVER_WS_PATHS=\"/ws,/api/socket\""), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("EXPOSE 9000"));
        assert!(text.contains("CMD [\"serve\"]"));
        let custom = container(&config(&["namespaces.prices.client_publish=true"]), "1.95");
        assert!(custom.contains("--config"), "{custom}");
    }
}
