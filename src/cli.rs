//! The command line: the only place that reads flags and the environment, prints, and picks exit
//! codes. Every command is a thin shell over a [`Store`] method.

use crate::store::{self, Chunking, CompactOptions, ExportOptions, ImageRef, ImportOptions, Store};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fleetboot_image::Manifest;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fleetboot",
    version,
    about = "Bare-metal provisioning appliance and combined image store"
)]
struct Cli {
    /// The image store: a folder, or s3://BUCKET/PREFIX (endpoint, region and keys from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true for http). Default: the configuration's `store:` when that file exists, else /var/lib/fleetboot/store. serve, host, reimage and power use the configuration's store: naming another one is an error.
    #[arg(long, global = true, env = "FLEETBOOT_STORE")]
    store: Option<PathBuf>,
    /// The appliance's configuration (serve, host, reimage, power; image and store commands read its `store:` and, for import and rm, its hosts).
    #[arg(
        long,
        global = true,
        env = "FLEETBOOT_CONFIG",
        default_value = "/etc/fleetboot/fleetboot.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Disk images in the store.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The store as a whole.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Run the appliance: DHCP, TFTP and HTTP on the configured interface.
    Serve,
    /// Check the configuration as `serve` would load it — the YAML, every image it names
    /// against the store — and say what boot_dir lacks; exits non-zero on an error.
    Check,
    /// Hosts: configuration and observed state.
    #[command(subcommand)]
    Host(HostCommand),
    /// Make hosts reinstall at their next boot; with --reboot, boot them from the network now
    /// through their BMCs and follow each until it reports done or failed.
    Reimage {
        /// MAC addresses of hosts in the configuration.
        macs: Vec<String>,
        /// Every host of this group.
        #[arg(long)]
        group: Option<String>,
        /// Through each host's BMC: PXE on the next boot only, power cycle (or on), then
        /// follow the install.
        #[arg(long)]
        reboot: bool,
        /// BMCs talked to at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// How long to follow the installs (with --reboot).
        #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Power through the hosts' BMCs (`bmc:` in the configuration). Names hosts by MAC or
    /// --group; no host is ever implied.
    Power {
        #[arg(value_enum)]
        action: PowerArg,
        /// MAC addresses of hosts in the configuration.
        macs: Vec<String>,
        /// Every host of this group.
        #[arg(long)]
        group: Option<String>,
        /// BMCs talked to at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PowerArg {
    /// What each BMC reports.
    Status,
    On,
    /// Hard off.
    Off,
    /// Off and on (a host that is off is switched on).
    Cycle,
}

#[derive(Subcommand)]
enum HostCommand {
    /// Every host: assigned and installed image, status, progress.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One host: what the configuration says, what was recorded, its inventory (from an
    /// inspection) and, for a machine not in the configuration, the YAML line that enrols it.
    Show {
        mac: String,
        #[arg(long)]
        json: bool,
    },
    /// Retire hosts: at the next boot each one's disks are wiped (its `wipe:` — quick, or the
    /// drives' own secure erase) and it powers off; it shows `retired` and boots nothing until
    /// a reimage is requested.
    Retire {
        /// MAC addresses of hosts in the configuration.
        macs: Vec<String>,
        /// Every host of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// A host's install console log (its agent's output and, on a machine, the kernel's): the
    /// newest install, or --instance ID; --list shows the installs kept.
    Log {
        mac: String,
        #[arg(long)]
        instance: Option<String>,
        #[arg(long)]
        list: bool,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import a disk image as the next version NAME@N; prints NAME@N. FILE is raw (a file or a
    /// block device), qcow2 (v2/v3, plain or zlib/zstd-compressed clusters), or raw compressed
    /// with xz, zstd or gzip; told apart by its first bytes.
    Import {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        tuning: ImportTuning,
    },
    /// Recreate an image byte for byte (the latest version if no @N is given).
    Export {
        image: String,
        out: PathBuf,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Read the result back and check it against the image's BLAKE3.
        #[arg(long)]
        check_digest: bool,
    },
    /// Images: versions, size, bytes stored only for each and bytes shared.
    List {
        #[arg(long)]
        json: bool,
    },
    /// An image's descriptive data: metadata, offset table and map.
    Show {
        image: String,
        #[arg(long)]
        json: bool,
        /// Also print the offset table and the map.
        #[arg(long)]
        table: bool,
    },
    /// Remove an image version, or every version of NAME. `store gc` frees the space. Refused
    /// while the configuration's hosts boot it (named, or the latest of a name they follow).
    Rm {
        image: String,
        /// Remove it even though the configuration uses it (or cannot be read).
        #[arg(long)]
        force: bool,
    },
    /// What reimaging a machine from FROM to TO fetches.
    Diff {
        from: String,
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ImportTuning {
    /// How data is cut into chunks.
    #[arg(long, value_enum, default_value = "blocks")]
    chunker: ChunkerArg,
    /// Average chunk size in bytes (blocks: a multiple of 4096).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// Raw bytes of chunks compressed together (the unit fetched).
    #[arg(long)]
    frame_size: Option<usize>,
    /// zstd level.
    #[arg(long, allow_hyphen_values = true)]
    level: Option<i32>,
    /// Compression threads.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChunkerArg {
    Blocks,
    Fastcdc,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Re-hash every chunk and check every manifest; exits non-zero on damage.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Remove data no image uses. Packs taken out of use are kept readable for a grace period
    /// (installs and exports that began before gc still read them) and deleted by a later gc.
    Gc {
        /// How long a retired pack stays readable before a gc deletes it, e.g. 4h, 30m, 0s
        /// (0s frees the space at once: only when nothing is installing from the store). Keep
        /// it at least the appliance's install_token_ttl (default 4h): no install lasts longer.
        #[arg(long, default_value = "4h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Rewrite cold packs smaller: their chunks regrouped by the images that use them, in
    /// bigger frames compressed harder (imports stay fast; this is the background pass). Runs
    /// beside `serve` and imports: the writers' lock is held only to publish the result; the old
    /// packs are retired like gc's, readable for installs in flight until a gc after the grace
    /// period.
    Compact {
        /// Only packs older than this, e.g. 7d, 12h
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "all",
              required_unless_present = "all")]
        older_than: Option<std::time::Duration>,
        /// Every pack, however new
        #[arg(long)]
        all: bool,
        /// zstd level (1-22)
        #[arg(long, default_value_t = CompactOptions::default().zstd_level,
              value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Raw bytes per frame at most (one range request each)
        #[arg(long, default_value_t = CompactOptions::default().frame_bytes as u64,
              value_parser = clap::value_parser!(u64).range(4096..=(64 << 20)))]
        frame_size: u64,
        /// Compression threads (each holds a zstd context: about 100 MiB at level 19)
        #[arg(long, default_value_t = CompactOptions::default().threads as u16,
              value_parser = clap::value_parser!(u16).range(1..))]
        threads: u16,
        #[arg(long)]
        json: bool,
    },
    /// Logical and stored bytes, dedup and compression ratios.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Image(_) | Command::Store(_)) {
        check_store_agrees(&cli)?;
    }
    match cli.command {
        Command::Image(c) => {
            let store = open_store(cli.store.as_deref(), &cli.config)?;
            quiet_when_cut_short(&store);
            image(&store, &cli.config, c)
        }
        Command::Store(c) => {
            let store = open_store(cli.store.as_deref(), &cli.config)?;
            quiet_when_cut_short(&store);
            store_cmd(&store, c)
        }
        Command::Serve => serve(cli.config),
        Command::Check => check(&cli.config),
        Command::Host(HostCommand::List { json }) => host_list(&cli.config, json),
        Command::Host(HostCommand::Show { mac, json }) => host_show(&cli.config, &mac, json),
        Command::Host(HostCommand::Retire { macs, group }) => {
            host_retire(&cli.config, &macs, group.as_deref())
        }
        Command::Host(HostCommand::Log {
            mac,
            instance,
            list,
        }) => host_log(&cli.config, &mac, instance.as_deref(), list),
        Command::Reimage {
            macs,
            group,
            reboot,
            parallel,
            timeout,
        } => {
            let targets = Targets {
                macs,
                group,
                parallel,
            };
            if reboot {
                reimage_reboot(&cli.config, &targets, timeout)
            } else {
                reimage(&cli.config, &targets.macs, targets.group.as_deref())
            }
        }
        Command::Power {
            action,
            macs,
            group,
            parallel,
        } => power(
            &cli.config,
            action,
            &Targets {
                macs,
                group,
                parallel,
            },
        ),
    }
}

/// A listing cut short (`| head`) ends the command quietly, as other command-line tools do,
/// rather than with an error or a panic: SIGPIPE back to its default. Only for a store in a
/// folder: a command that talks to an object store keeps ignoring it, so that a server hanging
/// up mid-upload is an error it reports, not a silent death. (`serve` never resets it.)
fn quiet_when_cut_short(store: &Store) {
    if store.is_local() {
        // SAFETY: sets a signal's disposition to its default; no other thread handles signals.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

/// Where the store is when neither the command line, the environment nor a configuration file
/// says.
const DEFAULT_STORE: &str = "/var/lib/fleetboot/store";

/// The store of the `image` and `store` commands: `--store` (or `FLEETBOOT_STORE`), else the
/// one the configuration names when its file exists, else [`DEFAULT_STORE`] — so an import on
/// the appliance lands where `serve` reads.
fn open_store(given: Option<&std::path::Path>, config: &std::path::Path) -> Result<Store> {
    let location = match given {
        Some(given) => given.to_path_buf(),
        None if config.is_file() => crate::config::Config::store_of(config).context(
            "cannot tell the store from the configuration (give --store or FLEETBOOT_STORE)",
        )?,
        None => PathBuf::from(DEFAULT_STORE),
    };
    crate::s3::open_store(&location)
}

/// `serve`, `host`, `reimage` and `power` use the store their configuration names; another one
/// named by `--store` or `FLEETBOOT_STORE` is a mistake to stop at, not to ignore.
fn check_store_agrees(cli: &Cli) -> Result<()> {
    let Some(given) = &cli.store else {
        return Ok(());
    };
    let named = crate::config::Config::store_of(&cli.config)?;
    if !same_location(given, &named) {
        bail!(
            "the store is the one {} names ({}), but --store or FLEETBOOT_STORE names {}: \
             leave that out, or change `store:` in the configuration",
            cli.config.display(),
            named.display(),
            given.display()
        );
    }
    Ok(())
}

/// Whether two store locations are the same store: one object store address, or one folder
/// however it is written.
fn same_location(a: &std::path::Path, b: &std::path::Path) -> bool {
    let text = |p: &std::path::Path| p.to_string_lossy().trim_end_matches('/').to_string();
    if text(a).starts_with("s3://") || text(b).starts_with("s3://") {
        return text(a) == text(b);
    }
    let folder = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .ok()
    };
    folder(a) == folder(b)
}

/// The hosts a BMC command names, and how many BMCs to talk to at once.
struct Targets {
    macs: Vec<String>,
    group: Option<String>,
    parallel: usize,
}

impl Targets {
    /// The configuration, and each named host with its BMC.
    fn resolve(
        &self,
        config: &std::path::Path,
    ) -> Result<(crate::config::Config, crate::fleet::HostBmcs)> {
        let config = crate::config::Config::load(config)?;
        let macs = crate::fleet::reimage_targets(&config, &self.macs, self.group.as_deref())
            .map_err(anyhow::Error::msg)?;
        let hosts = crate::fleet::with_bmcs(&config, &macs);
        Ok((config, hosts))
    }
}

fn power(config: &std::path::Path, action: PowerArg, targets: &Targets) -> Result<()> {
    use crate::bmc::PowerAction;
    use crate::bmc::PowerState;
    let (config, hosts) = targets.resolve(config)?;
    // Every action ends in a known state: what the host shows from now on.
    let results = crate::bmc::for_each(&hosts, targets.parallel, |bmc| match action {
        PowerArg::Status => bmc.power_state(),
        PowerArg::On => bmc.power(PowerAction::On).map(|_| PowerState::On),
        PowerArg::Off => bmc.power(PowerAction::Off).map(|_| PowerState::Off),
        PowerArg::Cycle => bmc.power(PowerAction::Cycle).map(|_| PowerState::On),
    });
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    if let Err(e) = fleet.set_power(&crate::fleet::power_records(&results)) {
        eprintln!("power states not recorded: {e}");
    }
    let mut failed = 0;
    for (mac, r) in &results {
        let what = |s: &PowerState| match action {
            PowerArg::Status => s.to_string(),
            PowerArg::On => "powered on".into(),
            PowerArg::Off => "powered off".into(),
            PowerArg::Cycle => "power cycled".into(),
        };
        match r {
            Ok(s) => println!("{mac}  {}", what(s)),
            Err(e) => {
                failed += 1;
                println!("{mac}  error: {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} hosts failed", results.len());
    }
    Ok(())
}

/// Marks the hosts for reimage, boots each from the network through its BMC (PXE once, power
/// cycle), and follows every host whose BMC did that until it is installed or failed.
fn reimage_reboot(
    config: &std::path::Path,
    targets: &Targets,
    timeout: std::time::Duration,
) -> Result<()> {
    use crate::fleet::follow::{follow, Step};
    let (config, hosts) = targets.resolve(config)?;
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    let mark = fleet.event_mark()?;
    let macs: Vec<_> = hosts.iter().map(|(m, _)| *m).collect();
    fleet.request_reimage(&macs)?;
    let results = crate::bmc::for_each(&hosts, targets.parallel, |bmc| {
        bmc.boot_from_network().map(|_| crate::bmc::PowerState::On)
    });
    if let Err(e) = fleet.set_power(&crate::fleet::power_records(&results)) {
        eprintln!("power states not recorded: {e}");
    }
    let mut sent = Vec::new();
    let mut not_reached = 0;
    for (mac, r) in &results {
        match r {
            Ok(_) => {
                println!("{mac}: booting from the network (PXE once, power cycled)");
                sent.push(*mac);
            }
            Err(e) => {
                not_reached += 1;
                println!("{mac}: not rebooted: {e} (it still reinstalls at its next boot)");
            }
        }
    }
    let outcome = follow(
        &fleet,
        mark,
        &sent,
        timeout,
        std::time::Duration::from_millis(500),
        |mac, step| match step {
            Step::AgentBooted(image) => println!("{mac}: agent booted, installing {image}"),
            Step::Progress(pct) => println!("{mac}: {pct}%"),
            Step::Installed(image) => println!("{mac}: installed {image}"),
            Step::Failed(why) => println!("{mac}: failed: {why}"),
            Step::TimedOut => println!(
                "{mac}: no outcome after {}",
                humantime::format_duration(timeout)
            ),
        },
    )?;
    let installed = outcome
        .values()
        .filter(|s| matches!(s, Step::Installed(_)))
        .count();
    let failed = outcome.len() - installed;
    println!("{installed} installed, {failed} failed or timed out, {not_reached} not rebooted");
    if installed < hosts.len() {
        bail!(
            "{} of {} hosts were not reimaged",
            hosts.len() - installed,
            hosts.len()
        );
    }
    Ok(())
}

fn check(path: &std::path::Path) -> Result<()> {
    let config = crate::serve::load_checked(path)?;
    let problems = crate::serve::missing_boot_files(&config);
    println!(
        "{}: {} hosts, {} groups, {} discovery rules; every image it names ({} uses) is in {}",
        path.display(),
        config.hosts.len(),
        config.groups.len(),
        config.rules.len(),
        config.image_uses.len(),
        config.store.display()
    );
    for p in &problems {
        println!("warning: {p}");
    }
    Ok(())
}

fn serve(config: PathBuf) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETBOOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let options = crate::serve::ServeOptions {
        config,
        admin_token_env: std::env::var("FLEETBOOT_ADMIN_TOKEN").ok(),
    };
    tokio::runtime::Builder::new_multi_thread()
        // Blocking work (SQLite behind one lock, store reads) gains nothing from hundreds of
        // threads; tokio's default of 512 let memory grow with the number of agents (each
        // thread a stack and a malloc arena).
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(crate::serve::run(options))
}

/// Threads `serve` runs blocking work on, at most.
const BLOCKING_THREADS_MAX: usize = 32;

fn host_retire(config: &std::path::Path, macs: &[String], group: Option<&str>) -> Result<()> {
    let config = crate::config::Config::load(config)?;
    let targets =
        crate::fleet::reimage_targets(&config, macs, group).map_err(anyhow::Error::msg)?;
    let how = crate::fleet::wipe_modes(&config, &targets);
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    fleet.request_retire(&targets, &how)?;
    for (mac, how) in targets.iter().zip(&how) {
        println!("{mac}: at its next boot its disks are wiped ({how}) and it powers off");
    }
    Ok(())
}

fn host_show(config: &std::path::Path, mac: &str, json: bool) -> Result<()> {
    let config = crate::config::Config::load(config)?;
    let mac: crate::mac::Mac = mac.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    let (store, catalog) = (
        crate::s3::open_store(&config.store)?,
        crate::appliance::ImageCatalog::default(),
    );
    let Some(d) = crate::http::api::host_detail(&config, &fleet, mac, &|r| {
        catalog.resolve(&store, r).ok().map(|x| x.id)
    })?
    else {
        if let Some(site) = config.other_sites.get(&mac) {
            bail!(
                "host {mac} is site {site:?}'s in {}: this appliance (FLEETBOOT_SITE) serves \
                 another site",
                config.path.display()
            );
        }
        bail!(
            "no host {mac}: not in {} and never seen",
            config.path.display()
        );
    };
    if json {
        return print_json(&d);
    }
    let (view, inventory, enrol, disk_pick) = (&d.host, &d.inventory, &d.enrol, &d.disk_pick);
    let host = config.hosts.get(&mac);
    let resolved = config.host_for(mac, inventory.as_ref());
    let rule = d.rule.as_ref().map(|r| {
        (
            r["number"].clone(),
            r["line"].clone(),
            r["image"].as_str().map(str::to_string),
            r["group"].as_str().map(str::to_string),
        )
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "host {mac}")?;
    if let Some(v) = &view {
        writeln!(
            out,
            "  status {}{}, assigned {}, installed {}, power {}",
            v.status,
            v.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            v.image.as_deref().unwrap_or("-"),
            v.installed.as_ref().map_or("-".into(), |i| i.to_string()),
            v.power.as_deref().unwrap_or("-"),
        )?;
    }
    if let Some(b) = host.and_then(|h| h.bmc.as_ref()) {
        writeln!(out, "  bmc {} {} as {}", b.kind, b.address, b.username)?;
    }
    match &inventory {
        None => writeln!(
            out,
            "  no inventory (unknown_hosts: discover inspects new machines)"
        )?,
        Some(inv) => {
            let s = &inv.system;
            writeln!(
                out,
                "  system {} {} serial {} uuid {}",
                s.vendor.as_deref().unwrap_or("?"),
                s.product.as_deref().unwrap_or("?"),
                s.serial.as_deref().unwrap_or("?"),
                s.uuid.as_deref().unwrap_or("?")
            )?;
            writeln!(
                out,
                "  {} CPUs ({}), {} memory",
                inv.cpus,
                inv.cpu_model.as_deref().unwrap_or("?"),
                human(inv.memory_bytes)
            )?;
            for d in &inv.disks {
                writeln!(
                    out,
                    "  disk {} {} model {} serial {} wwn {} {}{} by-path {}",
                    d.name,
                    human(d.size_bytes),
                    d.model.as_deref().unwrap_or("-"),
                    d.serial.as_deref().unwrap_or("-"),
                    d.wwn.as_deref().unwrap_or("-"),
                    if d.rotational {
                        "rotational"
                    } else {
                        "solid-state"
                    },
                    if d.removable { ", removable" } else { "" },
                    d.by_path.as_deref().unwrap_or("-"),
                )?;
            }
            for n in &inv.nics {
                writeln!(
                    out,
                    "  nic {} {} driver {} link {}{}",
                    n.name,
                    n.mac,
                    n.driver.as_deref().unwrap_or("-"),
                    if n.link { "up" } else { "down" },
                    n.speed_mbps
                        .map(|s| format!(" {s} Mb/s"))
                        .unwrap_or_default(),
                )?;
            }
            match &inv.bmc_address {
                Some(a) => writeln!(
                    out,
                    "  BMC found by the machine at {a}{}",
                    inv.bmc_mac
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                )?,
                None => writeln!(out, "  no BMC found by the kernel's IPMI driver")?,
            }
        }
    }
    match (&resolved.disk, &disk_pick) {
        (crate::config::DiskChoice::Name(n), _) => writeln!(out, "  disk {n}")?,
        (crate::config::DiskChoice::Hints(h), pick) => writeln!(
            out,
            "  disk hints {}: {}",
            serde_json::to_string(h).unwrap_or_default(),
            match pick {
                Some(p) => format!("pick {p}"),
                None => "no inventory to check them against".into(),
            }
        )?,
    }
    if let Some((n, line, image, group)) = &rule {
        writeln!(
            out,
            "  matches rule {n} (line {line}{}): installs {} at its next boot",
            group
                .as_ref()
                .map(|g| format!(", group {g}"))
                .unwrap_or_default(),
            image.as_deref().unwrap_or("-")
        )?;
    }
    if let Some(line) = enrol {
        writeln!(
            out,
            "to enrol it, add under hosts: in {}:",
            config.path.display()
        )?;
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn host_log(config: &std::path::Path, mac: &str, instance: Option<&str>, list: bool) -> Result<()> {
    let config = crate::config::Config::load(config)?;
    let mac: crate::mac::Mac = mac.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let logs = crate::fleet::logs::InstallLogs::new(&config.state_dir);
    if list {
        let mut out = std::io::stdout().lock();
        for e in logs.list(mac) {
            let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.modified as u64);
            writeln!(
                out,
                "{}  {}  {} bytes",
                e.instance,
                humantime::format_rfc3339_seconds(when),
                e.bytes
            )?;
        }
        return Ok(());
    }
    let Some((_, text)) = logs.read(mac, instance)? else {
        bail!(
            "no install log of {mac}{}",
            instance.map(|i| format!(" for {i}")).unwrap_or_default()
        );
    };
    std::io::stdout().lock().write_all(&text)?;
    Ok(())
}

fn host_list(config: &std::path::Path, json: bool) -> Result<()> {
    let config = crate::config::Config::load(config)?;
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    let (store, catalog) = (
        crate::s3::open_store(&config.store)?,
        crate::appliance::ImageCatalog::default(),
    );
    let views = crate::http::api::host_views(&config, &fleet.hosts()?, &fleet.power()?, &|r| {
        catalog.resolve(&store, r).ok().map(|x| x.id)
    });
    if json {
        return print_json(&views);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<17} {:<12} {:<14} {:<14} {:<10} {:>4} {:<5}  DETAIL",
        "MAC", "HOSTNAME", "ASSIGNED", "INSTALLED", "STATUS", "%", "POWER"
    )?;
    for v in views {
        let assigned = match (&v.image, &v.target) {
            (Some(written), Some(t)) if *written != t.to_string() => format!("{written}={t}"),
            (Some(written), _) => written.clone(),
            (None, _) => "-".into(),
        };
        writeln!(
            out,
            "{:<17} {:<12} {:<14} {:<14} {:<10} {:>4} {:<5}  {}{}",
            v.mac,
            v.hostname.unwrap_or_default(),
            assigned,
            v.installed.map_or_else(|| "-".into(), |i| i.to_string()),
            v.status,
            v.progress_pct,
            match v.power.as_deref() {
                Some("on") => "on",
                Some("off") => "off",
                Some(_) => "?",
                None => "-",
            },
            v.detail.unwrap_or_default(),
            if v.reimage {
                " (reimage requested)"
            } else if v.pending {
                " (pending: installs at its next boot)"
            } else {
                ""
            },
        )?;
    }
    Ok(())
}

fn reimage(config: &std::path::Path, macs: &[String], group: Option<&str>) -> Result<()> {
    let config = crate::config::Config::load(config)?;
    let targets =
        crate::fleet::reimage_targets(&config, macs, group).map_err(anyhow::Error::msg)?;
    let fleet = crate::fleet::FleetState::open(&config.state_dir)?;
    fleet.request_reimage(&targets)?;
    for mac in targets {
        println!("{mac}: reinstalls at its next boot");
    }
    Ok(())
}

/// After an import: says when an earlier version of the name holds the same content (a repeated
/// import costs no space, but hosts that installed either need not reinstall).
fn say_if_unchanged(store: &Store, report: &store::ImportReport) {
    let Ok(versions) = store.versions() else {
        return;
    };
    let same = versions
        .iter()
        .filter(|v| v.name == report.image.name && Some(v.version) != report.image.version)
        .filter(|v| {
            store
                .load_manifest(v)
                .is_ok_and(|m| m.meta.digest == report.digest)
        })
        .map(|v| format!("{}@{}", v.name, v.version))
        .collect::<Vec<_>>();
    if !same.is_empty() {
        eprintln!(
            "{} holds the same content as {} (same digest)",
            report.image,
            same.join(", ")
        );
    }
}

/// After an import: hosts assigned the plain name (the latest version) now install the new
/// version at their next boot — that is how a rollout works — so say how many.
fn announce_rollout(store: &Store, config_path: &std::path::Path, report: &store::ImportReport) {
    if !config_path.is_file() {
        return;
    }
    let config = match crate::config::Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hosts not counted: {e}");
            return;
        }
    };
    if !same_location(&config.store, &store.location()) {
        return;
    }
    let name = &report.image.name;
    let installed: std::collections::HashMap<crate::mac::Mac, Option<String>> =
        match crate::fleet::FleetState::open(&config.state_dir).and_then(|f| f.hosts()) {
            Ok(records) => records
                .into_iter()
                .map(|r| (r.mac, r.installed.map(|i| i.digest)))
                .collect(),
            Err(e) => {
                eprintln!("hosts not counted: {e}");
                return;
            }
        };
    let following: Vec<_> = config
        .hosts
        .values()
        .filter(|h| {
            h.image
                .as_ref()
                .is_some_and(|i| i.name == *name && i.version.is_none())
        })
        .collect();
    let reinstall = following
        .iter()
        .filter(|h| installed.get(&h.mac).cloned().flatten().as_deref() != Some(&report.digest))
        .count();
    eprintln!(
        "{reinstall} of {} hosts assigned `{name}` will install {} at their next boot ({})",
        following.len(),
        report.image,
        config_path.display()
    );
}

/// Refuses to remove what the configuration's hosts boot: a version a host, group, default or
/// discovery rule names, or the latest of a name one follows. Those hosts would install another
/// version or nothing, and `serve` refuses a configuration naming an image the store lacks.
fn refuse_if_in_use(store: &Store, config_path: &std::path::Path, r: &ImageRef) -> Result<()> {
    if !config_path.is_file() {
        return Ok(());
    }
    let config = crate::config::Config::load(config_path).with_context(|| {
        format!("cannot tell whether hosts use {r} (--force removes it unchecked)")
    })?;
    if !same_location(&config.store, &store.location()) {
        return Ok(());
    }
    let versions = store.versions()?;
    let users: Vec<String> = config
        .image_uses
        .iter()
        .filter_map(|u| {
            let v = Store::resolve_in(&versions, &u.image).ok()?;
            let doomed = v.name == r.name && r.version.is_none_or(|n| n == v.version);
            doomed.then(|| {
                format!(
                    "{}:{}:{}: {} (now {}@{})",
                    config_path.display(),
                    u.line,
                    u.column,
                    u.image,
                    v.name,
                    v.version
                )
            })
        })
        .collect();
    if !users.is_empty() {
        bail!(
            "{r} is in use; the configuration names it at\n  {}\nchange those first, or give --force",
            users.join("\n  ")
        );
    }
    Ok(())
}

/// Said when a listing stops at a manifest it cannot read.
const DAMAGED_HINT: &str =
    "an image's descriptive data cannot be read: `fleetboot store verify` lists every damaged \
     image; put its manifest back from a backup, or remove it with `fleetboot image rm NAME@N`";

fn parse_ref(s: &str) -> Result<ImageRef> {
    s.parse::<ImageRef>().map_err(Into::into)
}

fn image(store: &Store, config: &std::path::Path, command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Import { name, file, tuning } => {
            let options = tuning.options()?;
            let bar = bytes_bar(&format!("importing {name}"));
            let report = store::import::import(store, &name, &file, &options, &|done, total| {
                // A compressed stream's size is known only at its end.
                bar.set_length(total.max(done));
                bar.set_position(done);
            })
            .with_context(|| format!("cannot import {}", file.display()))?;
            bar.finish_and_clear();
            eprintln!(
                "imported {} ({}) in {:.1} s: {} logical, {} data, {} new ({} of {} chunks) stored in {}",
                report.image,
                report.format,
                report.elapsed.as_secs_f64(),
                human(report.size),
                human(report.data_bytes),
                human(report.new_raw_bytes),
                report.new_chunks,
                report.chunks,
                human(report.new_stored_bytes),
            );
            println!("{}", report.image);
            say_if_unchanged(store, &report);
            announce_rollout(store, config, &report);
        }
        ImageCommand::Export {
            image,
            out,
            force,
            check_digest,
        } => {
            let r = parse_ref(&image)?;
            let bar = bytes_bar(&format!("exporting {r}"));
            let report = store
                .export(
                    &r,
                    &out,
                    ExportOptions {
                        force,
                        check_digest,
                    },
                    &|done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    },
                )
                .with_context(|| format!("cannot export {r} to {}", out.display()))?;
            bar.finish_and_clear();
            eprintln!(
                "exported {} to {} in {:.1} s: {}, {} fetched from packs{}",
                report.image,
                out.display(),
                report.elapsed.as_secs_f64(),
                human(report.size),
                human(report.restore.bytes_fetched),
                if report.digest_checked {
                    ", digest checked"
                } else {
                    ""
                },
            );
        }
        ImageCommand::List { json } => {
            let list = store.list().context(DAMAGED_HINT)?;
            if json {
                return print_json(&list);
            }
            if list.is_empty() {
                eprintln!("no images in {}", store.location().display());
                return Ok(());
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<24} {:<12} {:>10} {:>10} {:>10}",
                "NAME", "VERSIONS", "SIZE", "ONLY", "SHARED"
            )?;
            for s in list {
                let versions = s
                    .versions
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                writeln!(
                    out,
                    "{:<24} {:<12} {:>10} {:>10} {:>10}",
                    s.name,
                    versions,
                    human(s.size),
                    human(s.only_bytes),
                    human(s.shared_bytes)
                )?;
            }
        }
        ImageCommand::Show { image, json, table } => {
            let (_, m) = store.manifest(&parse_ref(&image)?)?;
            if json {
                return print_json(&manifest_json(&m));
            }
            show(&m, table)?;
        }
        ImageCommand::Rm { image, force } => {
            let r = parse_ref(&image)?;
            if !force {
                refuse_if_in_use(store, config, &r)?;
            }
            for r in store.remove(&r)? {
                println!("removed {r}");
            }
            eprintln!("run `fleetboot store gc` to free the space no image uses any more");
        }
        ImageCommand::Diff { from, to, json } => {
            let d = store.diff(&parse_ref(&from)?, &parse_ref(&to)?)?;
            if json {
                return print_json(&d);
            }
            println!(
                "{} -> {}: {} already in place, {} changed ({} of it found elsewhere on the disk); \
                 fetch {} in {} frames ({} if only data in place is reused)",
                d.from,
                d.to,
                human(d.reused_bytes),
                human(d.changed_bytes),
                human(d.moved_bytes),
                human(d.fetch_bytes),
                d.fetch_frames,
                human(d.in_place_fetch_bytes),
            );
        }
    }
    Ok(())
}

