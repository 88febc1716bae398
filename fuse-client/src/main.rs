//! `devmount`: the client. Parse, run, exit code; the commands live in their own modules.

use clap::Parser;

/// Develop inside a Kubernetes pod: mount its workdir, run commands in it, forward its ports.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {}

fn main() {
    Args::parse();
}
