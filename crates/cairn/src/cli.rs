//! The command-line client (being written).

#[derive(Debug, clap::Args)]
pub struct Global {}

#[derive(Debug, clap::Subcommand)]
pub enum Command {}

pub fn run(_global: &Global, command: Command) -> anyhow::Result<()> {
    match command {}
}
