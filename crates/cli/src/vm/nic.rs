//! `vireo vm nic add|set|rm|list`: a VM's network adapters, each a port on a vireod switch
//! (`POST/PUT/DELETE /v1/vms/{vm}/nics[/{nic}]`). `set` changes the port's policy live on a
//! running VM; `add`/`rm` and `set --queues` (hardware, through the VM's spec) need it off.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use vireo_api::{MacAddr, NicPolicy, NicSpec, Vm};
use vireo_netconfig::{AclRule, Direction, MirrorRole, PvlanMode, RateLimit, VlanConfig};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::render;

#[derive(Subcommand)]
pub enum NicCommand {
    /// Add a NIC on a switch (the VM must be off); prints it with its name and MAC
    ///
    ///   vireo vm nic add web --switch lan --vlan 10
    ///   vireo vm nic add web --switch lan --trunk 10,20 --native 10 --name uplink
    #[command(verbatim_doc_comment)]
    Add(AddArgs),
    /// Change a NIC's port policy, applied live while the VM runs (unset options stay as they
    /// are), or its queue pairs with --queues (the VM must be off)
    Set(SetArgs),
    /// Remove a NIC and its switch port (the VM must be off).
    Rm {
        /// The VM's name or id.
        vm: String,
        /// The NIC's name (nic0, ...).
        nic: String,
    },
    /// List a VM's NICs: name, switch, MAC, VLAN.
    List {
        /// The VM's name or id.
        vm: String,
        /// text (a table) or json (the NicSpec array).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mirror {
    Source,
    Destination,
    None,
}

/// The port policy options `add` and `set` share.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// Access port on VLAN N (1-4094).
    #[arg(long, group = "vlan_mode", value_name = "N")]
    pub vlan: Option<u16>,
    /// Trunk port carrying these VLANs tagged (e.g. 10,20).
    #[arg(
        long,
        group = "vlan_mode",
        value_delimiter = ',',
        value_name = "VID,..."
    )]
    pub trunk: Option<Vec<u16>>,
    /// With --trunk: untagged frames belong to this VLAN.
    #[arg(long, requires = "trunk", value_name = "N")]
    pub native: Option<u16>,
    /// Private VLAN port: PRIMARY:SECONDARY:isolated|community|promiscuous.
    #[arg(long, group = "vlan_mode", value_parser = parse_pvlan, value_name = "P:S:MODE")]
    pub pvlan: Option<VlanConfig>,
    /// Allow frames with a source MAC other than the NIC's.
    #[arg(long, value_enum)]
    pub mac_spoofing: Option<OnOff>,
    /// Enforce --allow-ip on ARP and neighbor discovery.
    #[arg(long, value_enum)]
    pub arp_guard: Option<OnOff>,
    /// The addresses the guest may claim (with --arp-guard on).
    #[arg(long, value_delimiter = ',', value_name = "IP,...")]
    pub allow_ip: Option<Vec<IpAddr>>,
    /// on: the VM may not act as a DHCP server.
    #[arg(long, value_enum)]
    pub dhcp_guard: Option<OnOff>,
    /// on: the VM may not send router advertisements or redirects.
    #[arg(long, value_enum)]
    pub router_guard: Option<OnOff>,
    /// The port's ACL rules: a JSON file holding an array of rules (see docs/cli.md).
    #[arg(long, value_name = "FILE.json")]
    pub acl: Option<PathBuf>,
    /// Bandwidth limit of what the VM sends, bits per second (0: none).
    #[arg(long, value_name = "BITS")]
    pub max_bw: Option<u64>,
    /// Minimum bandwidth weight on a congested uplink.
    #[arg(long, value_name = "N")]
    pub min_weight: Option<u32>,
    /// Port mirroring role (source copies both directions).
    #[arg(long, value_enum)]
    pub mirror: Option<Mirror>,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The VM's name or id.
    pub vm: String,
    /// The switch the NIC's port goes on.
    #[arg(long)]
    pub switch: String,
    /// The NIC's name (default: the lowest free nicN).
    #[arg(long)]
    pub name: Option<String>,
    /// The NIC's MAC (default: a fresh locally administered one).
    #[arg(long)]
    pub mac: Option<MacAddr>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Multiqueue: virtio-net queue pairs, 1-4 (default 1); the guest turns on the extra ones
    /// and the switch spreads received flows over them.
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,
    /// Network virtualization: the virtual subnet (VSID) the NIC joins; the switch must have
    /// an overlay with it. Needs --ca.
    #[arg(long, value_name = "VSID", requires = "ca")]
    pub virtual_subnet: Option<u32>,
    /// The NIC's customer address in its virtual subnet (repeat or comma-separate for more).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "IP",
        requires = "virtual_subnet"
    )]
    pub ca: Vec<std::net::IpAddr>,
    /// text or json (the NicSpec as stored).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The VM's name or id.
    pub vm: String,
    /// The NIC's name (nic0, ...).
    pub nic: String,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Multiqueue: virtio-net queue pairs, 1-4. Hardware: only while the VM is off (not
    /// saved); the other options change the port live.
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,
    /// text or json (the NicSpec as stored).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

fn parse_pvlan(s: &str) -> Result<VlanConfig, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [p, sec, mode] = parts.as_slice() else {
        return Err(format!(
            "{s:?}: expected PRIMARY:SECONDARY:isolated|community|promiscuous"
        ));
    };
    let vid = |v: &str| {
        v.parse::<u16>()
            .map_err(|_| format!("{v:?} in {s:?} is not a VLAN id"))
    };
    let mode = match *mode {
        "isolated" => PvlanMode::Isolated,
        "community" => PvlanMode::Community,
        "promiscuous" => PvlanMode::Promiscuous,
        m => {
            return Err(format!(
                "{m:?}: the mode is isolated, community or promiscuous"
            ))
        }
    };
    Ok(VlanConfig::Private {
        primary: vid(p)?,
        secondary: vid(sec)?,
        mode,
    })
}

