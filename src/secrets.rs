//! `mjpfl secrets`: a deployment's credentials and certificates.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mjpfl_coordinator::auth::CredentialsFile;
use mjpfl_lab::secrets::{Made, SecretsLayout, SecretsPlan};

/// `mjpfl secrets ...`.
#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Make a deployment's secrets directory (development CA, TLS certificates, one credential
    /// per client, observer and Status tokens); does nothing if it already holds them.
    Init(InitArgs),
    /// Issue one more client credential: appends its hash to the credentials file and prints
    /// the credential (`<id>:<secret>`) once. The coordinator reads the file when it starts.
    Issue(IssueArgs),
}

/// Arguments of `mjpfl secrets init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The directory.
    #[arg(long)]
    dir: PathBuf,
    /// Client credentials to issue (client-000, client-001, ...).
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// A DNS name or IP address the coordinator's certificate covers (repeat for several).
    #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    server_names: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Arguments of `mjpfl secrets issue`.
#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The coordinator's credentials file (`[auth] clients_file`); made if missing.
    #[arg(long)]
    file: PathBuf,
    /// The client's id (1-64 characters of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    id: String,
    /// The data partition of the client (simulated data); default: assigned at join.
    #[arg(long)]
    partition: Option<u32>,
    /// Write the credential to this file (mode 0600) instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs a `secrets` subcommand.
pub fn run(command: SecretsCommand) -> Result<()> {
    match command {
        SecretsCommand::Init(a) => {
            let plan = SecretsPlan {
                dir: a.dir.clone(),
                clients: a.clients,
                server_names: a.server_names,
                days: a.days,
            };
            let layout = SecretsLayout::new(&a.dir);
            match mjpfl_lab::secrets::init(&plan)? {
                Made::Existing => println!(
                    "{} already holds a deployment's secrets: nothing changed",
                    a.dir.display()
                ),
                Made::Created => println!(
                    "made {}: CA {}, {} client credentials under {}; the coordinator needs\n  \
                     [auth] clients_file = {:?}, observer_token_file = {:?}\n  \
                     [server.tls] cert = {:?}, key = {:?}, client_ca = {:?}",
                    a.dir.display(),
                    layout.ca().display(),
                    a.clients,
                    layout.pool().display(),
                    layout.clients_file(),
                    layout.observer_token(),
                    layout.server_cert(),
                    layout.server_key(),
                    layout.ca(),
                ),
            }
        }
        SecretsCommand::Issue(a) => {
            let mut file = CredentialsFile::load_or_empty(&a.file)?;
            let credential = file.issue(&a.id, a.partition)?;
            file.save(&a.file)?;
            match &a.out {
                Some(out) => {
                    mjpfl_coordinator::auth::write_private(out, credential.to_string().as_bytes())?;
                    println!("credential of {} written to {}", a.id, out.display());
                }
                None => println!("{credential}"),
            }
            eprintln!(
                "{} now lists {} clients; restart the coordinator to admit {}",
                a.file.display(),
                file.clients.len(),
                a.id
            );
        }
    }
    Ok(())
}
