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
pub use fleetboot_image::hints::{Comparison, Op};

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
