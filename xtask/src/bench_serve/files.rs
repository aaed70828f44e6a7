//! The files every server is given: a store with a pack, the TFTP file, the MAC list and configurations.

use super::*;

/// The benchmark's files, all under `work`.
pub(super) struct Files {
    pub(super) work: PathBuf,
    /// The boot folder (TFTP), holding [`TFTP_FILE`].
    pub(super) boot: PathBuf,
    /// fleetboot's store, holding one image of incompressible data.
    pub(super) store: PathBuf,
    /// The store's pack file, as a path under the store (`packs/ID.pack`).
    pub(super) pack: String,
    /// perfdhcp's MACs, one a line.
    pub(super) macs: PathBuf,
    /// fleetboot's configuration for the DHCP run (full mode, every MAC a host).
    pub(super) dhcp_config: PathBuf,
    /// fleetboot's configuration for TFTP and HTTP (DHCP off).
    pub(super) files_config: PathBuf,
}

pub(super) fn make_files(fleetboot: &Path, work: &Path, clients: usize) -> Result<Files> {
    let boot = work.join("boot");
    fs::create_dir_all(&boot).with_context(|| format!("cannot create {}", boot.display()))?;
    write_random(&boot.join(TFTP_FILE), TFTP_BYTES, 1)?;

    let store = work.join("store");
    let image = work.join("data.img");
    write_random(&image, PACK_SOURCE_BYTES, 2)?;
    crate::util::run(
        Command::new(fleetboot)
            .arg("--store")
            .arg(&store)
            .args(["image", "import", "data"])
            .arg(&image)
            .stdout(Stdio::null()),
    )?;
    fs::remove_file(&image).with_context(|| format!("cannot remove {}", image.display()))?;
    let packs = store.join("packs");
    let mut largest: Option<(u64, String)> = None;
    for entry in fs::read_dir(&packs).with_context(|| format!("cannot list {}", packs.display()))? {
        let entry = entry?;
        let len = entry.metadata()?.len();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pack") && largest.as_ref().is_none_or(|(l, _)| len > *l) {
            largest = Some((len, name));
        }
    }
    let Some((len, pack)) = largest else {
        bail!(
            "fleetboot image import left no pack file in {}",
            packs.display()
        );
    };
    if len <= HTTP_RANGES[0].1 {
        bail!("the pack file {pack} holds {len} bytes, too few for the range read");
    }

    let macs = work.join("macs.txt");
    let mut list = String::new();
    let mut hosts = String::new();
    for i in 1..=clients {
        let mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
        writeln!(list, "{mac}")?;
        writeln!(hosts, "  \"{mac}\": {{}}")?;
    }
    fs::write(&macs, list).with_context(|| format!("cannot write {}", macs.display()))?;

    let common = format!(
        "interface: {SRV_IF}\nhttp_port: {HTTP_PORT}\nboot_dir: {}\nstore: {}\nunknown_hosts: ignore\n",
        boot.display(),
        store.display()
    );
    let dhcp_config = work.join("fleetboot-dhcp.yaml");
    fs::write(
        &dhcp_config,
        format!(
            "{common}state_dir: {}\ndhcp: {{ mode: full, range: [{}, {}] }}\nhosts:\n{hosts}",
            work.join("state-dhcp").display(),
            POOL[0],
            POOL[1]
        ),
    )
    .with_context(|| format!("cannot write {}", dhcp_config.display()))?;
    let files_config = work.join("fleetboot-files.yaml");
    fs::write(
        &files_config,
        format!(
            "{common}state_dir: {}\ndhcp: {{ mode: off }}\nadmin_token: {BENCH_TOKEN}\n",
            work.join("state-files").display()
        ),
    )
    .with_context(|| format!("cannot write {}", files_config.display()))?;

    Ok(Files {
        work: work.to_path_buf(),
        boot,
        store,
        pack: format!("packs/{pack}"),
        macs,
        dhcp_config,
        files_config,
    })
}

/// Writes `len` bytes that do not compress (xorshift64*, from `seed`).
pub(super) fn write_random(path: &Path, len: usize, seed: u64) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(buf.len());
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n;
    }
    Ok(())
}
