//! The fixes the doctor prints: exact configuration for nginx, HAProxy, cloud load
//! balancers and ferrocast itself, one function per diagnosis.

use super::report::Fix;

/// The nginx lines every WebSocket location needs (plus the `map` at `http` level).
pub fn upgrade_headers(path: &str) -> Vec<Fix> {
    vec![
        Fix::new(
            "nginx",
            format!(
                "# in the http block (once):\n\
                 map $http_upgrade $connection_upgrade {{\n    default upgrade;\n    ''      close;\n}}\n\
                 # in the server block:\n\
                 location {path} {{\n    proxy_pass http://127.0.0.1:8080;\n    proxy_http_version 1.1;\n    \
                 proxy_set_header Upgrade $http_upgrade;\n    proxy_set_header Connection $connection_upgrade;\n    \
                 proxy_set_header Host $host;\n    proxy_read_timeout 75s;\n}}\n\
                 # or generate the whole file: ferrocast gen nginx"
            ),
        ),
        Fix::new(
            "HAProxy",
            "# HAProxy forwards upgrades in HTTP mode by itself; check nothing strips them:\n\
             # no \"http-request del-header Connection\" / \"option httpclose\" on this path, and\n\
             backend ferrocast\n    timeout tunnel 1h\n    server ferrocast1 127.0.0.1:8080 check",
        ),
        Fix::new(
            "cloud load balancer",
            "AWS: use an Application Load Balancer (HTTP/HTTPS listener) or an NLB; a Classic ELB\n\
             with HTTP listeners drops upgrades (use TCP/SSL listeners there).\n\
             Cloudflare: Network > WebSockets must be on.  GCP/Azure HTTP(S) LBs pass upgrades.",
        ),
    ]
}

/// nginx proxies with HTTP/1.0 unless told otherwise, and 1.0 has no upgrade.
pub fn http_version() -> Vec<Fix> {
    vec![Fix::new(
        "nginx",
        "proxy_http_version 1.1;   # in the location (nginx's default is 1.0, which cannot upgrade)",
    )]
}

pub fn forwarded_for() -> Vec<Fix> {
    vec![
        Fix::new(
            "nginx",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             proxy_set_header X-Forwarded-Proto $scheme;\n\
             proxy_set_header Host $host;",
        ),
        Fix::new(
            "HAProxy",
            "option forwardfor\nhttp-request set-header X-Forwarded-Proto https if { ssl_fc }",
        ),
    ]
}

/// The proxy's idle timeout is shorter than (or too close to) the server's heartbeat.
pub fn idle_timeout(proxy_s: u64, ping_s: Option<u64>) -> Vec<Fix> {
    let suggested_ping_ms = (proxy_s * 1000 / 2).max(1000);
    let read_timeout = ping_s.map_or(120, |p| (p * 3).max(60));
    let mut fixes = vec![Fix::new(
        "ferrocast",
        format!(
            "# keep the heartbeat at most half the shortest idle timeout on the path:\n\
             ferrocast serve --set server.ping_interval_ms={suggested_ping_ms}\n\
             # or in ferrocast.toml: [server] ping_interval_ms = {suggested_ping_ms}"
        ),
    )];
    fixes.extend([
        Fix::new(
            "nginx",
            format!("proxy_read_timeout {read_timeout}s;   # in the WebSocket/SSE locations (default 60s)\nproxy_send_timeout {read_timeout}s;"),
        ),
        Fix::new("HAProxy", format!("timeout tunnel {read_timeout}s   # idle timeout of upgraded connections\ntimeout client {read_timeout}s\ntimeout server {read_timeout}s")),
        Fix::new(
            "cloud load balancer",
            format!(
                "AWS ALB: aws elbv2 modify-load-balancer-attributes --attributes Key=idle_timeout.timeout_seconds,Value={read_timeout}\n\
                 GCP: backend service timeoutSec ≥ {read_timeout} (it caps WebSocket lifetime too)\n\
                 Cloudflare: the idle limit is 100 s and cannot be raised: keep the heartbeat below 50 s"
            ),
        ),
    ]);
    fixes
}

