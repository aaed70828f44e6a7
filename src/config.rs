//! The appliance's configuration: the YAML schema, loading and validation.
//!
//! `fleetboot serve --config FILE` reads this file at start and again on SIGHUP or when it
//! changes; a file that does not load is reported and the previous configuration stays in force.
//! Every error names the file, the line and the column, and what is wrong: YAML syntax, an
//! unknown key, a duplicate key, a bad MAC or image name, a group that does not exist, a DHCP
//! range that makes no sense, or (checked against the store) an image that is not there.

use crate::bmc::{Bmc, BmcKind, PasswordSource};
use crate::mac::Mac;
use crate::store::{ImageRef, Store};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// A loaded and checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Serve only on this interface.
    pub interface: String,
    /// The appliance's address on `interface`, as clients reach it (default: the interface's
    /// first IPv4 address).
    pub address: Option<Ipv4Addr>,
    pub http_port: u16,
    /// Files served over TFTP and HTTP (relative paths are taken from the config file's folder).
    pub boot_dir: PathBuf,
    /// The image store: a folder (relative to the config file's) or `s3://bucket/prefix`.
    pub store: PathBuf,
    /// SQLite database of hosts, leases and events.
    pub state_dir: PathBuf,
    /// Bearer token for the admin API (else `FLEETBOOT_ADMIN_TOKEN`; no token: admin API off).
    pub admin_token: Option<String>,
    /// Send IPv6 router advertisements on the interface (iPXE waits ~12 s without any).
    pub router_advertisements: bool,
    /// How long an install token stays valid after the script hands it out.
    pub install_token_ttl: std::time::Duration,
    /// Who may read manifests and packs over HTTP.
    pub store_access: StoreAccess,
    /// Where agents fetch manifests and packs (`…/manifests/NAME/N.manifest`, `…/packs/ID.pack`):
    /// a mirror or cache of the store folder; `None`: this appliance's `/store`.
    pub store_url: Option<String>,
    /// Bytes of verified frames an appliance keeps in memory when its store is in object
    /// storage (least recently used evicted).
    pub frame_cache_bytes: u64,
    pub dhcp: Dhcp,
    pub boot_files: BootFiles,
    pub tftp: Tftp,
    pub http: Http,
    pub unknown_hosts: UnknownHosts,
    pub defaults: Assignment,
    pub groups: BTreeMap<String, Assignment>,
    pub hosts: BTreeMap<Mac, Host>,
    /// Hosts the file lists for other sites' appliances (`FLEETBOOT_SITE`), with their site:
    /// not this appliance's to serve, but named when asked for.
    pub other_sites: BTreeMap<Mac, String>,
    /// Discovery rules: how an inspected machine the YAML does not list is enrolled.
    pub rules: Vec<crate::rules::Rule>,
    /// Every image the configuration names, with where, for checking against the store.
    pub image_uses: Vec<ImageUse>,
    /// Files the configuration reads besides itself (`user_data_file`): a change to one is a
    /// change to the configuration.
    pub watched_files: Vec<PathBuf>,
}

/// DHCP settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Dhcp {
    #[serde(default)]
    pub mode: DhcpMode,
    /// First and last address handed out (full mode).
    #[serde(default)]
    pub range: Option<[Ipv4Addr; 2]>,
    #[serde(default)]
    pub subnet_mask: Option<Ipv4Addr>,
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds.
    #[serde(default = "default_lease_time")]
    pub lease_time: u32,
}

impl Default for Dhcp {
    fn default() -> Self {
        Dhcp {
            mode: DhcpMode::default(),
            range: None,
            subnet_mask: None,
            router: None,
            dns: Vec::new(),
            lease_time: default_lease_time(),
        }
    }
}

fn default_lease_time() -> u32 {
    3600
}

/// How the appliance takes part in DHCP.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Beside the site's DHCP server: boot information only (ports 67 and 4011), never an address.
    #[default]
    Proxy,
    /// The network's DHCP server: addresses from `range`, reservations per host, leases persisted.
    Full,
    /// No DHCP at all (another server points machines at the appliance).
    Off,
}

/// Boot loaders handed to each kind of firmware (files in `boot_dir`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootFiles {
    /// BIOS PXE ROMs (option 93 = 0), over TFTP.
    pub bios: String,
    /// UEFI x86-64 (option 93 = 7 or 9), over TFTP; `snponly.efi` starts faster where it works.
    pub uefi: String,
    /// UEFI ARM64 (option 93 = 11), over TFTP: by default Debian's signed shim for ARM64, which
    /// fetches `grubaa64.efi` (Debian's signed network GRUB) from beside it — with Secure Boot on
    /// or off, as Debian has no ARM64 iPXE. (The iPXE scripts name x86-64 files only.)
    pub arm64: String,
    /// UEFI x86-64 hosts with `secure_boot: true`: Debian's Microsoft-signed shim, which fetches
    /// `grubx64.efi` (Debian's signed network GRUB) from beside it.
    pub secure_boot: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            arm64: "shimaa64.efi".into(),
            secure_boot: "shimx64.efi".into(),
        }
    }
}

/// TFTP: whether it runs, and its limits.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Tftp {
    /// Whether the TFTP server runs (taken at start). Off, for a network whose firmware all
    /// boots over UEFI HTTP: nothing listens on UDP 69, and DHCP names no TFTP boot file (a PXE
    /// client gets an address only, in full mode, and no answer in proxy mode).
    pub enabled: bool,
    /// Largest block size granted (RFC 2348).
    pub blksize_max: u16,
    /// Largest window granted (RFC 7440).
    pub windowsize_max: u16,
    /// Transfers served at once.
    pub transfers_max: usize,
    /// Transfers served at once to one client address.
    pub transfers_per_client_max: usize,
    /// UDP port (69; another for tests and benchmarks beside a system TFTP server).
    pub port: u16,
}

impl Default for Tftp {
    fn default() -> Self {
        Tftp {
            enabled: true,
            blksize_max: 1468,
            windowsize_max: 16,
            transfers_max: 64,
            transfers_per_client_max: 4,
            port: 69,
        }
    }
}

/// HTTP limits (taken at start; a reload does not change them).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub connections_max: usize,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout_secs: u64,
    /// MiB of pack data held in memory for responses at once (stalled readers wait for it).
    pub buffered_mib_max: usize,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            connections_max: 1024,
            idle_timeout_secs: 60,
            buffered_mib_max: 256,
        }
    }
}

/// Who may read the store's manifests and packs over HTTP.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreAccess {
    /// A live install token (from the address it is bound to) or the admin token.
    #[default]
    Token,
    /// Anyone on the network (an HTTP cache in front of the appliance).
    Open,
    /// Agents read the store straight from its object storage, by URLs presigned for the
    /// objects of their install, valid for `install_token_ttl` (needs `store: s3://…` and agents
    /// of this version); the appliance still serves token holders what fails there.
    Direct,
}

/// Default of `install_token_ttl`.
pub const INSTALL_TOKEN_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

/// What a machine that is not in `hosts` gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnknownHosts {
    /// Silence: no DHCP answer at all.
    Ignore,
    /// Recorded as discovered and told to boot its local disk.
    Discover,
    /// Installed with this image.
    Install(ImageRef),
}

/// Image, disk and identity, as `defaults` and `groups` give them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub image: Option<ImageRef>,
    pub disk: Option<DiskChoice>,
    pub wipe: Option<WipeMode>,
    pub secure_boot: Option<bool>,
    pub identity: IdentityKeys,
}

/// The identity keys as one level (defaults, a group, a host) gives them; a host takes each key
/// from the most specific level that has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityKeys {
    pub hostname: Option<String>,
    pub ssh_authorized_keys: Option<Vec<String>>,
    /// cloud-config (or a script), inline or read from `user_data_file`.
    pub user_data: Option<String>,
    pub network: Option<NetworkKeys>,
    pub cloud_init: Option<CloudInit>,
}

