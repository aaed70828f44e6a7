//! Picking a disk by what it is — root device hints, as Ironic has them — and the comparisons
//! they and the appliance's discovery rules use (`">=400G"`). Shared so the appliance (checking
//! the YAML, `host show`) and the agent (choosing the disk it installs on) decide alike.

use crate::api::DiskInfo;
use serde::{Deserialize, Serialize};

/// `>=`, `<=`, `>`, `<` or `=` a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comparison {
    pub op: Op,
    pub value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Ge,
    Le,
    Gt,
    Lt,
    Eq,
}

impl Comparison {
    /// `">=256G"`, `"<8"`, `"64"`; units K, M, G, T (×1024 each), optionally followed by `B`
    /// or `iB`.
    pub fn parse(text: &str) -> Result<Comparison, String> {
        let t = text.trim();
        let (op, rest) = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            (">", Op::Gt),
            ("<", Op::Lt),
            ("=", Op::Eq),
        ]
        .iter()
        .find_map(|(p, op)| t.strip_prefix(p).map(|r| (*op, r)))
        .unwrap_or((Op::Eq, t));
        let rest = rest.trim();
        let upper = rest.to_ascii_uppercase();
        let digits = upper.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = upper[digits.len()..]
            .trim_end_matches("IB")
            .trim_end_matches('B');
        let scale: u64 = match unit {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(format!("{text:?}: unknown unit (K, M, G or T)")),
        };
        let n: u64 = digits.trim().parse().map_err(|_| {
            format!("{text:?} is not a comparison like \">=256G\", \"<8\" or \"64\"")
        })?;
        let value = n
            .checked_mul(scale)
            .ok_or_else(|| format!("{text:?} is too large"))?;
        Ok(Comparison { op, value })
    }

    pub fn holds(&self, v: u64) -> bool {
        match self.op {
            Op::Ge => v >= self.value,
            Op::Le => v <= self.value,
            Op::Gt => v > self.value,
            Op::Lt => v < self.value,
            Op::Eq => v == self.value,
        }
    }
}

/// `disk: { size, model, vendor, serial, wwn, rotational, by_path }`: every key given must
/// hold; the install needs exactly one disk that matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskHints {
    /// A comparison, e.g. `">=400G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Compared without case and surrounding spaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotational: Option<bool>,
    /// `pci-0000:00:05.0-nvme-1`, with or without `/dev/disk/by-path/` before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_path: Option<String>,
}

