//! The `fleetboot` binary: parses the command line and prints errors once.

fn main() {
    if let Err(err) = fleetboot::cli::run() {
        eprintln!("fleetboot: error: {err:#}");
        std::process::exit(1);
    }
}