pub fn sse_buffering(path: &str) -> Vec<Fix> {
    vec![
        Fix::new(
            "nginx",
            format!(
                "location {path} {{\n    proxy_pass http://127.0.0.1:8080;\n    proxy_http_version 1.1;\n    \
                 proxy_set_header Connection \"\";\n    proxy_buffering off;\n    proxy_cache off;\n    gzip off;\n    \
                 proxy_read_timeout 75s;\n}}\n\
                 # ferrocast sends \"X-Accel-Buffering: no\"; if events still arrive in bursts, remove any\n\
                 # \"proxy_ignore_headers X-Accel-Buffering\" and check CDNs or compression in front."
            ),
        ),
        Fix::new(
            "HAProxy",
            "# HAProxy streams responses; make sure compression skips event streams:\n\
             compression type text/html text/plain application/json   # not text/event-stream",
        ),
        Fix::new(
            "CDN",
            "Bypass caching and buffering for /sse (Cloudflare: a Cache Rule \"bypass\" for the path;\n\
             CloudFront: a behavior with caching disabled and compression off).",
        ),
    ]
}

pub fn ws_path_alias(path: &str, ws_paths: &[String]) -> Vec<Fix> {
    let mut all: Vec<String> = ws_paths.to_vec();
    if !all.iter().any(|p| p == path) {
        all.push(path.to_owned());
    }
    let list = all.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(",");
    vec![Fix::new(
        "ferrocast",
        format!(
            "# serve the native endpoint at {path} too, so existing apps keep their URL:\n\
             ferrocast serve --set 'server.ws_paths=[{list}]'\n\
             # or in ferrocast.toml: [server] ws_paths = [{}]",
            all.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ")
        ),
    )]
}

/// A Socket.IO client (`io(...)`) against a server that speaks plain WebSocket.
pub fn socketio_client_to_native(ws_path: &str) -> Vec<Fix> {
    vec![
        Fix::new(
            "client",
            format!(
                "// replace the Socket.IO client with a native WebSocket:\n\
                 const ws = new WebSocket(\"wss://\" + location.host + \"{ws_path}\");\n\
                 ws.onopen = () => ws.send(JSON.stringify({{op: \"subscribe\", id: 1, channels: [\"ticks.AAPL\"]}}));\n\
                 ws.onmessage = (e) => console.log(JSON.parse(e.data));"
            ),
        ),
        Fix::new(
            "ferrocast",
            "# or keep the Socket.IO client and turn ferrocast's Socket.IO endpoint on:\n\
             ferrocast serve --set socketio.enabled=true",
        ),
    ]
}

/// A native WebSocket client pointed at a Socket.IO server.
pub fn native_client_to_socketio(sio_path: &str) -> Vec<Fix> {
    vec![Fix::new(
        "client",
        format!(
            "// this server speaks Socket.IO (Engine.IO v4) at {sio_path}/: use its client library\n\
             import {{ io }} from \"socket.io-client\";\n\
             const socket = io(\"https://your.host\", {{ path: \"{sio_path}\" }});"
        ),
    )]
}

pub fn renew_certificate() -> Vec<Fix> {
    vec![
        Fix::new("certbot", "certbot renew && systemctl reload nginx"),
        Fix::new(
            "nginx",
            "ssl_certificate     /etc/letsencrypt/live/HOST/fullchain.pem;\nssl_certificate_key /etc/letsencrypt/live/HOST/privkey.pem;",
        ),
        Fix::new(
            "ferrocast",
            "# serving TLS itself ([server.tls]): replace cert_file and key_file, then\n\
             systemctl reload ferrocast   # SIGHUP: new handshakes get it, connections stay",
        ),
    ]
}

pub fn certificate_name(host: &str) -> Vec<Fix> {
    vec![Fix::new(
        "nginx",
        format!(
            "server {{\n    listen 443 ssl;\n    server_name {host};\n    \
             ssl_certificate     /etc/letsencrypt/live/{host}/fullchain.pem;\n    \
             ssl_certificate_key /etc/letsencrypt/live/{host}/privkey.pem;\n}}\n\
             # get one: certbot --nginx -d {host}"
        ),
    )]
}

pub fn certificate_chain() -> Vec<Fix> {
    vec![
        Fix::new(
            "nginx",
            "ssl_certificate /etc/letsencrypt/live/HOST/fullchain.pem;   # fullchain, not cert.pem",
        ),
        Fix::new(
            "ferrocast",
            "[server.tls]\ncert_file = \"/etc/letsencrypt/live/HOST/fullchain.pem\"   # fullchain, not cert.pem",
        ),
        Fix::new(
            "doctor",
            "a private CA is fine for internal tests: ferrocast doctor --ca-file ca.pem URL",
        ),
    ]
}

pub fn tls_port() -> Vec<Fix> {
    vec![Fix::new(
        "nginx",
        "server {\n    listen 443 ssl;\n    ssl_certificate     /path/fullchain.pem;\n    ssl_certificate_key /path/privkey.pem;\n    ...\n}\n\
         # or connect with ws:// / http:// if this port is plain HTTP",
    )]
}