impl PolicyArgs {
    /// Applies the options given onto `p`; the others leave it as it is.
    pub fn apply(&self, p: &mut NicPolicy) -> Result<(), CliError> {
        if let Some(vid) = self.vlan {
            p.vlan = Some(VlanConfig::Access { vid });
        }
        if let Some(allowed) = &self.trunk {
            p.vlan = Some(VlanConfig::Trunk {
                allowed: allowed.clone(),
                native: self.native,
            });
        }
        if let Some(v) = &self.pvlan {
            p.vlan = Some(v.clone());
        }
        if let Some(v) = self.mac_spoofing {
            p.guard.mac_spoofing = v.on();
        }
        if let Some(v) = self.arp_guard {
            p.guard.arp_nd_guard = v.on();
        }
        if let Some(ips) = &self.allow_ip {
            p.guard.allowed_ipv4 = ips
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v) => Some(*v),
                    IpAddr::V6(_) => None,
                })
                .collect::<Vec<Ipv4Addr>>();
            p.guard.allowed_ipv6 = ips
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v) => Some(*v),
                    IpAddr::V4(_) => None,
                })
                .collect::<Vec<Ipv6Addr>>();
        }
        if let Some(v) = self.dhcp_guard {
            p.guard.dhcp_server_allowed = !v.on();
        }
        if let Some(v) = self.router_guard {
            p.guard.router_allowed = !v.on();
        }
        if let Some(file) = &self.acl {
            let text = std::fs::read(file)
                .map_err(|e| CliError::bad_input(format!("--acl {}: {e}", file.display())))?;
            p.acls = serde_json::from_slice::<Vec<AclRule>>(&text).map_err(|e| {
                CliError::bad_input(format!(
                    "--acl {}: not a JSON array of ACL rules: {e}",
                    file.display()
                ))
            })?;
        }
        if let Some(bits) = self.max_bw {
            p.qos.max_ingress = (bits > 0).then_some(RateLimit {
                bits_per_sec: bits,
                // A tenth of a second at the rate, at least one jumbo frame.
                burst_bytes: (bits / 80).max(9216),
            });
        }
        if let Some(w) = self.min_weight {
            p.qos.min_weight = w;
        }
        if let Some(m) = self.mirror {
            p.mirror = match m {
                Mirror::Source => MirrorRole::Source(Direction::Both),
                Mirror::Destination => MirrorRole::Destination,
                Mirror::None => MirrorRole::None,
            };
        }
        Ok(())
    }
}

fn nic_path(vm: &str, nic: &str) -> Result<String, CliError> {
    vireo_api::validate_name("NIC", nic).map_err(|e| {
        CliError::bad_input(format!(
            "{nic:?} is not a NIC name: {}; `vireo vm nic list VM` shows them",
            e.problem
        ))
    })?;
    Ok(format!("{}/nics/{nic}", super::path(vm)?))
}

/// The NIC's VLAN mode in a few words (`access 1`, `trunk 10,20 native 10`, `pvlan ...`).
pub(super) fn vlan_text(n: &NicSpec) -> String {
    match n.policy.vlan.as_ref() {
        Some(vlan) => vlan_config_text(vlan),
        None => format!("access {}", n.vlan.unwrap_or(1)),
    }
}

/// `, N queue pairs` for a multiqueue NIC, nothing for one pair (the default).
pub(super) fn pairs_text(n: &NicSpec) -> String {
    match n.queues {
        Some(q) if q > 1 => format!(", {q} queue pairs"),
        _ => String::new(),
    }
}

/// A port's VLAN mode in a few words, as `vm nic list` and `switch show` print it.
pub fn vlan_config_text(vlan: &VlanConfig) -> String {
    match vlan {
        VlanConfig::Access { vid } => format!("access {vid}"),
        VlanConfig::Trunk { allowed, native } => {
            let list: Vec<String> = allowed.iter().map(u16::to_string).collect();
            match native {
                Some(n) => format!("trunk {} native {n}", list.join(",")),
                None => format!("trunk {}", list.join(",")),
            }
        }
        VlanConfig::Private {
            primary,
            secondary,
            mode,
        } => format!("pvlan {primary}:{secondary}:{mode:?}").to_lowercase(),
    }
}