/// `network:` as one level gives it: a host its own address; the defaults and a group the
/// gateway and DNS servers their hosts share. Merged key by key, like the identity keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkKeys {
    /// The address and its prefix length (host level only).
    pub address: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl NetworkKeys {
    fn over(&self, more_general: &NetworkKeys) -> NetworkKeys {
        NetworkKeys {
            address: self.address.or(more_general.address),
            gateway: self.gateway.or(more_general.gateway),
            dns: self.dns.clone().or_else(|| more_general.dns.clone()),
        }
    }

    /// A host's static network, if it has an address; else it takes DHCP.
    fn static_network(&self) -> Option<StaticNetwork> {
        let (address, prefix) = self.address?;
        Some(StaticNetwork {
            address,
            prefix,
            gateway: self.gateway,
            dns: self.dns.clone().unwrap_or_default(),
        })
    }
}

/// How the installed OS gets its cloud-init data (`cloud_init:`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloudInit {
    /// The agent writes a NoCloud `cidata` partition after the image (skipped, with a message,
    /// for an image without a partition table; a partitioned disk without room fails the
    /// install). The data is served as NoCloud-net as well.
    #[default]
    Seed,
    /// Nothing is written to the disk; the data is still served as NoCloud-net
    /// (`/meta/{mac}/`) for images configured to fetch it.
    Off,
}

impl IdentityKeys {
    /// Each key from `self`, else from `more_general`.
    fn over(&self, more_general: &IdentityKeys) -> IdentityKeys {
        IdentityKeys {
            hostname: self
                .hostname
                .clone()
                .or_else(|| more_general.hostname.clone()),
            ssh_authorized_keys: self
                .ssh_authorized_keys
                .clone()
                .or_else(|| more_general.ssh_authorized_keys.clone()),
            user_data: self
                .user_data
                .clone()
                .or_else(|| more_general.user_data.clone()),
            network: match (&self.network, &more_general.network) {
                (Some(own), Some(general)) => Some(own.over(general)),
                (own, general) => own.clone().or_else(|| general.clone()),
            },
            cloud_init: self.cloud_init.or(more_general.cloud_init),
        }
    }
}

/// What the installed OS is told about itself on its first boot (through cloud-init).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub ssh_authorized_keys: Vec<String>,
    pub user_data: Option<String>,
    /// A static address for the installed OS; `None`: DHCP.
    pub network: Option<StaticNetwork>,
    pub cloud_init: CloudInit,
}

/// `network: { address: 10.0.0.5/24, gateway: 10.0.0.1, dns: [10.0.0.1] }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticNetwork {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// One machine the appliance serves, with its group and defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub mac: Mac,
    /// The image to install (`None`: boot the local disk).
    pub image: Option<ImageRef>,
    /// The installed OS's hostname (`{mac}` in a group's or the defaults' is the host's MAC,
    /// 12 hex digits).
    pub hostname: Option<String>,
    pub identity: Identity,
    pub group: Option<String>,
    /// Which disk the image goes on.
    pub disk: DiskChoice,
    /// How its disks are wiped when it is retired.
    pub wipe: WipeMode,
    /// UEFI x86-64 PXE gets the signed chain (shim → GRUB → Debian's kernel over TFTP), which
    /// boots with Secure Boot on or off, instead of iPXE (not UEFI HTTP boot, not ARM64 yet).
    pub secure_boot: bool,
    /// Reserved address (full DHCP mode).
    pub ip: Option<Ipv4Addr>,
    /// Its BMC (`bmc:`), for power and a one-time network boot.
    pub bmc: Option<Bmc>,
}

/// `disk:` — a name (`auto`, a device path, a serial or a WWN) or hints (`{ size: ">=400G",
/// rotational: false, … }`: every one given must hold, and exactly one disk may match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskChoice {
    Name(String),
    Hints(fleetboot_image::hints::DiskHints),
}

/// A string is a name, a mapping is hints — read as such, so a wrong hint key is named in the
/// error (an untagged enum would only say that nothing matched).
impl<'de> Deserialize<'de> for DiskChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Choice;
        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = DiskChoice;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a disk (auto, a path, a serial or a WWN) or hints { size, model, … }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DiskChoice, E> {
                Ok(DiskChoice::Name(v.to_string()))
            }
            // A serial written bare may read as a number.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DiskChoice, E> {
                Ok(DiskChoice::Name(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DiskChoice, E> {
                Ok(DiskChoice::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DiskChoice, A::Error> {
                fleetboot_image::hints::DiskHints::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )
                .map(DiskChoice::Hints)
            }
        }
        d.deserialize_any(Choice)
    }
}

impl Default for DiskChoice {
    fn default() -> Self {
        DiskChoice::Name("auto".into())
    }
}

/// `wipe:` — how a retired host's disks are wiped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WipeMode {
    /// Discard where the disk can, and zero its first and last 16 MiB and every partition's
    /// first and last MiB (MAAS's quick erase).
    #[default]
    Quick,
    /// The drive's own secure erase (secure discard); a drive without it fails the wipe.
    Secure,
}

/// An image named by the configuration, and where.
#[derive(Clone, Debug)]
pub struct ImageUse {
    pub image: ImageRef,
    pub line: u64,
    pub column: u64,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}{}", if error.kind() == std::io::ErrorKind::NotFound {
        " (give the configuration with --config or FLEETBOOT_CONFIG)"
    } else {
        ""
    })]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{path}: {message}")]
    Whole { path: PathBuf, message: String },
}

// ---- the YAML as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    address: Option<Ipv4Addr>,
    #[serde(default = "default_http_port")]
    http_port: u16,
    #[serde(default = "default_boot_dir")]
    boot_dir: PathBuf,
    #[serde(default = "default_store")]
    store: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    admin_token: Option<String>,
    #[serde(default)]
    router_advertisements: bool,
    #[serde(default)]
    install_token_ttl: Option<Spanned<String>>,
    #[serde(default)]
    store_access: StoreAccess,
    #[serde(default)]
    store_url: Option<Spanned<String>>,
    #[serde(default = "default_frame_cache_bytes")]
    frame_cache_bytes: u64,
    #[serde(default)]
    dhcp: Dhcp,
    #[serde(default)]
    boot_files: BootFiles,
    #[serde(default)]
    tftp: Tftp,
    #[serde(default)]
    http: Http,
    #[serde(default)]
    unknown_hosts: Option<Spanned<String>>,
    #[serde(default)]
    defaults: RawAssignment,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<RawAssignment>>,
    #[serde(default)]
    hosts: BTreeMap<String, Spanned<RawHost>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

/// `{ match: { product: …, memory: ">=256G" }, image: …, group: … }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    matches: RawMatch,
    #[serde(default)]
    image: Option<Spanned<String>>,
    #[serde(default)]
    group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    vendor: Option<String>,
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    cpus: Option<serde_json::Value>,
    #[serde(default)]
    memory: Option<String>,
}

fn default_http_port() -> u16 {
    80
}
fn default_boot_dir() -> PathBuf {
    PathBuf::from("boot")
}
fn default_frame_cache_bytes() -> u64 {
    1 << 30
}

fn default_store() -> PathBuf {
    PathBuf::from("/var/lib/fleetboot/store")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetboot")
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssignment {
    #[serde(default)]
    image: Option<Spanned<String>>,
    #[serde(default)]
    disk: Option<Spanned<DiskChoice>>,
    #[serde(default)]
    wipe: Option<WipeMode>,
    #[serde(default)]
    secure_boot: Option<bool>,
    // The identity keys (see `RawIdentity`), written out: serde's flatten would lose their
    // line numbers.
    #[serde(default)]
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    ssh_authorized_keys: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    user_data: Option<Spanned<String>>,
    #[serde(default)]
    user_data_file: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    cloud_init: Option<CloudInit>,
    #[serde(default)]
    bmc: Option<Spanned<RawBmc>>,
    #[serde(default)]
    site: Option<String>,
}

/// `bmc:` as one level wrote it: each key may come from the host, its group or the defaults
/// (a group gives type and credentials, each host its address).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBmc {
    #[serde(rename = "type", default)]
    kind: Option<BmcKind>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    cipher_suite: Option<u8>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    tls_verify: Option<bool>,
}

