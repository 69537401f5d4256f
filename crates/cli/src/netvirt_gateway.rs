//! `vireo netvirt gateway ...`: a switch's overlay gateways (`/v1/switches/{sw}/gateways`,
//! `docs/netvirt.md` "Gateway") — routing domains forwarded or NAT-ed to a physical network
//! on the switch's uplink, as Hyper-V's Windows Server Gateway does.

use std::error::Error;
use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use vireo_netconfig::{GatewayConfig, GatewayMode, GatewayStatus, IpPrefix, MacAddr, NatSettings};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::render;
use crate::vm::view::json;

#[derive(Subcommand)]
pub enum GatewayCommand {
    /// Add a gateway (refused if the name is taken)
    ///
    ///   vireo netvirt gateway add nv out --mode nat --domain red --domain blue \
    ///       --address 198.51.100.1/24 --vlan 30 --next-hop 198.51.100.254
    ///   vireo netvirt gateway add nv fwd --mode forward --domain green --address 203.0.113.1/24
    ///   vireo netvirt gateway add nv fwd6 --mode forward --domain green --address 203.0.113.2/24 \
    ///       --address6 2001:db8:30::1/64 --next-hop6 fe80::1
    #[command(verbatim_doc_comment)]
    Add(GatewayArgs),
    /// Replace the gateway of that name (a changed gateway's NAT connections end).
    Set(GatewayArgs),
    /// Remove a gateway (its NAT connections end).
    Rm {
        /// The switch's name or id.
        switch: String,
        /// The gateway's name.
        name: String,
    },
    /// The gateways, with their NAT connections in json.
    List {
        /// The switch's name or id.
        switch: String,
        /// text (a table) or json (the API's gateway status, connections included).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Route the CAs as they are (one routing domain).
    Forward,
    /// Source NAT to the gateway's address (one or more routing domains).
    Nat,
}

#[derive(Args)]
pub struct GatewayArgs {
    /// The switch's name or id.
    pub switch: String,
    /// The gateway's name.
    pub name: String,
    #[arg(long, value_enum, default_value = "nat")]
    pub mode: ModeArg,
    /// A routing domain it serves (repeat for several; exactly one for forward).
    #[arg(long = "domain", required = true)]
    pub domains: Vec<String>,
    /// Its IPv4 address with the physical network's prefix, e.g. 198.51.100.1/24.
    #[arg(long)]
    pub address: IpPrefix,
    /// The physical network's VLAN on the uplink (untagged without).
    #[arg(long)]
    pub vlan: Option<u16>,
    /// Router for destinations outside the prefix.
    #[arg(long)]
    pub next_hop: Option<IpAddr>,
    /// Its MAC (default 02:fe: + the address's bytes).
    #[arg(long)]
    pub mac: Option<MacAddr>,
    /// Forward only: also route the domain's IPv6 CAs, from this IPv6 address with the
    /// physical network's prefix, e.g. 2001:db8:30::1/64 (next hops resolved by ND).
    #[arg(long)]
    pub address6: Option<IpPrefix>,
    /// IPv6 router for destinations outside --address6's prefix (on it, or link-local).
    #[arg(long)]
    pub next_hop6: Option<IpAddr>,
    /// NAT: connections remembered at most.
    #[arg(long, default_value_t = NatSettings::default().max_connections)]
    pub max_connections: u32,
    /// text or json (the gateway as stored).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

impl GatewayArgs {
    fn config(&self) -> GatewayConfig {
        GatewayConfig {
            name: self.name.clone(),
            mode: match self.mode {
                ModeArg::Forward => GatewayMode::Forward,
                ModeArg::Nat => GatewayMode::Nat,
            },
            routing_domains: self.domains.clone(),
            vlan: self.vlan,
            address: self.address,
            next_hop: self.next_hop,
            mac: self.mac,
            address6: self.address6,
            next_hop6: self.next_hop6,
            nat: NatSettings {
                max_connections: self.max_connections,
                ..NatSettings::default()
            },
        }
    }
}

fn gateways_path(sw: &str) -> Result<String, CliError> {
    vireo_api::validate_name("switch", sw).map_err(|e| {
        CliError::bad_input(format!(
            "{sw:?} is not a switch name or id: {}; `vireo switch list` shows the switches",
            e.problem
        ))
    })?;
    Ok(format!("/v1/switches/{sw}/gateways"))
}

fn gateway_path(sw: &str, name: &str) -> Result<String, CliError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(CliError::bad_input(format!(
            "gateway name {name:?} must be letters, digits, '-' or '_'"
        )));
    }
    Ok(format!("{}/{name}", gateways_path(sw)?))
}

fn gateway_text(verb: &str, g: &GatewayConfig, sw: &str) -> String {
    format!(
        "{verb} gateway {} on switch {sw}: {} {} for {} at {}{}{}\n",
        g.name,
        g.mode,
        g.vlan.map_or("untagged".into(), |v| format!("VLAN {v}")),
        g.routing_domains.join(","),
        g.address,
        g.next_hop.map_or(String::new(), |h| format!(" via {h}")),
        g.address6.map_or(String::new(), |a| format!(
            " and {a}{}",
            g.next_hop6.map_or(String::new(), |h| format!(" via {h}"))
        ))
    )
}

/// The IPv4 and IPv6 next hops, comma-separated; `-` for neither (an on-link peer).
fn next_hops(g: &GatewayConfig) -> String {
    let hops: Vec<String> = [g.next_hop, g.next_hop6]
        .into_iter()
        .flatten()
        .map(|h| h.to_string())
        .collect();
    if hops.is_empty() {
        "-".into()
    } else {
        hops.join(",")
    }
}

fn table_text(all: &[GatewayStatus]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let g = &s.config;
            vec![
                g.name.clone(),
                g.mode.to_string(),
                g.routing_domains.join(","),
                g.vlan.map_or("-".into(), |v| v.to_string()),
                std::iter::once(g.address.to_string())
                    .chain(g.address6.map(|a| a.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                next_hops(g),
                s.mac.to_string(),
                s.connections.len().to_string(),
            ]
        })
        .collect();
    render(
        &[
            "NAME",
            "MODE",
            "DOMAINS",
            "VLAN",
            "ADDRESS",
            "NEXT_HOP",
            "MAC",
            "CONNECTIONS",
        ],
        &rows,
    )
}

pub fn execute(client: &Client, cmd: GatewayCommand) -> Result<ExitCode, Box<dyn Error>> {
    match cmd {
        GatewayCommand::Add(a) => {
            let g: GatewayConfig = client.post(&gateways_path(&a.switch)?, Some(&a.config()))?;
            match a.output {
                OutputFormat::Json => emit(json(&g))?,
                OutputFormat::Text => emit(gateway_text("added", &g, &a.switch))?,
            }
        }
        GatewayCommand::Set(a) => {
            let g: GatewayConfig = client.put(&gateway_path(&a.switch, &a.name)?, &a.config())?;
            match a.output {
                OutputFormat::Json => emit(json(&g))?,
                OutputFormat::Text => emit(gateway_text("set", &g, &a.switch))?,
            }
        }
        GatewayCommand::Rm { switch, name } => {
            client.delete(&gateway_path(&switch, &name)?)?;
            emit(format!("removed gateway {name} from switch {switch}\n"))?;
        }
        GatewayCommand::List { switch, output } => {
            let all: Vec<GatewayStatus> = client.get(&gateways_path(&switch)?)?;
            match output {
                OutputFormat::Json => emit(json(&all))?,
                OutputFormat::Text => emit(table_text(&all))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
