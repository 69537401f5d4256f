//! `vireo host ...`: this host's identity for migration and the hosts it trusts
//! (docs/migration.md, "Host authentication").

use std::error::Error;
use std::process::ExitCode;

use clap::Subcommand;
use vireo_api::{HostIdentityInfo, TrustedHost};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::render;
use crate::vm::view::json;

#[derive(Subcommand)]
pub enum HostCommand {
    /// This host's certificate fingerprint: give it to the admin of a host that should
    /// migrate VMs with this one (`vireo host trust add` there)
    Identity {
        /// Print the certificate (PEM) instead of its fingerprint.
        #[arg(long, conflicts_with = "output")]
        pem: bool,
        /// text (the fingerprint) or json (fingerprint and certificate).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// The hosts this one migrates VMs with
    #[command(subcommand)]
    Trust(TrustCommand),
}

#[derive(Subcommand)]
pub enum TrustCommand {
    /// List the trusted hosts: fingerprint and name.
    List {
        /// text (a table) or json.
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Trust a host by its fingerprint (as its `vireo host identity` prints it)
    ///
    ///   vireo host trust add sha256:3f1c...e9 node-b
    #[command(verbatim_doc_comment)]
    Add {
        /// sha256:<64 hex digits>.
        fingerprint: String,
        /// A name for listings and messages.
        name: String,
    },
    /// Stop trusting a host.
    Rm {
        /// sha256:<64 hex digits>.
        fingerprint: String,
    },
}

pub fn execute(client: &Client, command: HostCommand) -> Result<ExitCode, Box<dyn Error>> {
    match command {
        HostCommand::Identity { pem, output } => {
            let id: HostIdentityInfo = client.get("/v1/host/identity")?;
            match (pem, output) {
                (true, _) => emit(&id.certificate_pem)?,
                (false, OutputFormat::Json) => emit(json(&id))?,
                (false, OutputFormat::Text) => emit(format!("{}\n", id.fingerprint))?,
            }
        }
        HostCommand::Trust(TrustCommand::List { output }) => {
            let hosts: Vec<TrustedHost> = client.get("/v1/host/trusted")?;
            match output {
                OutputFormat::Json => emit(json(&hosts))?,
                OutputFormat::Text => {
                    let rows = hosts
                        .iter()
                        .map(|h| vec![h.name.clone(), h.fingerprint.clone()])
                        .collect::<Vec<_>>();
                    emit(render(&["NAME", "FINGERPRINT"], &rows))?
                }
            }
        }
        HostCommand::Trust(TrustCommand::Add { fingerprint, name }) => {
            check(&fingerprint)?;
            let body = TrustedHost { fingerprint, name };
            let h: TrustedHost = client.post("/v1/host/trusted", Some(&body))?;
            emit(format!("trusting {} ({})\n", h.name, h.fingerprint))?;
        }
        HostCommand::Trust(TrustCommand::Rm { fingerprint }) => {
            check(&fingerprint)?;
            client.delete(&format!("/v1/host/trusted/{fingerprint}"))?;
            emit(format!("no longer trusting {fingerprint}\n"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a malformed fingerprint before any request (it also goes into a URL path).
fn check(fp: &str) -> Result<(), CliError> {
    let hex = fp.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(CliError::bad_input(format!(
            "{fp:?} is not a fingerprint: expected sha256: and 64 hex digits, as `vireo host identity` prints it"
        )))
    }
}