/// The identity keys as one level wrote them.
struct RawIdentity<'a> {
    hostname: &'a Option<Spanned<String>>,
    ssh_authorized_keys: &'a Option<Spanned<Vec<String>>>,
    user_data: &'a Option<Spanned<String>>,
    user_data_file: &'a Option<Spanned<String>>,
    network: &'a Option<Spanned<RawNetwork>>,
    cloud_init: Option<CloudInit>,
}

/// Implements `identity()` for a level that has the identity keys.
macro_rules! raw_identity {
    ($t:ty) => {
        impl $t {
            fn identity(&self) -> RawIdentity<'_> {
                RawIdentity {
                    hostname: &self.hostname,
                    ssh_authorized_keys: &self.ssh_authorized_keys,
                    user_data: &self.user_data,
                    user_data_file: &self.user_data_file,
                    network: &self.network,
                    cloud_init: self.cloud_init,
                }
            }
        }
    };
}
raw_identity!(RawAssignment);
raw_identity!(RawHost);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
    #[serde(default)]
    dns: Option<Vec<Ipv4Addr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    #[serde(default)]
    image: Option<Spanned<String>>,
    #[serde(default)]
    group: Option<Spanned<String>>,
    #[serde(default)]
    disk: Option<Spanned<DiskChoice>>,
    #[serde(default)]
    wipe: Option<WipeMode>,
    #[serde(default)]
    secure_boot: Option<bool>,
    #[serde(default)]
    ip: Option<Ipv4Addr>,
    #[serde(default)]
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    ssh_authorized_keys: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    user_data: Option<Spanned<String>>,
    #[serde(default)]
    user_data_file: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    cloud_init: Option<CloudInit>,
    #[serde(default)]
    bmc: Option<Spanned<RawBmc>>,
    #[serde(default)]
    site: Option<String>,
}

/// A host's `bmc:` from its own, its group's and the defaults' keys (most specific first;
/// relative files are beside the configuration). `None` when no level gives an address; an
/// error names the most specific level's line. `files_here`: whether its password and CA files
/// must be on this machine (not for another site's host: each site keeps its own secrets).
fn resolve_bmc(
    levels: &[Option<&Spanned<RawBmc>>],
    base: &Path,
    files_here: bool,
    at: &dyn Fn(&serde_saphyr::Location, String) -> ConfigError,
) -> Result<Option<Bmc>, ConfigError> {
    let given: Vec<&Spanned<RawBmc>> = levels.iter().flatten().copied().collect();
    let Some(first) = given.first() else {
        return Ok(None);
    };
    let err = |m: String| at(&first.referenced, format!("bmc: {m}"));
    macro_rules! pick {
        ($f:ident) => {
            given.iter().find_map(|l| l.value.$f.clone())
        };
    }
    for level in &given {
        if level.value.password_file.is_some() && level.value.password_env.is_some() {
            return Err(at(
                &level.referenced,
                "bmc: give password_file or password_env, not both".into(),
            ));
        }
    }
    // A host has a BMC when some level gives its address: defaults and groups give the rest.
    let Some(address) = pick!(address) else {
        return Ok(None);
    };
    if address.trim().is_empty() {
        return Err(err("the address is empty".into()));
    }
    let kind = pick!(kind).ok_or_else(|| err("no type (ipmi or redfish)".into()))?;
    let username = pick!(username).ok_or_else(|| err("no username".into()))?;
    // The password keys count as one: the most specific level that has either decides.
    let password = given
        .iter()
        .find_map(|l| match (&l.value.password_file, &l.value.password_env) {
            (Some(f), _) => Some(PasswordSource::File(base.join(f))),
            (None, Some(e)) => Some(PasswordSource::Env(e.clone())),
            _ => None,
        })
        .ok_or_else(|| {
            err(
                "no password_file or password_env (a password is never written in the \
                 configuration itself)"
                    .into(),
            )
        })?;
    if let (PasswordSource::File(path), true) = (&password, files_here) {
        if !path.is_file() {
            return Err(err(format!(
                "password_file {} does not exist",
                path.display()
            )));
        }
    }
    let ca_file = pick!(ca_file).map(|f| base.join(f));
    if let (Some(path), true) = (&ca_file, files_here) {
        if !path.is_file() {
            return Err(err(format!("ca_file {} does not exist", path.display())));
        }
    }
    Ok(Some(Bmc {
        kind,
        address,
        port: pick!(port),
        username,
        password,
        cipher_suite: pick!(cipher_suite),
        system: pick!(system),
        ca_file,
        tls_verify: pick!(tls_verify).unwrap_or(true),
    }))
}

/// Checks one level's identity keys: a hostname a DNS label could be, user data that cloud-init
/// reads (`#cloud-config` YAML, a script, or MIME parts), inline or from a file beside the
/// configuration, never both; SSH keys that look like keys; a static address with its prefix.
fn identity_keys(
    r: &RawIdentity<'_>,
    host_level: bool,
    base: &Path,
    files: &mut Vec<PathBuf>,
    at: &dyn Fn(&serde_saphyr::Location, String) -> ConfigError,
) -> Result<IdentityKeys, ConfigError> {
    if let Some(h) = &r.hostname {
        let name = h.value.replace("{mac}", "525400000000");
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(at(
                &h.referenced,
                format!(
                    "hostname {:?} is not a valid host name (dot-separated labels of letters, \
                     digits, '-' and '_', each at most 63; `{{mac}}` for the MAC)",
                    h.value
                ),
            ));
        }
    }
    if let Some(n) = r.network {
        match (&n.value.address, host_level) {
            (Some(_), false) => {
                return Err(at(
                    &n.referenced,
                    "a static address belongs to one host: give network.address in that host's \
                     entry (the defaults and a group may give gateway and dns)"
                        .into(),
                ))
            }
            (None, true) => {
                return Err(at(
                    &n.referenced,
                    "a host's network needs its address (address: A/P, e.g. 10.0.0.5/24); \
                     gateway and dns alone belong in a group or the defaults"
                        .into(),
                ))
            }
            _ => {}
        }
    }
    if let Some(keys) = &r.ssh_authorized_keys {
        for k in &keys.value {
            // `[options] type base64 [comment]`, as in authorized_keys.
            let words: Vec<&str> = k.split_whitespace().collect();
            let kind = words.iter().position(|w| {
                w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-")
            });
            if kind.is_none_or(|i| i + 1 >= words.len()) {
                return Err(at(
                    &keys.referenced,
                    format!("{k:?} is not an SSH public key (expected e.g. \"ssh-ed25519 AAAA… comment\")"),
                ));
            }
        }
    }
    let user_data = match (r.user_data, r.user_data_file) {
        (Some(_), Some(f)) => {
            return Err(at(
                &f.referenced,
                "give user_data or user_data_file, not both".into(),
            ))
        }
        (Some(inline), None) => Some((inline.value.clone(), &inline.referenced)),
        (None, Some(f)) => {
            let path = base.join(&f.value);
            files.push(path.clone());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                at(
                    &f.referenced,
                    format!("user_data_file {}: {e}", path.display()),
                )
            })?;
            Some((text, &f.referenced))
        }
        (None, None) => None,
    };
    if let Some((text, loc)) = &user_data {
        check_user_data(text).map_err(|why| at(loc, format!("user data: {why}")))?;
    }
    let network = match r.network {
        None => None,
        Some(n) => {
            let address = match &n.value.address {
                None => None,
                Some(text) => {
                    let bad = || {
                        at(
                            &n.referenced,
                            format!(
                                "network.address {text:?} is not an address with its prefix, \
                                 e.g. 10.0.0.5/24"
                            ),
                        )
                    };
                    let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
                    let address: Ipv4Addr = addr.trim().parse().map_err(|_| bad())?;
                    let prefix: u8 = prefix.trim().parse().map_err(|_| bad())?;
                    if !(1..=32).contains(&prefix) {
                        return Err(bad());
                    }
                    Some((address, prefix))
                }
            };
            Some(NetworkKeys {
                address,
                gateway: n.value.gateway,
                dns: n.value.dns.clone(),
            })
        }
    };
    Ok(IdentityKeys {
        hostname: r.hostname.as_ref().map(|h| h.value.clone()),
        ssh_authorized_keys: r.ssh_authorized_keys.as_ref().map(|k| k.value.clone()),
        user_data: user_data.map(|(t, _)| t),
        network,
        cloud_init: r.cloud_init,
    })
}