fn store_cmd(store: &Store, command: StoreCommand) -> Result<()> {
    match command {
        StoreCommand::Verify { json } => {
            let r = store.verify()?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "checked {} images, {} frames, {} chunks ({})",
                    r.images_checked,
                    r.frames_checked,
                    r.chunks_checked,
                    human(r.bytes_checked)
                );
                for (image, reasons) in &r.damaged_images {
                    println!("DAMAGED image {image}:");
                    for why in reasons.iter().take(10) {
                        println!("  {why}");
                    }
                    if reasons.len() > 10 {
                        println!("  ... and {} more", reasons.len() - 10);
                    }
                }
                for (id, why) in &r.damaged_chunks {
                    println!("DAMAGED chunk {id}: {why}");
                }
                if !r.unreferenced_packs.is_empty() && r.damaged_images.is_empty() {
                    println!(
                        "{} pack(s) no image uses (left by an interrupted import; `store gc` removes them)",
                        r.unreferenced_packs.len()
                    );
                } else if !r.unreferenced_packs.is_empty() {
                    // A manifest that cannot be read names no pack: its packs look unused.
                    println!(
                        "{} pack(s) no readable manifest names (an interrupted import's, or the \
                         damaged images' above: put their manifests back from a backup, or \
                         `image rm` them, before `store gc`)",
                        r.unreferenced_packs.len()
                    );
                }
            }
            if !r.ok() {
                bail!(
                    "the store is damaged: {} image(s), {} chunk(s) affected",
                    r.damaged_images.len(),
                    r.damaged_chunks.len()
                );
            }
            if !json {
                println!("store is intact");
            }
        }
        StoreCommand::Gc { grace } => {
            let r = store.gc_with_grace(grace)?;
            println!(
                "retired {} unused pack(s), rewrote {} pack(s) and {} manifest(s); freed {} ({} retired pack(s) past their grace period)",
                r.packs_removed,
                r.packs_rewritten,
                r.manifests_rewritten,
                human(r.bytes_freed),
                r.retired_deleted,
            );
            if r.id_tables_deleted > 0 {
                println!(
                    "deleted {} id table(s) whose pack was gone",
                    r.id_tables_deleted
                );
            }
            if r.packs_restored > 0 {
                println!(
                    "put back {} retired pack(s) that an import elsewhere reused",
                    r.packs_restored
                );
            }
            if r.retired_waiting > 0 {
                println!(
                    "{} retired pack(s), {}, stay readable for installs in flight; a gc after {} frees them (--grace 0s: now)",
                    r.retired_waiting,
                    human(r.bytes_waiting),
                    humantime::format_duration(grace)
                );
            }
        }
        StoreCommand::Compact {
            older_than,
            all,
            level,
            frame_size,
            threads,
            json,
        } => {
            let options = CompactOptions {
                older_than: if all { None } else { older_than },
                zstd_level: level,
                frame_bytes: frame_size as usize,
                threads: usize::from(threads),
                ..CompactOptions::default()
            };
            let r = store.compact(&options)?;
            if json {
                return print_json(&r);
            }
            println!(
                "compacted {} pack(s), {}, into {} pack(s), {} ({} chunks, {} raw, in {} frames); rewrote {} manifest(s) in {:.1} s (lock held {:.1} s)",
                r.packs_compacted,
                human(r.bytes_before),
                r.packs_written,
                human(r.bytes_after),
                r.chunks,
                human(r.raw_bytes),
                r.frames,
                r.manifests_rewritten,
                r.write_secs + r.publish_secs,
                r.publish_secs,
            );
            if r.manifests_rewritten > 0 {
                println!(
                    "manifests {} -> {} (format 2: ids by row of the packs' id tables, {})",
                    human(r.manifest_bytes_before),
                    human(r.manifest_bytes_after),
                    human(r.id_table_bytes)
                );
            }
            if r.no_gain {
                println!("the store would not get smaller: left as it was");
            } else if r.packs_kept > 0 {
                println!("{} pack(s) left as they were (newer than --older-than, or named by an image imported meanwhile)", r.packs_kept);
            }
            if r.packs_compacted > 0 {
                println!("the old packs stay readable for installs in flight; a `store gc` after its grace period frees them");
            }
        }
        StoreCommand::Stats { json } => {
            let s = store.stats().context(DAMAGED_HINT)?;
            if json {
                return print_json(&s);
            }
            println!("images          {} ({} versions)", s.images, s.versions);
            println!(
                "logical bytes   {} ({} data)",
                human(s.logical_bytes),
                human(s.data_bytes)
            );
            println!(
                "unique chunks   {} ({})",
                s.unique_chunks,
                human(s.unique_bytes)
            );
            println!(
                "stored bytes    {} ({} in {} packs, {} manifests, {} id tables)",
                human(s.stored_bytes),
                human(s.pack_bytes),
                s.pack_files,
                human(s.manifest_bytes),
                human(s.id_table_bytes)
            );
            if s.retired_packs > 0 {
                println!(
                    "retired         {} in {} packs (readable until a gc after their grace period)",
                    human(s.retired_bytes),
                    s.retired_packs
                );
            }
            println!("dedup ratio     {:.2}", s.dedup_ratio);
            println!("compression     {:.2}", s.compression_ratio);
            println!("overall ratio   {:.2}", s.total_ratio);
        }
    }
    Ok(())
}

