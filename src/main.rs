//! The `keygate` binary: parse the command line, hand it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    keygate::cli::main(keygate::cli::Cli::parse())
}
