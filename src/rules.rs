//! Discovery rules: enrolment by what an inspected machine is. `rules:` in the YAML is a list of
//! `{ match: {...}, image, group }`; a machine the YAML does not list, once inspected
//! (`unknown_hosts: discover`), takes the first rule its inventory matches — installed at its
//! next boot with the rule's image (or its group's) and its group's identity keys. The YAML stays
//! the source of truth: a rule is written there, and `host show` prints the line that enrols a
//! machine by hand instead.
//!
//! Match keys: `vendor`, `product`, `serial` (exact), `cpus`, `memory` (a comparison: `">=256G"`,
//! `"<8"`, `"=64"`, `"512G"` meaning `=`; K, M, G, T are binary units). Every key given must hold.

use fleetboot_image::api::Inventory;

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

/// What a rule asks of an inventory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
    pub cpus: Option<Comparison>,
    pub memory: Option<Comparison>,
}

impl Match {
    /// Whether every key given holds for `inv` (a key the inventory lacks does not hold).
    pub fn holds(&self, inv: &Inventory) -> bool {
        let same = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref().map(str::trim) == Some(w.trim()),
        };
        same(&self.vendor, &inv.system.vendor)
            && same(&self.product, &inv.system.product)
            && same(&self.serial, &inv.system.serial)
            && self.cpus.is_none_or(|c| c.holds(inv.cpus as u64))
            && self.memory.is_none_or(|c| c.holds(inv.memory_bytes))
    }
}

/// One rule, resolved: what it matches and what a matching machine gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Match,
    pub image: Option<crate::store::ImageRef>,
    pub group: Option<String>,
    /// Where it is written, for people.
    pub line: u64,
}

/// The first rule `inv` matches, with its index.
pub fn first_match<'a>(rules: &'a [Rule], inv: &Inventory) -> Option<(usize, &'a Rule)> {
    rules.iter().enumerate().find(|(_, r)| r.matches.holds(inv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_image::api::SystemInfo;

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
    fn the_first_rule_whose_every_key_holds_wins() {
        let inv = Inventory {
            system: SystemInfo {
                vendor: Some("Dell Inc.".into()),
                product: Some("PowerEdge R650".into()),
                serial: Some("ABC1234".into()),
                uuid: None,
            },
            cpus: 64,
            memory_bytes: 256 << 30,
            ..Default::default()
        };
        let rule = |product: &str, memory: &str, group: &str| Rule {
            matches: Match {
                product: Some(product.into()),
                memory: Some(Comparison::parse(memory).unwrap()),
                ..Default::default()
            },
            image: None,
            group: Some(group.into()),
            line: 1,
        };
        let rules = [
            rule("PowerEdge R650", ">=512G", "big"),
            rule("PowerEdge R750", ">=1G", "other"),
            rule("PowerEdge R650", ">=256G", "db"),
            rule("PowerEdge R650", ">=1G", "later"),
        ];
        let (i, r) = first_match(&rules, &inv).unwrap();
        assert_eq!((i, r.group.as_deref()), (2, Some("db")));
        let serial_only = Match {
            serial: Some("XYZ".into()),
            ..Default::default()
        };
        assert!(!serial_only.holds(&inv));
        assert!(Match::default().holds(&inv), "no key: every machine");
        let mut bare = inv.clone();
        bare.system.product = None;
        assert!(
            !rules[2].matches.holds(&bare),
            "a key the inventory lacks does not hold"
        );
    }
}