pub fn connection_refused(port: u16) -> Vec<Fix> {
    vec![Fix::new(
        "host",
        format!(
            "ss -ltnp | grep ':{port} '        # is anything listening?\n\
             systemctl status ferrocast nginx  # is the service up?\n\
             # ferrocast listens on 127.0.0.1:8080 by default: --listen 0.0.0.0:{port} to accept remote clients"
        ),
    )]
}

pub fn connect_timeout(port: u16) -> Vec<Fix> {
    vec![Fix::new(
        "firewall",
        format!(
            "ufw allow {port}/tcp                       # on the host\n\
             # cloud: allow inbound TCP {port} in the security group / firewall rule"
        ),
    )]
}

pub fn dns(host: &str) -> Vec<Fix> {
    vec![Fix::new(
        "DNS",
        format!(
            "dig +short {host} A; dig +short {host} AAAA   # is there a record?\n# create an A/AAAA record pointing at the proxy or load balancer"
        ),
    )]
}

pub fn proxy_upstream() -> Vec<Fix> {
    vec![Fix::new(
        "nginx",
        "upstream ferrocast { server 127.0.0.1:8080; }   # must match ferrocast's server.listen\n\
         # then: curl -i http://127.0.0.1:8080/healthz on the proxy host",
    )]
}

pub fn origin_allowlist(origin: &str) -> Vec<Fix> {
    vec![Fix::new(
        "ferrocast",
        format!("ferrocast serve --set 'server.allowed_origins=[\"{origin}\"]'"),
    )]
}

pub fn frame_limit(passing: usize) -> Vec<Fix> {
    vec![
        Fix::new(
            "ferrocast",
            format!(
                "# let clients get a clean 1009 instead of a dropped connection:\n\
                 ferrocast serve --set server.max_frame_bytes={passing}"
            ),
        ),
        Fix::new(
            "intermediary",
            "raise the WebSocket frame/message limit of the gateway or WAF in front\n\
             (AWS API Gateway WebSocket APIs cap frames at 32 KB and messages at 128 KB)",
        ),
    ]
}

/// A front that spreads one Socket.IO polling session (or one SSE stream and its control
/// requests) over several nodes: pin each client to one node.
pub fn sticky_sessions(sio_path: &str) -> Vec<Fix> {
    vec![
        Fix::new(
            "nginx",
            format!(
                "# a second upstream that keeps each client on one node, for the session paths:\n\
                 upstream ferrocast_sticky {{\n    hash $remote_addr consistent;   # or: ip_hash;\n    \
                 server 10.0.0.1:8080;\n    server 10.0.0.2:8080;\n    keepalive 32;\n}}\n\
                 location {sio_path}/    {{ proxy_pass http://ferrocast_sticky; ... }}\n\
                 location = /sse         {{ proxy_pass http://ferrocast_sticky; ... }}\n\
                 location = /sse/control {{ proxy_pass http://ferrocast_sticky; }}\n\
                 # (not hash $arg_sid: the handshake has no sid yet and lands on another node)\n\
                 # or generate the whole site: ferrocast gen nginx --upstream 10.0.0.1:8080 --upstream 10.0.0.2:8080"
            ),
        ),
        Fix::new(
            "HAProxy",
            format!(
                "backend ferrocast_sticky   # used for {sio_path}/ and /sse (use_backend ... if {{ path_beg {sio_path}/ /sse }})\n    \
                 balance source            # or a cookie the balancer inserts:\n    \
                 # cookie SERVERID insert indirect nocache\n    \
                 server n1 10.0.0.1:8080 check cookie n1\n    \
                 server n2 10.0.0.2:8080 check cookie n2"
            ),
        ),
        Fix::new(
            "AWS ALB",
            "aws elbv2 modify-target-group-attributes --target-group-arn ARN --attributes \\\n    \
             Key=stickiness.enabled,Value=true Key=stickiness.type,Value=lb_cookie \\\n    \
             Key=stickiness.lb_cookie.duration_seconds,Value=86400\n\
             # Elastic Beanstalk: aws:elasticbeanstalk:environment:process:default StickinessEnabled: true\n\
             # (ferrocast gen elastic-beanstalk sets it)",
        ),
        Fix::new(
            "Kubernetes ingress-nginx",
            "nginx.ingress.kubernetes.io/affinity: \"cookie\"\n\
             nginx.ingress.kubernetes.io/affinity-mode: \"persistent\"   # ferrocast gen kubernetes sets both",
        ),
        Fix::new(
            "client",
            "// or skip long-polling, which needs no stickiness (WebSocket stays on its node):\n\
             io(\"https://your.host\", { transports: [\"websocket\"] });",
        ),
    ]
}