/// What cloud-init accepts as user data: `#cloud-config` followed by a YAML mapping, a script
/// (`#!`), an include or boothook, or MIME parts.
fn check_user_data(text: &str) -> Result<(), String> {
    let first = text.lines().next().unwrap_or("").trim_end();
    if first == "#cloud-config" {
        let parsed: Result<serde_json::Value, _> = serde_saphyr::from_str(text);
        return match parsed {
            Ok(serde_json::Value::Object(_)) | Ok(serde_json::Value::Null) => Ok(()),
            Ok(_) => Err("#cloud-config must be a YAML mapping".into()),
            Err(e) => Err(format!(
                "#cloud-config is not valid YAML (lines counted from the user data's first): {}",
                first_line(&e.without_snippet().to_string())
            )),
        };
    }
    let known = [
        "#!",
        "#include",
        "#cloud-boothook",
        "#cloud-config-archive",
        "#cloud-config-jsonp",
        "#part-handler",
        "## template: jinja",
        "Content-Type:",
    ];
    if known.iter().any(|p| first.starts_with(p)) {
        return Ok(());
    }
    Err(
        "must begin with #cloud-config (or be a #! script, #include, #cloud-boothook or MIME)"
            .into(),
    )
}

/// A configured hostname with `{mac}` replaced by the host's MAC, 12 hex digits.
fn hostname_for(name: &str, mac: Mac) -> String {
    name.replace("{mac}", &mac.to_string().replace(':', ""))
}

impl Config {
    /// The host `mac` as the configuration resolves it; a MAC it does not list gets the
    /// defaults (what `unknown_hosts: install` installs it as).
    pub fn host_or_defaults(&self, mac: Mac) -> Host {
        self.host_for(mac, None)
    }

    /// The discovery rule an inspected machine the YAML does not list falls under (the first
    /// its inventory matches), with its index.
    pub fn rule_for(
        &self,
        mac: Mac,
        inventory: Option<&fleetboot_image::api::Inventory>,
    ) -> Option<(usize, &crate::rules::Rule)> {
        if self.hosts.contains_key(&mac) {
            return None;
        }
        crate::rules::first_match(&self.rules, inventory?)
    }

    /// The host `mac` as the configuration resolves it: its entry; else, with an inventory
    /// that a rule matches, the rule's image and its group's keys; else the defaults.
    pub fn host_for(&self, mac: Mac, inventory: Option<&fleetboot_image::api::Inventory>) -> Host {
        if let Some(h) = self.hosts.get(&mac) {
            return h.clone();
        }
        let rule = self.rule_for(mac, inventory).map(|(_, r)| r);
        let group = rule
            .and_then(|r| r.group.as_ref())
            .and_then(|g| Some((g.clone(), self.groups.get(g)?)));
        let keys = match &group {
            Some((_, g)) => g.identity.over(&self.defaults.identity),
            None => self.defaults.identity.clone(),
        };
        Host {
            mac,
            image: rule
                .and_then(|r| r.image.clone())
                .or_else(|| group.as_ref().and_then(|(_, g)| g.image.clone()))
                .or_else(|| self.defaults.image.clone()),
            hostname: keys.hostname.as_ref().map(|n| hostname_for(n, mac)),
            identity: Identity {
                ssh_authorized_keys: keys.ssh_authorized_keys.clone().unwrap_or_default(),
                user_data: keys.user_data.clone(),
                network: None,
                cloud_init: keys.cloud_init.unwrap_or_default(),
            },
            disk: group
                .as_ref()
                .and_then(|(_, g)| g.disk.clone())
                .or_else(|| self.defaults.disk.clone())
                .unwrap_or_default(),
            wipe: group
                .as_ref()
                .and_then(|(_, g)| g.wipe)
                .or(self.defaults.wipe)
                .unwrap_or_default(),
            secure_boot: group
                .as_ref()
                .and_then(|(_, g)| g.secure_boot)
                .or(self.defaults.secure_boot)
                .unwrap_or(false),
            group: group.map(|(name, _)| name),
            ip: None,
            bmc: None,
        }
    }

