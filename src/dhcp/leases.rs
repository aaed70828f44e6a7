//! The address pool of full DHCP mode: reservations, leases and pending offers, in memory, with
//! every committed lease written to the fleet state so a restart keeps them.

use crate::mac::Mac;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

/// How long an offered address stays held for the client it was offered to, in seconds.
const OFFER_HOLD_S: i64 = 60;

/// A lease or an offer: an address and when it ends (unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub expires: i64,
}

/// The pool: a range, the reservations from the configuration, the leases and the offers.
#[derive(Debug, Default)]
pub struct LeasePool {
    first: u32,
    last: u32,
    reservations: HashMap<Mac, Ipv4Addr>,
    reserved_ips: HashMap<Ipv4Addr, Mac>,
    leases: HashMap<Mac, Lease>,
    by_ip: HashMap<Ipv4Addr, Mac>,
    offers: HashMap<Mac, Lease>,
    /// Who each offered address is held for (so checking an address is O(1), not O(offers)).
    offer_by_ip: HashMap<Ipv4Addr, Mac>,
    /// Addresses a client declined (in use by someone we do not know), until when. Only the
    /// client an address was offered or leased to can decline it, so this stays within the range.
    declined: HashMap<Ipv4Addr, i64>,
    /// Addresses in the range never handed out (the appliance's own, the router's).
    excluded: HashSet<Ipv4Addr>,
    /// Where the search for a free address starts next.
    cursor: u32,
}