impl ImportTuning {
    fn options(&self) -> Result<ImportOptions> {
        let chunking = match (self.chunker, self.chunk_size) {
            (ChunkerArg::Blocks, None) => Chunking::default(),
            (ChunkerArg::Blocks, Some(n)) => {
                if n == 0 || n % 4096 != 0 {
                    bail!("--chunk-size for the blocks chunker must be a multiple of 4096");
                }
                Chunking::Blocks { avg_bytes: n }
            }
            (ChunkerArg::Fastcdc, n) => {
                let avg = n.unwrap_or(16384);
                if !(256..=(16 << 20)).contains(&avg) {
                    bail!("--chunk-size for fastcdc must be between 256 and 16 MiB");
                }
                Chunking::fastcdc(avg)
            }
        };
        let mut o = ImportOptions {
            chunking,
            ..ImportOptions::default()
        };
        if let Some(f) = self.frame_size {
            if !(4096..=(64 << 20)).contains(&f) {
                bail!("--frame-size must be between 4096 and 64 MiB");
            }
            o.frame_bytes = f;
        }
        if let Some(l) = self.level {
            if !(-7..=22).contains(&l) {
                bail!("--level must be a zstd level, -7 to 22");
            }
            o.zstd_level = l;
        }
        if let Some(t) = self.threads {
            o.threads = t.clamp(1, 64);
        }
        Ok(o)
    }
}