    /// Reads and checks the file at `path` (images are checked separately, see
    /// [`Config::check_images`]).
    ///
    /// Several appliances may share one file, one per provisioning network: each is told its
    /// own `site` by `FLEETBOOT_SITE` and knows only the hosts of its site (and those that name
    /// none); the others are not its to answer, list or power.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let site = std::env::var("FLEETBOOT_SITE")
            .ok()
            .filter(|s| !s.is_empty());
        Self::parse_at_site(path, &text, site.as_deref())
    }

    /// Parses and checks configuration text; `path` is used in errors and to resolve relative
    /// folders.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::parse_at_site(path, text, None)
    }

    /// [`Config::parse`] for the appliance of `site` (`None`: every host).
    pub fn parse_at_site(
        path: &Path,
        text: &str,
        site: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| yaml_error(path, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let at = |loc: &serde_saphyr::Location, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: loc.line(),
            column: loc.column(),
            message,
        };
        let mut image_uses = Vec::new();
        let mut image = |s: &Spanned<String>| -> Result<ImageRef, ConfigError> {
            let r: ImageRef = s
                .value
                .parse()
                .map_err(|e| at(&s.referenced, format!("{e}")))?;
            image_uses.push(ImageUse {
                image: r.clone(),
                line: s.referenced.line(),
                column: s.referenced.column(),
            });
            Ok(r)
        };

        if raw.interface.trim().is_empty() {
            return Err(ConfigError::Whole {
                path: path.to_path_buf(),
                message: "`interface` is empty: name the provisioning interface".into(),
            });
        }
        let unknown_hosts = match &raw.unknown_hosts {
            None => UnknownHosts::Ignore,
            Some(s) => match s.value.as_str() {
                "ignore" => UnknownHosts::Ignore,
                "discover" => UnknownHosts::Discover,
                v => match v.strip_prefix("install:") {
                    Some(img) => UnknownHosts::Install(image(&Spanned::new(
                        img.to_string(),
                        s.referenced,
                        s.defined,
                    ))?),
                    None => {
                        return Err(at(
                            &s.referenced,
                            format!(
                            "unknown_hosts is {v:?}; expected ignore, discover or install:<image>"
                        ),
                        ))
                    }
                },
            },
        };
        let store_url = match &raw.store_url {
            None => None,
            Some(s) => {
                let url = s.value.trim_end_matches('/');
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
                    return Err(at(
                        &s.referenced,
                        format!(
                            "store_url is {:?}; expected an http:// or https:// URL of a copy of \
                             the store folder, e.g. http://10.0.0.5/fleetboot-store",
                            s.value
                        ),
                    ));
                }
                Some(url.to_string())
            }
        };
        let install_token_ttl = match &raw.install_token_ttl {
            None => INSTALL_TOKEN_TTL_DEFAULT,
            Some(s) => humantime::parse_duration(&s.value)
                .ok()
                .filter(|d| d.as_secs() >= 60)
                .ok_or_else(|| {
                    at(
                        &s.referenced,
                        format!(
                            "install_token_ttl is {:?}; expected a duration of at least a minute, e.g. 4h or 90m",
                            s.value
                        ),
                    )
                })?,
        };
        // A level's `disk`, its hints checked (a size that is no comparison, no hint at all).
        let disk_choice =
            |d: &Option<Spanned<DiskChoice>>| -> Result<Option<DiskChoice>, ConfigError> {
                match d {
                    Some(Spanned {
                        value: DiskChoice::Hints(h),
                        referenced,
                        ..
                    }) => {
                        h.check()
                            .map_err(|e| at(referenced, format!("disk hints: {e}")))?;
                        Ok(Some(DiskChoice::Hints(h.clone())))
                    }
                    Some(s) => Ok(Some(s.value.clone())),
                    None => Ok(None),
                }
            };
        let mut watched = Vec::new();
        let mut identity = |r: &RawIdentity<'_>, host_level: bool| {
            identity_keys(r, host_level, base, &mut watched, &at)
        };
        let defaults = Assignment {
            image: raw.defaults.image.as_ref().map(&mut image).transpose()?,
            disk: disk_choice(&raw.defaults.disk)?,
            wipe: raw.defaults.wipe,
            secure_boot: raw.defaults.secure_boot,
            identity: identity(&raw.defaults.identity(), false)?,
        };
        let mut groups = BTreeMap::new();
        for (name, g) in &raw.groups {
            groups.insert(
                name.clone(),
                Assignment {
                    image: g.value.image.as_ref().map(&mut image).transpose()?,
                    disk: disk_choice(&g.value.disk)?,
                    wipe: g.value.wipe,
                    secure_boot: g.value.secure_boot,
                    identity: identity(&g.value.identity(), false)?,
                },
            );
        }
        let mut hosts = BTreeMap::new();
        let mut other_sites = BTreeMap::new();
        // Addresses are unique within a site (sites are separate networks; `None`: no site).
        let mut reserved: BTreeSet<(Option<String>, Ipv4Addr)> = BTreeSet::new();
        let mut static_addresses: BTreeSet<(Option<String>, Ipv4Addr)> = BTreeSet::new();
        for (key, h) in &raw.hosts {
            let mac: Mac = key
                .parse()
                .map_err(|e| at(&h.referenced, format!("host key: {e}")))?;
            let group = match &h.value.group {
                Some(g) if !groups.contains_key(&g.value) => {
                    return Err(at(
                        &g.referenced,
                        format!(
                            "host {mac} names group {:?}, which `groups` does not define",
                            g.value
                        ),
                    ))
                }
                Some(g) => Some(g.value.clone()),
                None => None,
            };
            let from_group = group.as_ref().and_then(|g| groups.get(g));
            let host_site = h
                .value
                .site
                .as_ref()
                .or_else(|| {
                    group
                        .as_ref()
                        .and_then(|g| raw.groups.get(g)?.value.site.as_ref())
                })
                .or(raw.defaults.site.as_ref());
            let own_image = h.value.image.as_ref().map(&mut image).transpose()?;
            if let Some(ip) = h.value.ip {
                if !reserved.insert((host_site.cloned(), ip)) {
                    return Err(at(
                        &h.referenced,
                        format!("address {ip} is reserved for two hosts"),
                    ));
                }
            }
            let general = match from_group {
                Some(g) => g.identity.over(&defaults.identity),
                None => defaults.identity.clone(),
            };
            let keys = identity(&h.value.identity(), true)?.over(&general);
            let network = keys.network.as_ref().and_then(NetworkKeys::static_network);
            if let Some(n) = &network {
                if !static_addresses.insert((host_site.cloned(), n.address)) {
                    return Err(at(
                        &h.referenced,
                        format!("static address {} is given to two hosts", n.address),
                    ));
                }
            }
            let elsewhere =
                matches!((site, host_site), (Some(mine), Some(theirs)) if mine != theirs);
            let bmc = resolve_bmc(
                &[
                    h.value.bmc.as_ref(),
                    group
                        .as_ref()
                        .and_then(|g| raw.groups.get(g))
                        .and_then(|g| g.value.bmc.as_ref()),
                    raw.defaults.bmc.as_ref(),
                ],
                base,
                !elsewhere,
                &at,
            )?;
            let host = Host {
                mac,
                bmc,
                image: own_image
                    .or_else(|| from_group.and_then(|g| g.image.clone()))
                    .or_else(|| defaults.image.clone()),
                hostname: keys.hostname.map(|n| hostname_for(&n, mac)),
                identity: Identity {
                    ssh_authorized_keys: keys.ssh_authorized_keys.unwrap_or_default(),
                    user_data: keys.user_data,
                    network,
                    cloud_init: keys.cloud_init.unwrap_or_default(),
                },
                disk: disk_choice(&h.value.disk)?
                    .or_else(|| from_group.and_then(|g| g.disk.clone()))
                    .or_else(|| defaults.disk.clone())
                    .unwrap_or_default(),
                wipe: h
                    .value
                    .wipe
                    .or_else(|| from_group.and_then(|g| g.wipe))
                    .or(defaults.wipe)
                    .unwrap_or_default(),
                secure_boot: h
                    .value
                    .secure_boot
                    .or_else(|| from_group.and_then(|g| g.secure_boot))
                    .or(defaults.secure_boot)
                    .unwrap_or(false),
                group,
                ip: h.value.ip,
            };
            if let (true, Some(theirs)) = (elsewhere, host_site) {
                // Another appliance's: checked like every host (but for files only that site
                // keeps), then left out.
                other_sites.insert(mac, theirs.clone());
                continue;
            }
            if hosts.insert(mac, host).is_some() {
                return Err(at(&h.referenced, format!("host {mac} is listed twice")));
            }
        }
        let mut rules = Vec::new();
        for r in &raw.rules {
            let bad = |m: String| at(&r.referenced, format!("rule: {m}"));
            let m = &r.value.matches;
            let compare = |key: &str, v: Option<String>| {
                v.map(|t| {
                    crate::rules::Comparison::parse(&t).map_err(|e| bad(format!("{key}: {e}")))
                })
                .transpose()
            };
            let cpus = m.cpus.as_ref().map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            let matches = crate::rules::Match {
                vendor: m.vendor.clone(),
                product: m.product.clone(),
                serial: m.serial.clone(),
                cpus: compare("cpus", cpus)?,
                memory: compare("memory", m.memory.clone())?,
            };
            let group = match &r.value.group {
                Some(g) if !groups.contains_key(&g.value) => {
                    return Err(at(
                        &g.referenced,
                        format!(
                            "rule names group {:?}, which `groups` does not define",
                            g.value
                        ),
                    ))
                }
                Some(g) => Some(g.value.clone()),
                None => None,
            };
            let image = r.value.image.as_ref().map(&mut image).transpose()?;
            let has_image = image.is_some()
                || group
                    .as_ref()
                    .and_then(|g| groups.get(g))
                    .is_some_and(|g| g.image.is_some())
                || defaults.image.is_some();
            if !has_image {
                return Err(bad(
                    "no image: give the rule an image, or a group (or defaults) with one".into(),
                ));
            }
            rules.push(crate::rules::Rule {
                matches,
                image,
                group,
                line: r.referenced.line(),
            });
        }
        let whole = |message: String| ConfigError::Whole {
            path: path.to_path_buf(),
            message,
        };
        if raw.dhcp.mode == DhcpMode::Full {
            let Some([first, last]) = raw.dhcp.range else {
                return Err(whole("dhcp.mode is full but dhcp.range is missing".into()));
            };
            if u32::from(first) > u32::from(last) {
                return Err(whole(format!(
                    "dhcp.range starts at {first}, after its end {last}"
                )));
            }
        }
        if let Some(mine) = site {
            // A mistyped FLEETBOOT_SITE would leave the appliance serving no host, silently.
            let named: BTreeSet<&str> = raw
                .defaults
                .site
                .iter()
                .chain(raw.groups.values().filter_map(|g| g.value.site.as_ref()))
                .chain(raw.hosts.values().filter_map(|h| h.value.site.as_ref()))
                .map(String::as_str)
                .collect();
            if !named.is_empty() && !named.contains(mine) {
                return Err(whole(format!(
                    "FLEETBOOT_SITE is {mine:?}, a site the file does not name (it names {})",
                    named.iter().copied().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        if raw.dhcp.lease_time < 60 {
            return Err(whole("dhcp.lease_time is under 60 seconds".into()));
        }
        if raw.http.connections_max == 0
            || raw.http.idle_timeout_secs == 0
            || raw.http.buffered_mib_max < 16
        {
            return Err(whole(
                "http: connections_max and idle_timeout_secs must be at least 1, buffered_mib_max \
                 at least 16 (one frame's range)"
                    .into(),
            ));
        }
        if raw.store_access == StoreAccess::Direct
            && !raw.store.to_string_lossy().starts_with("s3://")
        {
            return Err(whole(format!(
                "store_access: direct sends agents to the store's object storage, but store is {} \
                 (a folder): give store: s3://BUCKET/PREFIX, or store_access: token",
                raw.store.display()
            )));
        }
        if raw.tftp.blksize_max < 512 || raw.tftp.windowsize_max == 0 || raw.tftp.transfers_max == 0
        {
            return Err(whole(
                "tftp: blksize_max must be at least 512, windowsize_max and transfers_max at least 1".into(),
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            interface: raw.interface,
            address: raw.address,
            http_port: raw.http_port,
            boot_dir: base.join(raw.boot_dir),
            store: store_at(base, raw.store),
            state_dir: base.join(raw.state_dir),
            admin_token: raw.admin_token,
            router_advertisements: raw.router_advertisements,
            install_token_ttl,
            store_access: raw.store_access,
            store_url,
            frame_cache_bytes: raw.frame_cache_bytes,
            dhcp: raw.dhcp,
            boot_files: raw.boot_files,
            tftp: raw.tftp,
            http: raw.http,
            unknown_hosts,
            defaults,
            groups,
            hosts,
            other_sites,
            rules,
            image_uses,
            watched_files: watched,
        })
    }

    /// Only the store a configuration file names (its `store:`, resolved as [`Config::load`]
    /// does), for the store's own commands: a mistake elsewhere in the file does not stop them.
    pub fn store_of(path: &Path) -> Result<PathBuf, ConfigError> {
        #[derive(Deserialize)]
        struct StoreOnly {
            #[serde(default = "default_store")]
            store: PathBuf,
        }
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let raw: StoreOnly = serde_saphyr::from_str(&text).map_err(|e| yaml_error(path, &e))?;
        Ok(store_at(path.parent().unwrap_or(Path::new(".")), raw.store))
    }

    /// Fails on the first image the configuration names that the store does not hold.
    pub fn check_images(&self, store: &Store) -> Result<(), ConfigError> {
        for u in &self.image_uses {
            if let Err(e) = store.resolve(&u.image) {
                return Err(ConfigError::Invalid {
                    path: self.path.clone(),
                    line: u.line,
                    column: u.column,
                    message: format!("image {}: {e}", u.image),
                });
            }
        }
        Ok(())
    }
}

/// The store `store:` names: an object store's address as written, a folder relative to the
/// configuration file's.
fn store_at(base: &Path, store: PathBuf) -> PathBuf {
    if store.to_string_lossy().starts_with("s3://") {
        store
    } else {
        base.join(store)
    }
}

/// A YAML or type error at its place in `path`. The parser's own "at line L, column C" and its
/// advice about parser options are left out: the place is given once, in front.
fn yaml_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = first_line(&e.without_snippet().to_string());
    if let Some(cut) = message.find(", set DuplicateKeyPolicy") {
        message.truncate(cut);
    }
    if let Some(cut) = message.rfind(" at line ") {
        let place = &message[cut + " at line ".len()..];
        let numbers = place.split_once(", column ");
        if numbers.is_some_and(|(l, c)| {
            [l, c]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }) {
            message.truncate(cut);
        }
    }
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/fleetboot/fleetboot.yaml"), text)
    }

    const GOOD: &str = r#"
interface: br-prov
http_port: 8080
boot_dir: boot
dhcp:
  mode: full
  range: [10.0.0.100, 10.0.0.200]
  router: 10.0.0.1
  dns: [10.0.0.1]
unknown_hosts: install:debian@2
defaults: { image: debian, disk: auto }
groups:
  web: { image: web@3, disk: /dev/nvme0n1 }
hosts:
  "52:54:00:12:34:56": { hostname: web-01, group: web }
  "52:54:00:12:34:57": { image: other, ip: 10.0.0.7 }
  "52:54:00:12:34:58": {}
"#;

    #[test]
    fn a_shared_file_gives_each_site_its_own_hosts() {
        let text = r#"
interface: eth1
groups:
  rack-a: { image: web, site: a }
  rack-b: { image: web, site: b }
hosts:
  "52:54:00:00:00:01": { group: rack-a, ip: 10.0.0.7 }
  "52:54:00:00:00:02": { group: rack-b, ip: 10.0.0.7 }
  "52:54:00:00:00:03": { group: rack-b, site: a }
  "52:54:00:00:00:04": {}
"#;
        let path = Path::new("/etc/fleetboot/fleetboot.yaml");
        let macs = |site: Option<&str>| -> Vec<String> {
            let c = Config::parse_at_site(path, text, site).unwrap();
            c.hosts.keys().map(|m| m.to_string()).collect()
        };
        assert_eq!(
            macs(Some("a")),
            [
                "52:54:00:00:00:01",
                "52:54:00:00:00:03",
                "52:54:00:00:00:04"
            ]
        );
        assert_eq!(macs(Some("b")), ["52:54:00:00:00:02", "52:54:00:00:00:04"]);
        assert_eq!(macs(None).len(), 4, "no site: every host");
        let typo = Config::parse_at_site(path, text, Some("c")).unwrap_err();
        assert!(typo.to_string().contains("it names a, b"), "{typo}");
        // Each site keeps its own BMC password files: site a's appliance does not need b's.
        let b_secrets = text
            .replace(
                "rack-b: { image: web, site: b }",
                "rack-b: { image: web, site: b, bmc: { type: ipmi, username: admin, \
             password_file: /nonexistent/b.pw } }",
            )
            .replace(
                "{ group: rack-b, ip: 10.0.0.7 }",
                "{ group: rack-b, ip: 10.0.0.7, bmc: { address: 10.0.1.2 } }",
            );
        let a = Config::parse_at_site(path, &b_secrets, Some("a")).unwrap();
        assert_eq!(
            a.other_sites.get(&"52:54:00:00:00:02".parse().unwrap()),
            Some(&"b".to_string())
        );
        let b = Config::parse_at_site(path, &b_secrets, Some("b")).unwrap_err();
        assert!(
            b.to_string().contains("/nonexistent/b.pw does not exist"),
            "{b}"
        );
        // Another site's hosts are still checked: a mistake there is named everywhere.
        let bad = text.replace("group: rack-b, ip", "group: rack-c, ip");
        assert!(Config::parse_at_site(path, &bad, Some("a")).is_err());
    }

    #[test]
    fn loads_and_resolves_groups_and_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.interface, "br-prov");
        assert_eq!(c.http_port, 8080);
        assert_eq!(c.boot_dir, Path::new("/etc/fleetboot/boot"));
        assert_eq!(c.dhcp.mode, DhcpMode::Full);
        assert_eq!(c.dhcp.lease_time, 3600);
        assert_eq!(
            c.unknown_hosts,
            UnknownHosts::Install("debian@2".parse().unwrap())
        );
        let web: Mac = "52:54:00:12:34:56".parse().unwrap();
        let h = &c.hosts[&web];
        assert_eq!(h.image, Some("web@3".parse().unwrap()));
        assert_eq!(h.disk, DiskChoice::Name("/dev/nvme0n1".into()));
        assert_eq!(h.hostname.as_deref(), Some("web-01"));
        let other = &c.hosts[&"52:54:00:12:34:57".parse().unwrap()];
        assert_eq!(other.image, Some("other".parse().unwrap()));
        assert_eq!(other.ip, Some(Ipv4Addr::new(10, 0, 0, 7)));
        let plain = &c.hosts[&"52:54:00:12:34:58".parse().unwrap()];
        assert_eq!(plain.image, Some("debian".parse().unwrap()));
        assert_eq!(plain.disk, DiskChoice::Name("auto".into()));
        assert_eq!(c.image_uses.len(), 4);
    }

    #[test]
    fn secure_boot_resolves_from_host_group_and_defaults() {
        let c = parse(
            "interface: eth0\nstore: /s\ndefaults: { secure_boot: true }\n\
             groups:\n  lab: { secure_boot: false }\n\
             hosts:\n  \"52:54:00:00:00:01\": {}\n  \"52:54:00:00:00:02\": { group: lab }\n  \
             \"52:54:00:00:00:03\": { group: lab, secure_boot: true }\n",
        )
        .unwrap();
        let sb = |m: &str| c.hosts[&m.parse().unwrap()].secure_boot;
        assert!(sb("52:54:00:00:00:01"), "from the defaults");
        assert!(!sb("52:54:00:00:00:02"), "the group's over the defaults'");
        assert!(sb("52:54:00:00:00:03"), "the host's over its group's");
        assert!(!parse("interface: eth0\nstore: /s\nhosts: {}\n")
            .unwrap()
            .defaults
            .secure_boot
            .unwrap_or(false));
        assert_invalid(
            "interface: eth0\nstore: /s\nhosts:\n  \"52:54:00:00:00:01\": { secure_boot: maybe }\n",
            4,
            "invalid boolean",
        );
    }

    /// (text, line, what the message says)
    fn assert_invalid(text: &str, line: u64, says: &str) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line: l,
                message,
                path,
                ..
            }) => {
                assert_eq!(l, line, "{message}");
                assert!(message.contains(says), "{message:?} lacks {says:?}");
                assert_eq!(path, Path::new("/etc/fleetboot/fleetboot.yaml"));
            }
            other => panic!("expected an error at line {line}, got {other:?}"),
        }
    }

    #[test]
    fn broken_files_name_the_line_and_what_is_wrong() {
        assert_invalid(
            "interface: br0\nhosts:\n  \"52:54:00:12:34:5\": {}\n",
            3,
            "not a MAC",
        );
        assert_invalid("interface: br0\nhttp_prot: 80\n", 2, "http_prot");
        assert_invalid(
            "interface: br0\nhosts:\n  \"52:54:00:12:34:56\": { imgae: x }\n",
            3,
            "imgae",
        );
        assert_invalid("interface: br0\ninterface: br1\n", 2, "uplicate");
        assert_invalid(
            "interface: br0\ndefaults: { image: \"a b\" }\n",
            2,
            "spaces",
        );
        assert_invalid(
            "interface: br0\nhosts:\n  \"52:54:00:12:34:56\": { group: db }\n",
            3,
            "group \"db\"",
        );
        assert_invalid("interface: br0\nunknown_hosts: maybe\n", 2, "unknown_hosts");
        assert_invalid("interface: br0\ndhcp: { mode: fast }\n", 2, "fast");
        assert_invalid("interface: [br0\n", 1, "");
        // The place is said once, in front; the parser's advice about its own options is not
        // the operator's business.
        for text in [
            "interface: br0\ninterface: br1\n",
            "interface: br0\nhosts:\n  a: 1\n   b: 2\n",
            "interface: br0\nhttp_port: 70000\n",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with("/etc/fleetboot/fleetboot.yaml:"), "{e}");
            assert!(!e.contains("at line"), "{e}");
            assert!(!e.contains("DuplicateKeyPolicy"), "{e}");
        }
    }

    /// Issue 9: hostname, SSH keys, user data (inline or from a file) and a static network at
    /// defaults, group and host level; the most specific level wins, key by key.
    #[test]
    fn identity_keys_resolve_from_host_group_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.yaml"),
            "#cloud-config\nruncmd: [[touch, /web]]\n",
        )
        .unwrap();
        let text = "interface: br0