fn show(n: &NicSpec, output: OutputFormat, what: &str) -> String {
    match output {
        OutputFormat::Json => super::view::json(n),
        OutputFormat::Text => format!(
            "{what} NIC {} on switch {} (mac {}, {}{})\n",
            n.name.as_deref().unwrap_or("-"),
            n.switch,
            n.mac.map_or("-".into(), |m| m.to_string()),
            vlan_text(n),
            pairs_text(n)
        ),
    }
}

/// A change of the NIC's queue pairs (with any policy options) is a hardware change: it goes
/// through the VM's spec (`PUT /v1/vms/{vm}/spec`), which vireod refuses while the VM runs or
/// holds saved state (its guest saw the old pair count), and checkpoints first when set to.
fn set_hardware(
    client: &Client,
    mut vm: Vm,
    (i, nic): (usize, &str),
    policy: NicPolicy,
    queues: u16,
) -> Result<NicSpec, CliError> {
    let n = &mut vm.spec.nics[i];
    if policy.vlan.is_some() {
        n.vlan = None;
    }
    n.policy = policy;
    n.queues = Some(queues);
    let path = format!("{}/spec", super::path(&vm.id().to_string())?);
    let updated: Vm = client.put(&path, &vm.spec)?;
    updated.spec.nics.into_iter().nth(i).ok_or_else(|| {
        CliError::bad_input(format!(
            "vireod's answer has no NIC {nic:?}; `vireo vm nic list` shows them"
        ))
    })
}

pub fn execute(client: &Client, cmd: NicCommand) -> Result<(), CliError> {
    match cmd {
        NicCommand::Add(a) => {
            let mut policy = NicPolicy::default();
            a.policy.apply(&mut policy)?;
            let nic = NicSpec {
                switch: a.switch,
                name: a.name,
                mac: a.mac,
                vlan: None,
                policy,
                virtual_subnet: a
                    .virtual_subnet
                    .map(|vsid| vireo_api::NicVirtualSubnet { vsid, ca: a.ca }),
                queues: a.queues,
            };
            let path = format!("{}/nics", super::path(&a.vm)?);
            let added: NicSpec = client.post(&path, Some(&nic))?;
            emit(show(&added, a.output, "added"))
        }
        NicCommand::Set(a) => {
            let path = nic_path(&a.vm, &a.nic)?;
            let vm: Vm = client.get(&super::path(&a.vm)?)?;
            let Some(i) = vm
                .spec
                .nics
                .iter()
                .position(|n| n.name.as_deref() == Some(&a.nic))
            else {
                return Err(CliError::bad_input(format!(
                    "VM {} has no NIC {:?}; `vireo vm nic list {}` shows them",
                    a.vm, a.nic, a.vm
                )));
            };
            let current = &vm.spec.nics[i];
            let mut policy = current.policy.clone();
            if policy.vlan.is_none() {
                if let Some(vid) = current.vlan {
                    policy.vlan = Some(VlanConfig::Access { vid });
                }
            }
            a.policy.apply(&mut policy)?;
            let set = match a.queues {
                None => client.put(&path, &policy)?,
                Some(q) => set_hardware(client, vm, (i, &a.nic), policy, q)?,
            };
            emit(show(&set, a.output, "set"))
        }
        NicCommand::Rm { vm, nic } => {
            client.delete(&nic_path(&vm, &nic)?)?;
            emit(format!("removed NIC {nic} of VM {vm}\n"))
        }
        NicCommand::List { vm, output } => {
            let v: Vm = client.get(&super::path(&vm)?)?;
            match output {
                OutputFormat::Json => emit(super::view::json(&v.spec.nics)),
                OutputFormat::Text => {
                    let rows: Vec<Vec<String>> = v
                        .spec
                        .nics
                        .iter()
                        .map(|n| {
                            vec![
                                n.name.clone().unwrap_or_default(),
                                n.switch.clone(),
                                n.mac.map_or("-".into(), |m| m.to_string()),
                                vlan_text(n),
                                n.queues.unwrap_or(1).to_string(),
                            ]
                        })
                        .collect();
                    emit(render(&["NIC", "SWITCH", "MAC", "VLAN", "QUEUES"], &rows))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvlan_and_options_parse() {
        assert_eq!(
            parse_pvlan("100:101:isolated").unwrap(),
            VlanConfig::Private {
                primary: 100,
                secondary: 101,
                mode: PvlanMode::Isolated
            }
        );
        assert!(parse_pvlan("100:101").is_err());
        assert!(parse_pvlan("100:x:isolated").is_err());
        assert!(parse_pvlan("100:101:open").is_err());
    }
}
