//! `intruder`: what a stranger on a client LAN tries against the overlay,
//! with no credentials but what a viewer has (the CA certificate, maybe a
//! viewer token): media aimed at another host, overlay and membership
//! calls under real nodes' names, admin calls, oversized and flooding
//! requests. Each attempt is printed as one JSON line saying whether the
//! overlay took it; the lab tests run this inside a client namespace and
//! check that nothing was taken while the viewers keep playing.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use overlay_proto as pb;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Request;

#[derive(Parser)]
#[command(name = "intruder", about = "Attacks a running overlay from a client host and reports what was taken")]
struct Cli {
    /// A POP's client-facing address.
    #[arg(long)]
    pop: String,
    /// The POP's name (claimed in spoofed overlay calls).
    #[arg(long)]
    pop_name: String,
    /// A relay on the stream's tree.
    #[arg(long)]
    relay: String,
    /// A real downstream of that relay (its name, claimed in spoofed calls).
    #[arg(long)]
    downstream: String,
    /// The bootstrapper's address.
    #[arg(long)]
    bootstrap: String,
    /// Another host, at which the POP's media is aimed.
    #[arg(long)]
    victim: String,
    /// The stream the viewers watch.
    #[arg(long, default_value = "test")]
    stream: String,
    /// The overlay's CA certificate (what viewers have): calls go over TLS
    /// without a client certificate. Without it, plain TCP.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A valid viewer token, stolen from a viewer.
    #[arg(long)]
    token: Option<String>,
    /// gRPC control port.
    #[arg(long, default_value_t = 7070)]
    port: u16,
}

struct Attempt {
    attack: &'static str,
    taken: bool,
    detail: String,
}

fn outcome<T>(attack: &'static str, result: Result<T, tonic::Status>) -> Attempt {
    match result {
        Ok(_) => Attempt { attack, taken: true, detail: "answered OK".into() },
        Err(s) => Attempt { attack, taken: false, detail: format!("{:?}: {}", s.code(), s.message()) },
    }
}

impl Cli {
    /// A channel to `addr` (IP, or IP:PORT).
    async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let (host, port) = match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => (a.ip().to_string(), a.port()),
            Err(_) => (addr.to_string(), self.port),
        };
        let host = host.as_str();
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{host}:{port}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca {
            let config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?)).domain_name(host);
            ep = ep.tls_config(config)?;
        }
        Ok(ep.connect().await?)
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }
}

async fn attacks(cli: &Cli) -> anyhow::Result<Vec<Attempt>> {
    let mut out = Vec::new();
    let stream = cli.stream.clone();

    // A POP as a traffic cannon: a session whose media goes to the victim.
    let mut session = pb::session_client::SessionClient::new(cli.channel(&cli.pop).await?);
    let mut session_id = String::new();
    let amplified = async {
        let id = session.connect_pop(cli.request(pb::ConnectRequest { client: "viewer".into() })).await?;
        session_id = id.into_inner().session_id;
        session
            .setup(cli.request(pb::SetupRequest {
                session_id: session_id.clone(),
                stream: stream.clone(),
                rtp_port: 9,
                rtp_host: cli.victim.clone(),
            }))
            .await?;
        session.play(cli.request(pb::SessionRequest { session_id: session_id.clone() })).await
    };
    out.push(outcome("media aimed at another host", amplified.await));
    if !session_id.is_empty() {
        let _ = session.teardown(cli.request(pb::SessionRequest { session_id })).await;
    }

    // Overlay calls under a real neighbour's name.
    let mut relay = pb::overlay_client::OverlayClient::new(cli.channel(&cli.relay).await?);
    let r = relay.leave(cli.request(pb::LeaveRequest { stream: stream.clone(), sender: cli.downstream.clone() })).await;
    out.push(outcome("Leave as the relay's downstream", r));
    let r = relay
        .join(cli.request(pb::JoinRequest {
            stream: stream.clone(),
            sender: cli.downstream.clone(),
            path: vec![cli.downstream.clone()],
            data_port: 9,
        }))
        .await;
    out.push(outcome("Join as the relay's downstream (feed redirected)", r));
    let r = relay
        .reroot(cli.request(pb::RerootRequest {
            stream: stream.clone(),
            sender: cli.downstream.clone(),
            route: Vec::new(),
            server: String::new(),
            delay_us: 0,
            repairing: false,
        }))
        .await;
    out.push(outcome("Reroot (give-up) as a neighbour", r));
    let r =
        relay.refresh(cli.request(pb::RefreshRequest { stream: stream.clone(), sender: cli.downstream.clone() })).await;
    out.push(outcome("Refresh (GOP burst) as a neighbour", r));
    let r = relay.ping(cli.request(pb::PingRequest { sender: cli.downstream.clone() })).await;
    out.push(outcome("Ping as a neighbour", r));
    let r = relay.inspect(cli.request(pb::InspectRequest {})).await;
    out.push(outcome("Inspect a relay", r));

    // Membership under a live node's name.
    let mut boot = pb::bootstrap_client::BootstrapClient::new(cli.channel(&cli.bootstrap).await?);
    let r = boot
        .register(cli.request(pb::RegisterRequest {
            name: cli.pop_name.clone(),
            role: "pop".into(),
            streams: Vec::new(),
        }))
        .await;
    out.push(outcome("Register as a live POP", r));
    let watched = async {
        let mut events = boot.watch(cli.request(pb::WatchRequest { name: cli.pop_name.clone() })).await?.into_inner();
        // A refused watch fails on its first message at the latest.
        match tokio::time::timeout(Duration::from_secs(2), events.message()).await {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        }
    };
    out.push(outcome("Watch as a live POP", watched.await));
    let r = boot.overview(cli.request(pb::OverviewRequest {})).await;
    out.push(outcome("Overview", r));

    // Oversized requests: 64 client names of 1 MiB each.
    let mut taken = 0;
    let mut last = String::new();
    for _ in 0..64 {
        match session.connect_pop(cli.request(pb::ConnectRequest { client: "x".repeat(1 << 20) })).await {
            Ok(_) => taken += 1,
            Err(s) => last = format!("{:?}: {}", s.code(), s.message().chars().take(120).collect::<String>()),
        }
    }
    out.push(Attempt {
        attack: "64 sessions with 1 MiB names",
        taken: taken > 0,
        detail: format!("{taken} taken; {last}"),
    });

    // A flood of sessions from one address: the per-address bound holds.
    let mut opened = Vec::new();
    let mut last = String::new();
    for i in 0..200 {
        match session.connect_pop(cli.request(pb::ConnectRequest { client: format!("flood-{i}") })).await {
            Ok(reply) => opened.push(reply.into_inner().session_id),
            Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
        }
    }
    // Closed again, so that a later run from this host is judged on its own.
    for session_id in &opened {
        let _ = session.teardown(cli.request(pb::SessionRequest { session_id: session_id.clone() })).await;
    }
    let opened = opened.len();
    out.push(Attempt {
        attack: "200 sessions from one address",
        taken: opened >= 200,
        detail: format!("{opened} opened; then {last}"),
    });
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match attacks(&cli).await {
        Ok(attempts) => {
            for a in attempts {
                println!("{}", json!({"attack": a.attack, "taken": a.taken, "detail": a.detail}));
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("intruder: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