defaults:
  hostname: node-{mac}
  ssh_authorized_keys: [\"ssh-ed25519 AAAAC3Nz ops@example\"]
  user_data: |
    #cloud-config
    packages: [htop]
  network: { gateway: 10.0.0.254, dns: [10.0.0.2] }
groups:
  web:
    user_data_file: web.yaml
    cloud_init: off
    network: { gateway: 10.0.0.1, dns: [10.0.0.53] }
hosts:
  \"52:54:00:00:00:01\":
    group: web
    hostname: web-01
    network: { address: 10.0.0.5/24, dns: [10.0.0.54] }
  \"52:54:00:00:00:02\": { ssh_authorized_keys: [\"ssh-rsa AAAAB3 me@laptop\"] }
";
        let c = Config::parse(&dir.path().join("fleetboot.yaml"), text).unwrap();
        let web = &c.hosts[&"52:54:00:00:00:01".parse().unwrap()];
        assert_eq!(web.hostname.as_deref(), Some("web-01"));
        assert_eq!(
            web.identity.ssh_authorized_keys,
            ["ssh-ed25519 AAAAC3Nz ops@example"]
        );
        assert!(web
            .identity
            .user_data
            .as_deref()
            .unwrap()
            .contains("touch, /web"));
        // The address from the host, the gateway from its group, DNS from the host again.
        let net = web.identity.network.as_ref().unwrap();
        assert_eq!((net.address, net.prefix), ("10.0.0.5".parse().unwrap(), 24));
        assert_eq!(net.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(net.dns, ["10.0.0.54".parse::<Ipv4Addr>().unwrap()]);
        let other = &c.hosts[&"52:54:00:00:00:02".parse().unwrap()];
        assert_eq!(other.hostname.as_deref(), Some("node-525400000002"));
        assert_eq!(
            other.identity.ssh_authorized_keys,
            ["ssh-rsa AAAAB3 me@laptop"]
        );
        assert!(other
            .identity
            .user_data
            .as_deref()
            .unwrap()
            .contains("htop"));
        assert_eq!(
            other.identity.network, None,
            "DHCP without an address of its own, whatever the defaults' gateway"
        );
        assert_eq!(web.identity.cloud_init, CloudInit::Off, "from the group");
        assert_eq!(other.identity.cloud_init, CloudInit::Seed, "the default");
        let unknown = c.host_or_defaults("52:54:00:00:00:09".parse().unwrap());
        assert_eq!(unknown.hostname.as_deref(), Some("node-525400000009"));
        assert_eq!(
            unknown.identity.ssh_authorized_keys,
            ["ssh-ed25519 AAAAC3Nz ops@example"]
        );
    }

    #[test]
    fn bad_identity_keys_name_the_line() {
        let host =
            |keys: &str| format!("interface: br0\nhosts:\n  \"52:54:00:12:34:56\": {{ {keys} }}\n");
        assert_invalid(&host("hostname: web/01"), 3, "not a valid host name");
        assert_invalid(&host("hostname: -web"), 3, "not a valid host name");
        assert_invalid(&host("cloud_init: iso"), 3, "expected one of seed, off");
        assert_invalid(
            &host("ssh_authorized_keys: [hunter2]"),
            3,
            "not an SSH public key",
        );
        assert_invalid(&host("user_data: \"runcmd: []\""), 3, "#cloud-config");
        assert_invalid(&host("user_data_file: missing.yaml"), 3, "missing.yaml");
        assert_invalid(
            &host("user_data: \"#cloud-config\", user_data_file: x.yaml"),
            3,
            "not both",
        );
        assert_invalid(&host("network: { address: 10.0.0.5 }"), 3, "prefix");
        assert_invalid(&host("network: { adress: 10.0.0.5/24 }"), 3, "adress");
        assert_invalid(
            "interface: br0\ngroups:\n  web: { network: { address: 10.0.0.5/24 } }\n",
            3,
            "belongs to one host",
        );
        assert_invalid(
            &host("network: { gateway: 10.0.0.1 }"),
            3,
            "needs its address",
        );
        assert_invalid(
            "interface: br0\nhosts:\n  \"52:54:00:00:00:01\": { network: { address: 10.0.0.5/24 } }\n  \"52:54:00:00:00:02\": { network: { address: 10.0.0.5/24 } }\n",
            4,
            "two hosts",
        );
        assert_invalid(
            "interface: br0\ngroups:\n  web:\n    user_data: |\n      #cloud-config\n      runcmd: [\n",
            5,
            "not valid YAML",
        );
    }

    #[test]
    fn bmc_keys_resolve_from_host_group_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bmc.pw"), "pw\n").unwrap();
        let path = dir.path().join("fleetboot.yaml");
        let text = "interface: br0\n\
            defaults:\n  bmc: { username: admin, password_file: bmc.pw }\n\
            groups:\n  rack: { bmc: { type: ipmi, cipher_suite: 3 } }\n\
            hosts:\n\
            \x20 \"52:54:00:00:00:01\": { group: rack, bmc: { address: 10.0.0.101 } }\n\
            \x20 \"52:54:00:00:00:02\": { bmc: { type: redfish, address: bmc2, port: 8443, \
                 password_env: BMC_PW, tls_verify: false } }\n\
            \x20 \"52:54:00:00:00:03\": { group: rack }\n";
        let c = Config::parse(&path, text).unwrap();
        let host = |m: &str| c.hosts[&m.parse::<Mac>().unwrap()].bmc.clone();
        let a = host("52:54:00:00:00:01").unwrap();
        assert_eq!(
            (
                a.kind,
                a.address.as_str(),
                a.username.as_str(),
                a.cipher_suite
            ),
            (BmcKind::Ipmi, "10.0.0.101", "admin", Some(3))
        );
        assert_eq!(a.password, PasswordSource::File(dir.path().join("bmc.pw")));
        assert!(a.tls_verify);
        let b = host("52:54:00:00:00:02").unwrap();
        assert_eq!(
            (b.kind, b.port, b.tls_verify),
            (BmcKind::Redfish, Some(8443), false)
        );
        assert_eq!(b.password, PasswordSource::Env("BMC_PW".into()));
        assert_eq!(
            host("52:54:00:00:00:03"),
            None,
            "no address anywhere: no BMC"
        );
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("pw\n"),
            "the password is never read into the config"
        );

        let host_line = |keys: &str| {
            format!("interface: br0\nhosts:\n  \"52:54:00:12:34:56\": {{ bmc: {{ {keys} }} }}\n")
        };
        let bad = |text: &str, says: &str| {
            let e = Config::parse(&path, text).unwrap_err().to_string();
            assert!(e.contains(":3:") && e.contains(says), "{e}");
        };
        bad(
            &host_line("address: b, username: u, password_env: P"),
            "no type",
        );
        bad(
            &host_line("type: ipmi, address: b, password_env: P"),
            "no username",
        );
        bad(
            &host_line("type: ipmi, address: b, username: u"),
            "never written",
        );
        bad(
            &host_line("type: ipmi, address: b, username: u, password: x"),
            "password",
        );
        bad(
            &host_line("type: ipmi, address: b, username: u, password_env: P, password_file: f"),
            "not both",
        );
        bad(
            &host_line("type: ipmi, address: b, username: u, password_file: nope.pw"),
            "nope.pw does not exist",
        );
        bad(&host_line("type: idrac, address: b"), "idrac");
    }

    #[test]
    fn disk_hints_are_read_and_checked() {
        let c = parse(
            "interface: br0\ngroups:\n  db: { disk: { size: \">=400G\", rotational: false } }\n\
             hosts:\n  \"52:54:00:00:00:01\": { group: db }\n\
             \x20 \"52:54:00:00:00:02\": { group: db, disk: { serial: S5XNNA0R } }\n",
        )
        .unwrap();
        let host = |m: &str| c.hosts[&m.parse::<Mac>().unwrap()].disk.clone();
        let DiskChoice::Hints(h) = host("52:54:00:00:00:01") else {
            panic!("hints from the group")
        };
        assert_eq!(
            (h.size.as_deref(), h.rotational),
            (Some(">=400G"), Some(false))
        );
        let DiskChoice::Hints(h) = host("52:54:00:00:00:02") else {
            panic!("the host's own hints")
        };
        assert_eq!(
            (h.serial.as_deref(), h.size.as_deref()),
            (Some("S5XNNA0R"), None)
        );
        let bad =
            |d: &str| format!("interface: br0\nhosts:\n  \"52:54:00:00:00:01\": {{ disk: {d} }}\n");
        assert_invalid(&bad("{ size: huge }"), 3, "size");
        assert_invalid(&bad("{}"), 3, "no hint");
        assert_invalid(&bad("{ colour: red }"), 3, "unknown field `colour`");
    }

    #[test]
    fn discovery_rules_are_read_and_checked() {
        let c = parse(
            "interface: br0\ngroups:\n  db: { image: debian@1, hostname: \"db-{mac}\" }\n\
             rules:\n\
             \x20 - match: { vendor: \"Dell Inc.\", product: \"PowerEdge R650\", memory: \">=256G\", cpus: 64 }\n\
             \x20   group: db\n\
             \x20 - { match: { serial: ABC }, image: debian@2 }\n",
        )
        .unwrap();
        assert_eq!(c.rules.len(), 2);
        let r = &c.rules[0];
        assert_eq!(r.matches.product.as_deref(), Some("PowerEdge R650"));
        assert_eq!(r.matches.memory.unwrap().value, 256 << 30);
        assert_eq!(r.matches.cpus.unwrap().value, 64);
        assert_eq!((r.group.as_deref(), r.line), (Some("db"), 5));
        let inv = fleetboot_image::api::Inventory {
            system: fleetboot_image::api::SystemInfo {
                vendor: Some("Dell Inc.".into()),
                product: Some("PowerEdge R650".into()),
                ..Default::default()
            },
            cpus: 64,
            memory_bytes: 512 << 30,
            ..Default::default()
        };
        let mac: Mac = "52:54:00:00:00:aa".parse().unwrap();
        let h = c.host_for(mac, Some(&inv));
        assert_eq!(h.image.unwrap().to_string(), "debian@1");
        assert_eq!(h.group.as_deref(), Some("db"));
        assert_eq!(h.hostname.as_deref(), Some("db-5254000000aa"));
        assert_eq!(c.rule_for(mac, None), None, "no inventory, no rule");

        let rule =
            |r: &str| format!("interface: br0\ngroups:\n  db: {{ image: x@1 }}\nrules:\n  - {r}\n");
        assert_invalid(&rule("{ match: { memory: lots }, group: db }"), 5, "memory");
        assert_invalid(
            &rule("{ match: { product: X }, group: web }"),
            5,
            "does not define",
        );
        assert_invalid(&rule("{ match: { colour: red }, group: db }"), 5, "colour");
        assert_invalid(&rule("{ match: { product: X } }"), 5, "no image");
    }

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fleetboot.yaml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.tftp.port, 69);
        assert!(c.tftp.enabled);
        assert_eq!(c.http, Http::default());
    }

    #[test]
    fn dhcp_settings_are_checked() {
        assert!(matches!(
            parse("interface: br0\ndhcp: { mode: full }\n"),
            Err(ConfigError::Whole { message, .. }) if message.contains("range")
        ));
        assert!(
            parse("interface: br0\ndhcp: { mode: full, range: [10.0.0.9, 10.0.0.1] }\n").is_err()
        );
        assert!(parse("interface: br0\ndhcp: { mode: off }\n").is_ok());
        let c = parse("interface: br0\nhttp: { connections_max: 10, idle_timeout_secs: 5 }\n");
        let http = c.unwrap().http;
        assert_eq!((http.connections_max, http.idle_timeout_secs), (10, 5));
        assert_eq!(
            http.buffered_mib_max, 256,
            "defaults fill what is not given"
        );
        assert!(parse("interface: br0\nhttp: { buffered_mib_max: 1 }\n").is_err());
        assert!(parse("interface: br0\nhttp: { conections_max: 1 }\n").is_err());
    }

    #[test]
    fn store_url_is_an_http_url() {
        let c = parse("interface: br0\nstore_url: http://10.0.0.5/fleetboot-store/\n").unwrap();
        assert_eq!(
            c.store_url.as_deref(),
            Some("http://10.0.0.5/fleetboot-store")
        );
        assert_eq!(parse("interface: br0\n").unwrap().store_url, None);
        for bad in [
            "ftp://10.0.0.5/store",
            "10.0.0.5/store",
            "http://",
            "http://a b",
        ] {
            let e = parse(&format!("interface: br0\nstore_url: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("fleetboot.yaml:2") && e.contains("store_url"),
                "{bad}: {e}"
            );
        }
    }
}
