//! `meshward agent --check`: parse and validate the configuration exactly as
//! the agent would, print the result, start nothing.

use std::io::Write;

use anyhow::{Context, Result};

use crate::config::{AgentArgs, Config};

pub fn run(args: &AgentArgs) -> Result<()> {
    let config = Config::load(args)?;
    // as the agent does at start-up (the token itself is never printed)
    if let Some(tcp) = &config.observe_tcp {
        crate::agent::observe_tcp::read_token(&tcp.token_file).context("observeTokenFile")?;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(summary(&config).as_bytes())
        .context("writing to stdout")
}

/// The effective configuration, one `key: value` line each, keys as in the
/// file.
fn summary(c: &Config) -> String {
    let rotation = c
        .key_rotation_interval
        .map(|d| humantime::format_duration(d).to_string())
        .unwrap_or_else(|| "off".into());
    [
        ("nodeName", c.node_name.clone()),
        ("stateDir", c.state_dir.display().to_string()),
        ("datastore", c.datastore.to_string()),
        ("endpoint", c.endpoint.to_string()),
        ("listenPort", c.listen_port.to_string()),
        ("underlayMTU", c.underlay_mtu.to_string()),
        ("mtu", c.mtu.to_string()),
        ("keyRotationInterval", rotation),
        ("mesh", c.mesh.to_string()),
        ("strictMode", c.strict_mode.to_string()),
        ("socketPath", c.socket_path.display().to_string()),
        ("clusterCIDR", c.cluster_cidr.to_string()),
        ("healthAddress", c.health_address.to_string()),
        (
            "dnsSocketKeeper",
            format!("{:?}", c.policy.dns_socket_keeper).to_lowercase(),
        ),
        ("flowEvents", c.flow_events.to_string()),
        (
            "dnsAnswerCacheEntries",
            c.policy.dns_answer_cache_entries.to_string(),
        ),
    ]
    .into_iter()
    .chain(c.observe_tcp.iter().flat_map(|tcp| {
        [
            ("observeAddress", tcp.address.to_string()),
            ("observeTokenFile", tcp.token_file.display().to_string()),
        ]
    }))
    .map(|(k, v)| format!("{k}: {v}\n"))
    .collect()
}
