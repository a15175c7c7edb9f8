//! `cairn`: runs the service (`cairn serve`) and is its command-line client.

mod cli;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cairn", version, about = "Snapshots, backups, templates and volumes for VM disks")]
struct Args {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cairn service: REST API, NBD server, volume store and metadata.
    Serve(serve::ServeArgs),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve(serve_args) => serve::run(serve_args),
        Command::Client(command) => cli::run(&args.global, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the reason and its causes, for people and for scripts' logs.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
