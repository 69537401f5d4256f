//! `vireo switch ...`: vireod's virtual switches (`/v1/switches`): create, list, show, rm,
//! host interfaces as ports (`port add|set|rm`), and resetting the port meters.

use std::error::Error;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use vireo_api::switch::SwitchSpec;
use vireo_api::switch_rest::SwitchInfo;
use vireo_netconfig::{PortConfig, PortRole, SwitchKind, UplinkBinding, VlanConfig};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::{render, utc};
use crate::vm::view::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kind {
    /// VMs only.
    Private,
    /// VMs and the host (a TAP interface, --host-iface).
    Internal,
    /// Bound to a host interface (--uplink), optionally with a host TAP (--host-iface).
    External,
}

#[derive(Subcommand)]
pub enum SwitchCommand {
    /// Create a switch and start its process
    ///
    ///   vireo switch create lan --type private
    ///   vireo switch create hostnet --type internal --host-iface vireo-lan0
    ///   vireo switch create wan --type external --uplink eth1
    ///   vireo switch create wan --type external --team eth1,eth2 --team-mode lacp
    ///   vireo switch create nv --type external --team eth1 --overlay-pa 192.0.2.1 \
    ///       --virtual-subnet red:5001=10.0.0.0/24@10.0.0.1 --encap vxlan
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// List the switches: name, type, process, NICs, id.
    List {
        /// text (a table) or json (the API's switch objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Show a switch: its process and every port with its meters.
    Show {
        /// The switch's name or id.
        switch: String,
        /// text or json (the API's switch object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Remove a switch (refused while VMs have NICs on it) and stop its process.
    Rm {
        /// The switch's name or id.
        switch: String,
    },
    /// Host interfaces (veth, TAP, NIC) as ports of a switch.
    #[command(subcommand)]
    Port(PortCommand),
    /// Make the switch's uplink a mirror source or destination; on a switch with an overlay,
    /// choose whether its copies show the tunnel packets (outer) or the customer frames in
    /// them (inner). Destinations: VM NICs with --mirror destination, or interface ports.
    ///
    ///   vireo switch mirror nv --role source --overlay inner
    ///   vireo switch mirror nv --role source --direction egress --overlay outer
    ///   vireo switch mirror nv --role none
    #[command(verbatim_doc_comment)]
    Mirror(crate::switch_mirror::MirrorArgs),
    /// Zero the meters of every port of the switch.
    ResetMeters {
        /// The switch's name or id.
        switch: String,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The switch's name.
    pub name: String,
    #[arg(long = "type", value_enum)]
    pub kind: Kind,
    /// External: the host interface the switch is bound to.
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
    /// Internal (required) / external (optional): the host's TAP interface on the switch.
    #[arg(long, value_name = "NAME")]
    pub host_iface: Option<String>,
    #[command(flatten)]
    pub team: crate::switch_team::TeamArgs,
    #[command(flatten)]
    pub overlay: crate::switch_team::OverlayArgs,
    /// text or json.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Subcommand)]
pub enum PortCommand {
    /// Add a host interface as a port (access VLAN --vlan, or a trunk with several --vlan)
    ///
    ///   vireo switch port add lan --iface veth-a --vlan 10
    #[command(verbatim_doc_comment)]
    Add(PortArgs),
    /// Change an interface port's VLANs, live.
    Set(PortArgs),
    /// Remove an interface port.
    Rm {
        /// The switch's name or id.
        switch: String,
        /// The interface's name.
        #[arg(long)]
        iface: String,
    },
}

#[derive(Args)]
pub struct PortArgs {
    /// The switch's name or id.
    pub switch: String,
    /// The host interface's name.
    #[arg(long)]
    pub iface: String,
    /// One: an access port on that VLAN; several: a trunk carrying them (default access 1).
    #[arg(long, value_delimiter = ',', value_name = "N")]
    pub vlan: Vec<u16>,
}

impl PortArgs {
    fn config(&self) -> PortConfig {
        let vlan = match self.vlan.as_slice() {
            [] => VlanConfig::Access { vid: 1 },
            [vid] => VlanConfig::Access { vid: *vid },
            many => VlanConfig::Trunk {
                allowed: many.to_vec(),
                native: None,
            },
        };
        PortConfig {
            name: self.iface.clone(),
            role: PortRole::Host,
            vlan,
            ..PortConfig::default()
        }
    }
}

/// `/v1/switches/{sw}` for a name or id given on the command line.
fn path(sw: &str) -> Result<String, CliError> {
    vireo_api::validate_name("switch", sw).map_err(|e| {
        CliError::bad_input(format!(
            "{sw:?} is not a switch name or id: {}; `vireo switch list` shows the switches",
            e.problem
        ))
    })?;
    Ok(format!("/v1/switches/{sw}"))
}

fn iface_path(sw: &str, iface: &str) -> Result<String, CliError> {
    if iface.is_empty() || iface.contains('/') || iface.len() > 15 {
        return Err(CliError::bad_input(format!(
            "{iface:?} is not a host interface name (1-15 bytes, no '/')"
        )));
    }
    Ok(format!("{}/ports/{iface}", path(sw)?))
}

fn kind_name(s: &SwitchSpec) -> String {
    if let Some(t) = &s.team {
        let host = match &s.kind {
            SwitchKind::Internal { host_interface } => format!(", host {host_interface}"),
            _ => String::new(),
        };
        return format!("external (team {}{host})", t.members.join(","));
    }
    match &s.kind {
        SwitchKind::Private => "private".into(),
        SwitchKind::Internal { host_interface } => format!("internal ({host_interface})"),
        SwitchKind::External { interface, .. } => format!("external ({interface})"),
    }
}

fn process_text(s: &SwitchInfo) -> String {
    match (&s.process.pid, &s.process.error) {
        (Some(pid), _) if s.process.running => format!("running (pid {pid})"),
        (_, Some(e)) => format!("down: {e}"),
        _ => "down".into(),
    }
}

fn list_text(switches: &[SwitchInfo]) -> String {
    let rows: Vec<Vec<String>> = switches
        .iter()
        .map(|s| {
            vec![
                s.spec.name.clone(),
                kind_name(&s.spec),
                process_text(s),
                s.nics.len().to_string(),
                s.id.to_string(),
            ]
        })
        .collect();
    render(&["NAME", "TYPE", "PROCESS", "NICS", "ID"], &rows)
}

fn show_text(s: &SwitchInfo) -> String {
    let mut out = format!(
        "name:     {}\nid:       {}\ntype:     {}\nprocess:  {} (restarts {})\ncreated:  {}\n",
        s.spec.name,
        s.id,
        kind_name(&s.spec),
        process_text(s),
        s.process.restarts,
        utc(s.created_at)
    );
    let vm_of = |port: &str| {
        s.nics
            .iter()
            .find(|n| n.port == port)
            .map(|n| format!("{}/{}", n.vm, n.nic))
    };
    let rows: Vec<Vec<String>> = s
        .ports
        .iter()
        .map(|p| {
            let m = &p.meters;
            vec![
                vm_of(&p.config.name).unwrap_or_else(|| p.config.name.clone()),
                crate::vm::nic::vlan_config_text(&p.config.vlan),
                if p.connected { "yes" } else { "no" }.into(),
                format!("{}/{}", m.packets_in, m.bytes_in),
                format!("{}/{}", m.packets_out, m.bytes_out),
                m.drops.values().sum::<u64>().to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&render(
            &[
                "PORT",
                "VLAN",
                "CONNECTED",
                "IN_PKTS/BYTES",
                "OUT_PKTS/BYTES",
                "DROPS",
            ],
            &rows,
        ));
    }
    out.push_str(&crate::switch_mirror::show_line(
        s.spec.uplink_mirror.as_ref(),
    ));
    out.push_str(&crate::switch_team::team_text(s));
    out.push_str(&crate::switch_team::overlay_text(s));
    out
}

pub fn execute(client: &Client, cmd: SwitchCommand) -> Result<ExitCode, Box<dyn Error>> {
    match cmd {
        SwitchCommand::Create(a) => {
            let team = a.team.config()?;
            let kind =
                match (a.kind, a.uplink, a.host_iface) {
                    // A team is the uplink: the switch is stored as private (or internal, with a
                    // host interface) plus its team.
                    (Kind::External, None, h) if team.is_some() => match h {
                        None => SwitchKind::Private,
                        Some(h) => SwitchKind::Internal { host_interface: h },
                    },
                    (_, _, _) if team.is_some() => return Err(CliError::bad_input(
                        "--team makes the uplink: use it with --type external and without --uplink",
                    )
                    .into()),
                    (Kind::Private, None, None) => SwitchKind::Private,
                    (Kind::Internal, None, Some(h)) => SwitchKind::Internal { host_interface: h },
                    (Kind::External, Some(u), h) => SwitchKind::External {
                        interface: u,
                        binding: UplinkBinding::AfPacket,
                        host_interface: h,
                    },
                    (Kind::Private, ..) => {
                        return Err(CliError::bad_input(
                            "a private switch takes neither --uplink nor --host-iface",
                        )
                        .into())
                    }
                    (Kind::Internal, ..) => {
                        return Err(CliError::bad_input(
                            "an internal switch needs --host-iface NAME (and no --uplink)",
                        )
                        .into())
                    }
                    (Kind::External, None, _) => {
                        return Err(CliError::bad_input(
                            "an external switch needs --uplink IFACE or --team IFACE,IFACE",
                        )
                        .into())
                    }
                };
            let spec = SwitchSpec {
                name: a.name,
                kind,
                pvlan_domains: vec![],
                mac_aging_secs: None,
                mac_table_limit: None,
                port_mac_limit: None,
                fast_path: None,
                team,
                overlay: a.overlay.config()?,
                uplink_mirror: None,
            };
            let s: SwitchInfo = client.post("/v1/switches", Some(&spec))?;
            match a.output {
                OutputFormat::Json => emit(json(&s))?,
                OutputFormat::Text => emit(format!(
                    "created switch {} ({}), process {}\n",
                    s.spec.name,
                    s.id,
                    process_text(&s)
                ))?,
            }
        }
        SwitchCommand::List { output } => {
            let all: Vec<SwitchInfo> = client.get("/v1/switches")?;
            match output {
                OutputFormat::Json => emit(json(&all))?,
                OutputFormat::Text => emit(list_text(&all))?,
            }
        }
        SwitchCommand::Show { switch, output } => {
            let s: SwitchInfo = client.get(&path(&switch)?)?;
            match output {
                OutputFormat::Json => emit(json(&s))?,
                OutputFormat::Text => emit(show_text(&s))?,
            }
        }
        SwitchCommand::Rm { switch } => {
            client.delete(&path(&switch)?)?;
            emit(format!("removed switch {switch}\n"))?;
        }
        SwitchCommand::Port(PortCommand::Add(a)) => {
            let _: PortConfig =
                client.post(&format!("{}/ports", path(&a.switch)?), Some(&a.config()))?;
            emit(format!("added port {} to switch {}\n", a.iface, a.switch))?;
        }
        SwitchCommand::Port(PortCommand::Set(a)) => {
            let _: PortConfig = client.put(&iface_path(&a.switch, &a.iface)?, &a.config())?;
            emit(format!("set port {} of switch {}\n", a.iface, a.switch))?;
        }
        SwitchCommand::Port(PortCommand::Rm { switch, iface }) => {
            client.delete(&iface_path(&switch, &iface)?)?;
            emit(format!("removed port {iface} from switch {switch}\n"))?;
        }
        SwitchCommand::Mirror(a) => {
            let path = format!("{}/uplink/mirror", path(&a.switch)?);
            let m: vireo_api::switch::UplinkMirror = client.put(&path, &a.mirror())?;
            emit(a.done_text(&m))?;
        }
        SwitchCommand::ResetMeters { switch } => {
            let path = format!("{}/meters/reset", path(&switch)?);
            client.post_no_content(&path)?;
            emit(format!("reset the meters of switch {switch}\n"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
