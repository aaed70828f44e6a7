//! The `fleetboot` binary: parses the command line and prints errors once.

fn main() {
    if let Err(err) = fleetboot::cli::run() {
        // Output cut short by its reader (`| head`): not an error worth a message.
        let cut_short = err.chain().any(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if cut_short {
            std::process::exit(141);
        }
        eprintln!("fleetboot: error: {err:#}");
        std::process::exit(1);
    }
}
