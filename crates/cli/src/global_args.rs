//! The options every `vireo` command accepts (`global`), shared by the full parser in `main.rs`
//! and the slim one `vireo run` uses (`run_only.rs`) so both show and accept the same ones.

use std::path::PathBuf;

/// Where vireod listens unless --host or VIREO_HOST says otherwise.
pub const DEFAULT_HOST: &str = "unix:/var/lib/vireo/vireod.sock";

#[derive(clap::Args)]
pub struct GlobalArgs {
    /// Where vireod listens, for `vm`, `pool`, `switch` and `job`: unix:PATH (its socket) or https://HOST:PORT
    /// (its TLS listener; needs --token-file).
    #[arg(
        long,
        global = true,
        env = "VIREO_HOST",
        value_name = "unix:PATH|https://HOST:PORT",
        default_value = DEFAULT_HOST
    )]
    pub host: String,
    /// The bearer token for an https:// --host (the file's first line).
    #[arg(long, global = true, env = "VIREO_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate to trust for an https:// --host (e.g. vireod's self-signed
    /// certificate); default: the webpki root set.
    #[arg(long, global = true, env = "VIREO_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}
