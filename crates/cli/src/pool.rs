//! `vireo pool ...`: resource pools (Hyper-V's resource pools) through vireod — create, list,
//! show, rm, add and remove a VM, and the pool's metering report (`metrics`, the sum of its
//! members' reports; `pool/metrics.rs` prints it).

mod metrics;

use std::error::Error;
use std::process::ExitCode;

use clap::Subcommand;
use vireo_api::{AddPoolMemberRequest, CreatePoolRequest, Pool};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::{render, utc};
use crate::vm::view::json;

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Create an empty resource pool
    ///
    ///   vireo pool create tenant-a
    ///   vireo pool add tenant-a web
    ///   vireo vm create db --kernel vmlinux --pool tenant-a
    #[command(verbatim_doc_comment)]
    Create {
        /// The pool's name: 1-64 letters, digits, '.', '_' or '-' (not starting with '.').
        name: String,
        /// text or json (the API's pool object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// List the pools (sorted by name): name, number of VMs, id, members.
    List {
        /// Only the pool this VM (name or id) is in.
        #[arg(long)]
        vm: Option<String>,
        /// text (a table) or json (an array of the API's pool objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Show one pool and its VMs.
    Show {
        /// The pool's name or id.
        pool: String,
        /// text or json (the API's pool object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Delete a pool; one that still has VMs only with --force (the VMs stay, in no pool).
    Rm {
        /// The pool's name or id.
        pool: String,
        /// Delete it even if it has VMs (they are not touched).
        #[arg(long)]
        force: bool,
    },
    /// Put a VM into the pool (a VM is in one pool at most: remove it from the other first).
    Add {
        /// The pool's name or id.
        pool: String,
        /// The VM's name or id.
        vm: String,
    },
    /// Take a VM out of the pool.
    Remove {
        /// The pool's name or id.
        pool: String,
        /// The VM's name or id.
        vm: String,
    },
    /// Resource metering of the pool (Measure-VMResourcePool): the sum of its VMs' current
    /// periods, and each VM's share
    ///
    /// Metering is enabled, disabled and reset per VM (`vireo vm metrics VM --enable`).
    ///   vireo pool metrics tenant-a
    ///   vireo pool metrics tenant-a --output json
    #[command(verbatim_doc_comment)]
    Metrics {
        /// The pool's name or id.
        pool: String,
        /// text, or json (the API's PoolMetrics object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

pub fn execute(client: &Client, command: PoolCommand) -> Result<ExitCode, Box<dyn Error>> {
    match command {
        PoolCommand::Create { name, output } => {
            vireo_api::validate_name("name", &name)
                .map_err(|e| CliError::bad_input(format!("pool {e}")))?;
            let pool: Pool = client.post("/v1/pools", Some(&CreatePoolRequest { name }))?;
            emit(show(&pool, output))?;
        }
        PoolCommand::List { vm, output } => {
            let path = match &vm {
                Some(vm) => format!("/v1/pools?vm={}", vm_key(vm)?),
                None => "/v1/pools".to_string(),
            };
            let pools: Vec<Pool> = client.get(&path)?;
            emit(list(&pools, output))?;
        }
        PoolCommand::Show { pool, output } => {
            let pool: Pool = client.get(&path(&pool)?)?;
            emit(show(&pool, output))?;
        }
        PoolCommand::Rm { pool, force } => {
            client.delete(&format!("{}?force={force}", path(&pool)?))?;
            emit(format!("removed pool {pool} (its VMs, if any, stay)\n"))?;
        }
        PoolCommand::Add { pool, vm } => {
            let body = AddPoolMemberRequest { vm: vm_key(&vm)? };
            let p: Pool = client.post(&format!("{}/vms", path(&pool)?), Some(&body))?;
            emit(format!(
                "VM {vm} is in pool {} ({} VMs)\n",
                p.name,
                p.vms.len()
            ))?;
        }
        PoolCommand::Remove { pool, vm } => {
            let route = format!("{}/vms/{}", path(&pool)?, vm_key(&vm)?);
            client.delete(&route)?;
            emit(format!("VM {vm} left pool {pool}\n"))?;
        }
        PoolCommand::Metrics { pool, output } => metrics::execute(client, &path(&pool)?, output)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `/v1/pools/{pool}` for a name or id; anything else is refused before any request.
fn path(pool: &str) -> Result<String, CliError> {
    vireo_api::validate_name("pool", pool).map_err(|e| {
        CliError::bad_input(format!(
            "{pool:?} is not a pool name or id: {}; `vireo pool list` shows the pools",
            e.problem
        ))
    })?;
    Ok(format!("/v1/pools/{pool}"))
}

/// A VM name or id, checked as `vm` commands check it.
fn vm_key(vm: &str) -> Result<String, CliError> {
    crate::vm::path(vm)?;
    Ok(vm.to_owned())
}

fn members(pool: &Pool) -> String {
    if pool.vms.is_empty() {
        return "-".into();
    }
    let names: Vec<&str> = pool.vms.iter().map(|m| m.name.as_str()).collect();
    names.join(",")
}

/// `pool list`: NAME VMS ID MEMBERS.
fn list(pools: &[Pool], output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(&pools);
    }
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.vms.len().to_string(),
                p.id.to_string(),
                members(p),
            ]
        })
        .collect();
    render(&["NAME", "VMS", "ID", "MEMBERS"], &rows)
}

/// `pool show` (and after create).
fn show(pool: &Pool, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(pool);
    }
    let mut out = format!(
        "name:    {}\nid:      {}\ncreated: {}\nvms:     {}\n",
        pool.name,
        pool.id,
        utc(pool.created_at),
        pool.vms.len()
    );
    for m in &pool.vms {
        out.push_str(&format!("  {}  {}\n", m.name, m.id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use vireo_api::PoolMember;

    fn pool(name: &str, vms: &[&str]) -> Pool {
        Pool {
            id: Uuid::nil(),
            name: name.into(),
            created_at: 0,
            vms: vms
                .iter()
                .map(|n| PoolMember {
                    id: Uuid::nil(),
                    name: (*n).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn list_and_show_text() {
        let text = list(
            &[pool("a", &["web", "db"]), pool("empty", &[])],
            OutputFormat::Text,
        );
        let nil = Uuid::nil();
        assert_eq!(
            text,
            format!(
                "NAME   VMS  ID{}MEMBERS\na      2    {nil}  web,db\nempty  0    {nil}  -\n",
                " ".repeat(36)
            )
        );
        let text = show(&pool("a", &["web"]), OutputFormat::Text);
        assert!(text.contains("vms:     1\n  web  "), "{text}");
        assert!(text.contains("created: 1970-01-01 00:00:00 UTC"), "{text}");
    }

    #[test]
    fn bad_keys_are_refused_before_any_request() {
        assert_eq!(path("tenant-a").unwrap(), "/v1/pools/tenant-a");
        for bad in ["", "a/b", "..", "a?force=true", &"p".repeat(65)] {
            let e = path(bad).unwrap_err();
            assert_eq!(e.status, crate::exit::BAD_INPUT, "{bad}");
            assert!(e.message.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(vm_key("web").is_ok());
        assert_eq!(vm_key("x/y").unwrap_err().status, crate::exit::BAD_INPUT);
    }
}
