//! `vireo netvirt policy ...`: a switch's network-virtualization policy table
//! (`/v1/switches/{sw}/policies`), as Hyper-V's `New-/Set-/Remove-/Get-NetVirtualization
//! LookupRecord`: where each remote VM's customer address (CA) lives — its MAC, virtual subnet
//! and the provider address (PA) of its host. Local VMs' entries come from their NICs
//! (`vireo vm nic add --virtual-subnet --ca`).

use std::error::Error;
use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vireo_netconfig::{MacAddr, PolicyEntry};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::render;
use crate::vm::view::json;

#[derive(Subcommand)]
pub enum NetvirtCommand {
    /// The policy table of a switch with an overlay.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Gateways from routing domains to a physical network on the uplink (forward or NAT).
    #[command(subcommand)]
    Gateway(crate::netvirt_gateway::GatewayCommand),
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Add the entry of a remote VM's customer address (refused if the CA has one)
    ///
    ///   vireo netvirt policy add nv --domain red --ca 10.0.0.7 --mac 02:00:00:00:00:07 \
    ///       --vsid 5001 --pa 192.0.2.2
    #[command(verbatim_doc_comment)]
    Add(EntryArgs),
    /// Replace a CA's entry, e.g. with the new PA of a VM that moved to another host.
    Set(EntryArgs),
    /// Remove a CA's entry.
    Rm {
        /// The switch's name or id.
        switch: String,
        /// The routing domain.
        #[arg(long)]
        domain: String,
        /// The customer address.
        #[arg(long)]
        ca: IpAddr,
    },
    /// The table: remote entries and those of this host's VM NICs.
    List {
        /// The switch's name or id.
        switch: String,
        /// text (a table) or json (the API's policy entries).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

#[derive(Args)]
pub struct EntryArgs {
    /// The switch's name or id.
    pub switch: String,
    /// The routing domain (tenant) the CA belongs to.
    #[arg(long)]
    pub domain: String,
    /// The VM's customer address.
    #[arg(long)]
    pub ca: IpAddr,
    /// The VM's MAC.
    #[arg(long)]
    pub mac: MacAddr,
    /// The VM's virtual subnet (1 to 16777215).
    #[arg(long)]
    pub vsid: u32,
    /// The provider address of the host the VM runs on.
    #[arg(long)]
    pub pa: IpAddr,
    /// text or json (the entry as stored).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

impl EntryArgs {
    fn entry(&self) -> PolicyEntry {
        PolicyEntry {
            routing_domain: self.domain.clone(),
            ca: self.ca,
            mac: self.mac,
            vsid: self.vsid,
            pa: self.pa,
        }
    }
}

fn policies_path(sw: &str) -> Result<String, CliError> {
    vireo_api::validate_name("switch", sw).map_err(|e| {
        CliError::bad_input(format!(
            "{sw:?} is not a switch name or id: {}; `vireo switch list` shows the switches",
            e.problem
        ))
    })?;
    Ok(format!("/v1/switches/{sw}/policies"))
}

/// `/v1/switches/{sw}/policies/{domain}/{ca}`; a domain name that cannot be a path segment is
/// refused here rather than sent mangled.
fn entry_path(sw: &str, domain: &str, ca: IpAddr) -> Result<String, CliError> {
    if domain.is_empty()
        || domain
            .chars()
            .any(|c| c.is_whitespace() || "/?#%".contains(c))
    {
        return Err(CliError::bad_input(format!(
            "routing domain {domain:?} cannot be named in a request path (no spaces, '/', '?', '#' or '%')"
        )));
    }
    Ok(format!("{}/{domain}/{ca}", policies_path(sw)?))
}

fn entry_text(verb: &str, e: &PolicyEntry, sw: &str) -> String {
    format!(
        "{verb} CA {} of routing domain {} on switch {sw}: MAC {}, VSID {}, PA {}\n",
        e.ca, e.routing_domain, e.mac, e.vsid, e.pa
    )
}

fn table_text(entries: &[PolicyEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.routing_domain.clone(),
                e.ca.to_string(),
                e.mac.to_string(),
                e.vsid.to_string(),
                e.pa.to_string(),
            ]
        })
        .collect();
    render(&["ROUTING_DOMAIN", "CA", "MAC", "VSID", "PA"], &rows)
}

pub fn execute(client: &Client, cmd: NetvirtCommand) -> Result<ExitCode, Box<dyn Error>> {
    let cmd = match cmd {
        NetvirtCommand::Policy(c) => c,
        NetvirtCommand::Gateway(c) => return crate::netvirt_gateway::execute(client, c),
    };
    match cmd {
        PolicyCommand::Add(a) => {
            let e: PolicyEntry = client.post(&policies_path(&a.switch)?, Some(&a.entry()))?;
            match a.output {
                OutputFormat::Json => emit(json(&e))?,
                OutputFormat::Text => emit(entry_text("added", &e, &a.switch))?,
            }
        }
        PolicyCommand::Set(a) => {
            let path = entry_path(&a.switch, &a.domain, a.ca)?;
            let e: PolicyEntry = client.put(&path, &a.entry())?;
            match a.output {
                OutputFormat::Json => emit(json(&e))?,
                OutputFormat::Text => emit(entry_text("set", &e, &a.switch))?,
            }
        }
        PolicyCommand::Rm { switch, domain, ca } => {
            client.delete(&entry_path(&switch, &domain, ca)?)?;
            emit(format!(
                "removed the entry of CA {ca} in routing domain {domain} from switch {switch}\n"
            ))?;
        }
        PolicyCommand::List { switch, output } => {
            let all: Vec<PolicyEntry> = client.get(&policies_path(&switch)?)?;
            match output {
                OutputFormat::Json => emit(json(&all))?,
                OutputFormat::Text => emit(table_text(&all))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
