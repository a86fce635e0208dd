//! `meshward observe`: the agent's flow events, filtered, as readable lines
//! or JSON (one object per line); `--follow` keeps streaming. From the
//! control socket on the node, or with `--server` over TCP from an agent's
//! `observeAddress`, presenting the token of `--token-file`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::agent::events::{self, FlowEvent, FlowType, Verdict};
use crate::agent::observe_tcp;
use crate::agent::protocol::{self, Observe};

/// How long one read of a non-following observe may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Take the control socket from the agent's configuration file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's control socket [default: the config's socketPath, else /run/meshward/agent.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Read from an agent's observeAddress over TCP instead of a control socket
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["config", "socket"], requires = "token_file")]
    server: Option<String>,
    /// The file holding the token of the agent's observeTokenFile (with --server)
    #[arg(long, value_name = "FILE", requires = "server")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// The filters and output options `observe` and `lab observe` share.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Either side in this namespace
    #[arg(long)]
    namespace: Option<String>,
    /// Either side is this pod (NAME or NAMESPACE/NAME)
    #[arg(long)]
    pod: Option<String>,
    /// The source is this pod (NAME or NAMESPACE/NAME)
    #[arg(long, value_name = "POD")]
    from_pod: Option<String>,
    /// The destination is this pod (NAME or NAMESPACE/NAME)
    #[arg(long, value_name = "POD")]
    to_pod: Option<String>,
    /// Only this verdict
    #[arg(long, value_enum)]
    verdict: Option<Verdict>,
    /// Only this kind of event
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    kind: Option<FlowType>,
    /// Only events of the last DURATION (e.g. 30s, 5m, 1h)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Keep streaming new events until interrupted
    #[arg(short, long)]
    pub follow: bool,
    /// Buffered events shown at most (the most recent)
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl FilterArgs {
    /// The control request.
    pub fn request(&self) -> Observe {
        Observe {
            filter: events::Filter {
                namespace: self.namespace.clone(),
                pod: self.pod.clone(),
                from_pod: self.from_pod.clone(),
                to_pod: self.to_pod.clone(),
                verdict: self.verdict,
                kind: self.kind,
                since: self.since.map(events::since),
            },
            follow: self.follow,
            limit: self.limit,
        }
    }
}

/// Writes one event; false when stdout is gone (e.g. `| head`).
pub fn print(event: &FlowEvent, format: Format, with_node: bool) -> bool {
    let line = match format {
        Format::Text => events::render_line(event, with_node),
        Format::Json => match serde_json::to_string(event) {
            Ok(l) => l,
            Err(_) => return true,
        },
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

pub fn run(args: ObserveArgs) -> Result<()> {
    let format = args.filter.output;
    if let (Some(server), Some(file)) = (&args.server, &args.token_file) {
        let token = observe_tcp::read_token(file).context("--token-file")?;
        observe_tcp::observe(server, &token, &args.filter.request(), READ_TIMEOUT, |e| {
            print(&e, format, false)
        })
        .context("observing flow events")?;
        return Ok(());
    }
    let socket = super::socket_path(args.socket.as_deref(), args.config.as_deref())?;
    protocol::observe(&socket, &args.filter.request(), READ_TIMEOUT, |e| {
        print(&e, format, false)
    })
    .context("observing flow events")?;
    Ok(())
}

/// Reads the events of several agents. Without follow: all of them,
/// merged in time order. With follow: as they arrive, until every agent's
/// stream ends.
pub fn observe_many(sockets: Vec<(String, PathBuf)>, filter: &FilterArgs) -> Result<()> {
    let request = filter.request();
    let format = filter.output;
    if !request.follow {
        let mut all = Vec::new();
        for (node, socket) in &sockets {
            protocol::observe(socket, &request, READ_TIMEOUT, |e| {
                all.push(e);
                true
            })
            .with_context(|| format!("observing the agent of {node}"))?;
        }
        all.sort_by_key(|e| e.time);
        for e in &all {
            if !print(e, format, true) {
                break;
            }
        }
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<FlowEvent, String>>(1024);
    for (node, socket) in sockets {
        let tx = tx.clone();
        let request = request.clone();
        std::thread::spawn(move || {
            let result =
                protocol::observe(&socket, &request, READ_TIMEOUT, |e| tx.send(Ok(e)).is_ok());
            if let Err(e) = result {
                let _ = tx.send(Err(format!("{node}: {e}")));
            }
        });
    }
    drop(tx);
    for item in rx {
        match item {
            Ok(e) => {
                if !print(&e, format, true) {
                    break;
                }
            }
            Err(e) => eprintln!("meshward: {e}"),
        }
    }
    Ok(())
}