impl DiskHints {
    /// Checks the hints themselves (the size comparison); the message says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if let Some(s) = &self.size {
            Comparison::parse(s).map_err(|e| format!("size: {e}"))?;
        }
        if *self == DiskHints::default() {
            return Err(
                "no hint given (size, model, vendor, serial, wwn, rotational, by_path)".into(),
            );
        }
        Ok(())
    }

    /// Whether `disk` satisfies every hint given.
    pub fn matches(&self, disk: &DiskInfo) -> bool {
        let fold = |s: &str| s.trim().to_lowercase();
        let text = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref().is_some_and(|h| fold(h) == fold(w)),
        };
        let exact = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref().map(str::trim) == Some(w.trim()),
        };
        let by_path = self.by_path.as_ref().map(|p| {
            p.trim()
                .trim_start_matches("/dev/disk/by-path/")
                .to_string()
        });
        self.size
            .as_deref()
            .is_none_or(|s| Comparison::parse(s).is_ok_and(|c| c.holds(disk.size_bytes)))
            && text(&self.model, &disk.model)
            && text(&self.vendor, &disk.vendor)
            && exact(&self.serial, &disk.serial)
            && exact(&self.wwn, &disk.wwn)
            && self.rotational.is_none_or(|r| r == disk.rotational)
            && exact(&by_path, &disk.by_path)
    }

    /// The one disk among `disks` the hints pick, or why there is not exactly one.
    pub fn pick<'a>(&self, disks: &'a [DiskInfo]) -> Result<&'a DiskInfo, String> {
        let found: Vec<&DiskInfo> = disks.iter().filter(|d| self.matches(d)).collect();
        let listing = || {
            disks
                .iter()
                .map(|d| {
                    format!(
                        "{} ({} bytes, model {}, serial {})",
                        d.name,
                        d.size_bytes,
                        d.model.as_deref().unwrap_or("-"),
                        d.serial.as_deref().unwrap_or("-")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        match found.as_slice() {
            [one] => Ok(one),
            [] => Err(format!(
                "no disk matches the hints {self:?}; the disks: {}",
                listing()
            )),
            many => Err(format!(
                "{} disks match the hints {self:?} ({}): give hints that pick one",
                many.len(),
                many.iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_parse_with_units_and_hold() {
        let c = |s: &str| Comparison::parse(s).unwrap();
        assert_eq!(
            c(">=256G"),
            Comparison {
                op: Op::Ge,
                value: 256 << 30
            }
        );
        assert_eq!(
            c("<8"),
            Comparison {
                op: Op::Lt,
                value: 8
            }
        );
        assert_eq!(c("64").op, Op::Eq);
        assert_eq!(c("= 1 TiB").value, 1 << 40);
        assert_eq!(c("512MB").value, 512 << 20);
        assert!(c(">=256G").holds(256 << 30) && !c(">=256G").holds((256 << 30) - 1));
        assert!(c("<=4").holds(4) && !c("<4").holds(4) && c(">3").holds(4));
        for bad in ["", ">=", "lots", ">=12X", "99999999999T"] {
            assert!(Comparison::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hints_pick_exactly_one_disk() {
        let disk =
            |name: &str, gib: u64, model: &str, serial: &str, rot: bool, path: &str| DiskInfo {
                name: name.into(),
                size_bytes: gib << 30,
                model: Some(model.into()),
                serial: Some(serial.into()),
                rotational: rot,
                by_path: Some(path.into()),
                ..Default::default()
            };
        let disks = [
            disk(
                "sda",
                480,
                "INTEL SSDSC2KB48",
                "SSD-1",
                false,
                "pci-0000:00:1f.2-ata-1",
            ),
            disk(
                "sdb",
                4000,
                "ST4000NM0035",
                "HDD-1",
                true,
                "pci-0000:00:1f.2-ata-2",
            ),
            disk(
                "nvme0n1",
                960,
                "Samsung PM9A3",
                "NV-1",
                false,
                "pci-0000:3b:00.0-nvme-1",
            ),
        ];
        let pick = |h: DiskHints| h.pick(&disks).map(|d| d.name.clone());
        let hints = |f: &dyn Fn(&mut DiskHints)| {
            let mut h = DiskHints::default();
            f(&mut h);
            h
        };
        assert_eq!(pick(hints(&|h| h.rotational = Some(true))).unwrap(), "sdb");
        assert_eq!(
            pick(hints(&|h| h.model = Some(" samsung pm9a3 ".into()))).unwrap(),
            "nvme0n1"
        );
        assert_eq!(
            pick(hints(
                &|h| h.by_path = Some("/dev/disk/by-path/pci-0000:00:1f.2-ata-1".into())
            ))
            .unwrap(),
            "sda"
        );
        assert_eq!(
            pick(hints(&|h| {
                h.size = Some(">=400G".into());
                h.rotational = Some(false);
                h.serial = Some("SSD-1".into());
            }))
            .unwrap(),
            "sda"
        );
        let two = pick(hints(&|h| h.size = Some(">=400G".into()))).unwrap_err();
        assert!(two.contains("3 disks match"), "{two}");
        let none = pick(hints(&|h| h.wwn = Some("0x5000".into()))).unwrap_err();
        assert!(
            none.contains("no disk matches") && none.contains("sdb"),
            "{none}"
        );
        assert!(DiskHints::default().check().is_err());
        assert!(hints(&|h| h.size = Some("big".into())).check().is_err());
    }
}