/// A byte progress bar on stderr; draws nothing when stderr is not a terminal.
fn bytes_bar(message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn manifest_json(m: &Manifest) -> serde_json::Value {
    let packs: Vec<String> = m.packs.iter().map(|p| p.to_string()).collect();
    serde_json::json!({
        "metadata": m.meta,
        "data_bytes": m.data_bytes(),
        "packs": packs,
        "entries": m.entries.iter().map(|e| serde_json::json!({
            "id": e.id.to_string(),
            "pack": packs[e.pack as usize],
            "frame_offset": e.frame_offset,
            "frame_stored": e.frame_stored,
            "frame_raw": e.frame_raw,
            "chunk_offset": e.chunk_offset,
            "size": e.size,
            "flags": e.flags,
        })).collect::<Vec<_>>(),
        "extents": m.extents.iter().map(|x| serde_json::json!({
            "offset": x.offset,
            "len": x.len,
            "entry": x.entry,
        })).collect::<Vec<_>>(),
    })
}

fn show(m: &Manifest, table: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let meta = &m.meta;
    writeln!(out, "image     {}@{}", meta.name, meta.version)?;
    writeln!(out, "size      {} ({} bytes)", human(meta.size), meta.size)?;
    writeln!(out, "data      {}", human(m.data_bytes()))?;
    writeln!(out, "digest    blake3:{}", meta.digest)?;
    writeln!(out, "created   {}", meta.created)?;
    writeln!(out, "source    {}", meta.source)?;
    writeln!(out, "chunking  {}", meta.chunking)?;
    let frames: std::collections::HashSet<(u32, u64)> =
        m.entries.iter().map(|e| (e.pack, e.frame_offset)).collect();
    writeln!(
        out,
        "table     {} chunks in {} frames of {} pack(s); map of {} extents",
        m.entries.len(),
        frames.len(),
        m.packs.len(),
        m.extents.len()
    )?;
    if table {
        writeln!(
            out,
            "\noffset table: # id pack frame_offset frame_stored frame_raw chunk_offset size flags"
        )?;
        for (i, e) in m.entries.iter().enumerate() {
            writeln!(
                out,
                "{i} {} {} {} {} {} {} {} {}",
                e.id,
                m.packs[e.pack as usize],
                e.frame_offset,
                e.frame_stored,
                e.frame_raw,
                e.chunk_offset,
                e.size,
                if e.is_zstd() { "zstd" } else { "raw" }
            )?;
        }
        writeln!(out, "\nmap: offset len entry")?;
        for x in &m.extents {
            match x.entry {
                Some(e) => writeln!(out, "{} {} {e}", x.offset, x.len)?,
                None => writeln!(out, "{} {} zero", x.offset, x.len)?,
            }
        }
    }
    Ok(())
}

/// Bytes in binary units, for people.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