impl LeasePool {
    /// A pool over `first ..= last` with these reservations.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr, reservations: HashMap<Mac, Ipv4Addr>) -> LeasePool {
        let reserved_ips = reservations.iter().map(|(m, ip)| (*ip, *m)).collect();
        LeasePool {
            first: u32::from(first),
            last: u32::from(last),
            cursor: u32::from(first),
            reservations,
            reserved_ips,
            ..LeasePool::default()
        }
    }

    /// Never hands out `ip` (the appliance's or the router's address inside the range).
    pub fn exclude(&mut self, ip: Ipv4Addr) {
        self.excluded.insert(ip);
    }

    /// Takes over the leases and offers of the pool this one replaces (a configuration reload):
    /// the running pool knows leases whose SQLite writes may still be queued. Those that conflict
    /// with the new reservations or exclusions are dropped.
    pub fn adopt(&mut self, old: &LeasePool, now: i64) {
        for (mac, lease) in &old.leases {
            if lease.expires > now && self.free_for(*mac, lease.ip, now) {
                self.restore(*mac, *lease);
            }
        }
        for (mac, offer) in &old.offers {
            if offer.expires > now && self.free_for(*mac, offer.ip, now) {
                self.offers.insert(*mac, *offer);
                self.offer_by_ip.insert(offer.ip, *mac);
            }
        }
        self.declined = old.declined.clone();
        self.declined.retain(|_, until| *until > now);
    }

    /// Restores a lease read back from the fleet state.
    pub fn restore(&mut self, mac: Mac, lease: Lease) {
        self.by_ip.insert(lease.ip, mac);
        self.leases.insert(mac, lease);
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// Whether `ip` may be given to `mac` now.
    fn free_for(&self, mac: Mac, ip: Ipv4Addr, now: i64) -> bool {
        if let Some(owner) = self.reserved_ips.get(&ip) {
            return *owner == mac;
        }
        if !self.in_range(ip)
            || self.excluded.contains(&ip)
            || self.declined.get(&ip).is_some_and(|&t| t > now)
        {
            return false;
        }
        let leased = self
            .by_ip
            .get(&ip)
            .is_some_and(|m| *m != mac && self.leases.get(m).is_some_and(|l| l.expires > now));
        let offered = self.offer_by_ip.get(&ip).is_some_and(|m| {
            *m != mac
                && self
                    .offers
                    .get(m)
                    .is_some_and(|o| o.ip == ip && o.expires > now)
        });
        !leased && !offered
    }

    /// Chooses an address to offer `mac` (its reservation, its lease, the one it asks for, or
    /// the next free one) and holds it for a minute.
    pub fn offer(&mut self, mac: Mac, requested: Option<Ipv4Addr>, now: i64) -> Option<Ipv4Addr> {
        let ip = if let Some(ip) = self.reservations.get(&mac) {
            Some(*ip)
        } else if let Some(l) = self
            .leases
            .get(&mac)
            .filter(|l| self.free_for(mac, l.ip, now))
        {
            Some(l.ip)
        } else if let Some(o) = self
            .offers
            .get(&mac)
            .filter(|o| self.free_for(mac, o.ip, now))
        {
            Some(o.ip)
        } else if let Some(ip) = requested.filter(|ip| self.free_for(mac, *ip, now)) {
            Some(ip)
        } else {
            self.next_free(mac, now)
        }?;
        self.drop_offer(mac);
        self.offers.insert(
            mac,
            Lease {
                ip,
                expires: now + OFFER_HOLD_S,
            },
        );
        self.offer_by_ip.insert(ip, mac);
        Some(ip)
    }

    fn next_free(&mut self, mac: Mac, now: i64) -> Option<Ipv4Addr> {
        let size = u64::from(self.last - self.first) + 1;
        for i in 0..size {
            let n = self.first + ((u64::from(self.cursor - self.first) + i) % size) as u32;
            let ip = Ipv4Addr::from(n);
            if self.free_for(mac, ip, now) {
                self.cursor = if n == self.last { self.first } else { n + 1 };
                return Some(ip);
            }
        }
        None
    }

    /// Commits `ip` to `mac` for `lease_s` seconds, if it may have it (REQUEST → ACK).
    pub fn commit(&mut self, mac: Mac, ip: Ipv4Addr, lease_s: u32, now: i64) -> Option<Lease> {
        if !self.free_for(mac, ip, now) {
            return None;
        }
        if let Some(old) = self.leases.get(&mac) {
            if old.ip != ip {
                self.by_ip.remove(&old.ip);
            }
        }
        let lease = Lease {
            ip,
            expires: now + i64::from(lease_s),
        };
        self.drop_offer(mac);
        self.leases.insert(mac, lease);
        self.by_ip.insert(ip, mac);
        Some(lease)
    }

    /// The client gave its address back.
    pub fn release(&mut self, mac: Mac) -> Option<Lease> {
        self.drop_offer(mac);
        let lease = self.leases.remove(&mac)?;
        self.by_ip.remove(&lease.ip);
        Some(lease)
    }

    /// The client found `ip` in use: keep it out of the pool for a lease time. Taken only from
    /// the client `ip` was offered or leased to (a DECLINE is unauthenticated: any MAC could
    /// otherwise block any address); returns whether it was taken.
    pub fn decline(&mut self, mac: Mac, ip: Ipv4Addr, hold_s: u32, now: i64) -> bool {
        let holds = self.leases.get(&mac).is_some_and(|l| l.ip == ip)
            || self.offers.get(&mac).is_some_and(|o| o.ip == ip);
        if !holds {
            return false;
        }
        self.release(mac);
        self.declined.retain(|_, until| *until > now);
        self.declined.insert(ip, now + i64::from(hold_s));
        true
    }

    /// The client chose another server's offer.
    pub fn forget_offer(&mut self, mac: Mac) {
        self.drop_offer(mac);
    }

    fn drop_offer(&mut self, mac: Mac) {
        if let Some(o) = self.offers.remove(&mac) {
            if self.offer_by_ip.get(&o.ip) == Some(&mac) {
                self.offer_by_ip.remove(&o.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn offers_commits_and_keeps_addresses_apart() {
        let mut res = HashMap::new();
        res.insert(mac(9), ip(50));
        let mut p = LeasePool::new(ip(10), ip(12), res);
        assert_eq!(
            p.offer(mac(9), None, 0),
            Some(ip(50)),
            "reservation outside the range"
        );
        assert_eq!(p.offer(mac(1), None, 0), Some(ip(10)));
        assert_eq!(p.offer(mac(1), None, 1), Some(ip(10)), "same offer again");
        assert_eq!(
            p.offer(mac(2), Some(ip(10)), 1),
            Some(ip(11)),
            "held for mac 1"
        );
        assert_eq!(p.commit(mac(2), ip(10), 3600, 2), None);
        assert!(p.commit(mac(1), ip(10), 3600, 2).is_some());
        assert_eq!(p.offer(mac(3), None, 2), Some(ip(12)));
        assert_eq!(p.offer(mac(4), None, 2), None, "pool exhausted");
        assert_eq!(
            p.commit(mac(4), ip(50), 3600, 2),
            None,
            "someone else's reservation"
        );
        assert_eq!(
            p.offer(mac(4), None, 100),
            Some(ip(11)),
            "offer to mac 2 expired"
        );
        p.release(mac(1));
        let got = p.offer(mac(5), None, 100).unwrap();
        assert!(
            got == ip(10) || got == ip(12),
            "a released or expired address: {got}"
        );
        assert!(p.decline(mac(4), ip(11), 3600, 100), "offered to mac 4");
        assert!(!p.free_for(mac(6), ip(11), 200));
        assert!(p.free_for(mac(6), ip(11), 4000));
        assert_eq!(p.commit(mac(7), ip(99), 3600, 0), None, "outside the range");
    }

    /// Issue 8, item 10: a spoofed DECLINE blocks nothing; the appliance's and the router's
    /// addresses are never handed out; a reload keeps leases not yet written to SQLite.
    #[test]
    fn declines_exclusions_and_reloads_keep_the_pool_honest() {
        let mut p = LeasePool::new(ip(10), ip(13), HashMap::new());
        p.exclude(ip(10));
        p.exclude(ip(11));
        let a = p.offer(mac(1), None, 0).unwrap();
        assert_eq!(a, ip(12), "excluded addresses are skipped");
        assert!(p.commit(mac(1), a, 3600, 0).is_some());
        assert!(p.commit(mac(2), ip(10), 3600, 0).is_none());
        assert!(!p.decline(mac(2), a, 3600, 1), "mac 2 does not hold it");
        assert!(!p.decline(mac(2), ip(13), 3600, 1), "nor this one");
        assert!(p.free_for(mac(3), ip(13), 2));
        assert_eq!(p.offer(mac(1), None, 2), Some(a), "mac 1 keeps its lease");

        let mut reloaded = LeasePool::new(ip(10), ip(13), HashMap::new());
        reloaded.adopt(&p, 3);
        assert_eq!(
            reloaded.offer(mac(4), Some(a), 3),
            Some(ip(10)),
            "the lease survives the reload (and exclusions are the new pool's)"
        );
        assert!(reloaded.commit(mac(1), a, 3600, 4).is_some());
    }

    #[test]
    fn a_renewing_client_keeps_its_address() {
        let mut p = LeasePool::new(ip(10), ip(20), HashMap::new());
        let l = p.offer(mac(1), None, 0).unwrap();
        p.commit(mac(1), l, 60, 0).unwrap();
        assert_eq!(p.offer(mac(1), None, 30), Some(l));
        assert!(p.commit(mac(1), l, 60, 30).is_some());
        let mut restored = LeasePool::new(ip(10), ip(20), HashMap::new());
        restored.restore(mac(1), Lease { ip: l, expires: 90 });
        assert_eq!(restored.offer(mac(2), Some(l), 40), Some(ip(11)));
        assert_eq!(restored.offer(mac(1), None, 40), Some(l));
    }
}
