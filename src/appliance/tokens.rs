//! Install tokens: a secret handed to one host's agent in its boot script, bound to that host's
//! MAC, to the one address allowed to use it (the address DHCP gave the MAC), and to a lifetime.
//!
//! Kept in memory for the hot path (every pack request of an install is checked) and in SQLite
//! (`hosts.token*`) so that an appliance restarted mid-install still accepts its agents.

use crate::fleet::Token;
use crate::mac::Mac;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Why a request's token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("no install token given")]
    Missing,
    #[error("the install token is not valid (unknown, used up, or for another host)")]
    Invalid,
    #[error("the install token has expired")]
    Expired,
    #[error("the install token of {mac} is bound to {bound}; the request came from {peer}")]
    WrongAddress {
        mac: Mac,
        bound: IpAddr,
        peer: IpAddr,
    },
}

/// The live tokens, by host and by secret.
#[derive(Default)]
pub struct Tokens {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_mac: HashMap<Mac, Token>,
    by_secret: HashMap<String, Mac>,
    /// Hosts whose token is for a trip that installs nothing (inspect, wipe): it never reads
    /// the store.
    trips: std::collections::HashSet<Mac>,
    /// The token of each host's last install that reported done: a `done` sent again with it
    /// (its first answer lost) is answered as the first was, and accepted for nothing else.
    finished: HashMap<Mac, Token>,
}

impl Tokens {
    /// Makes `token` the one live token of `mac` (replacing any other).
    pub fn insert(&self, mac: Mac, token: Token) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.by_mac.remove(&mac) {
            inner.by_secret.remove(&old.secret);
        }
        inner.by_secret.insert(token.secret.clone(), mac);
        inner.by_mac.insert(mac, token);
        inner.trips.remove(&mac);
    }

    /// Makes `token` the live token of `mac` for a trip that installs nothing: accepted by the
    /// agent API for that host, never for store reads.
    pub fn insert_trip(&self, mac: Mac, token: Token) {
        self.insert(mac, token);
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trips
            .insert(mac);
    }

    /// Voids the token of `mac` because its install reported done; remembered only to answer
    /// that `done` again ([`Tokens::finished`]).
    pub fn finish(&self, mac: Mac) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.by_mac.remove(&mac) {
            inner.by_secret.remove(&old.secret);
            inner.finished.insert(mac, old);
        }
        inner.trips.remove(&mac);
    }

    /// Whether `given`, from `peer`, is the token of `mac`'s last finished install.
    pub fn finished(&self, mac: Mac, given: &str, peer: IpAddr) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .finished
            .get(&mac)
            .is_some_and(|t| same_secret(&t.secret, given) && t.ip == canonical(peer))
    }

    /// Voids the token of `mac` (the install ended).
    pub fn remove(&self, mac: Mac) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = inner.by_mac.remove(&mac) {
            inner.by_secret.remove(&old.secret);
        }
        inner.trips.remove(&mac);
    }

    /// The live token of `mac`, if it has one that has not expired at `now` (unix seconds).
    pub fn live(&self, mac: Mac, now: i64) -> Option<Token> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.by_mac.get(&mac).filter(|t| t.expires > now).cloned()
    }

    /// Checks an agent call for `mac`: its token, from its address, in its lifetime.
    pub fn check_host(
        &self,
        mac: Mac,
        given: Option<&str>,
        peer: IpAddr,
        now: i64,
    ) -> Result<(), AccessError> {
        let given = given.ok_or(AccessError::Missing)?;
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let token = inner.by_mac.get(&mac).ok_or(AccessError::Invalid)?;
        if !same_secret(&token.secret, given) {
            return Err(AccessError::Invalid);
        }
        check(mac, token, peer, now)
    }

    /// Checks a store read: any live token, used from the address it is bound to.
    pub fn check_any(
        &self,
        given: Option<&str>,
        peer: IpAddr,
        now: i64,
    ) -> Result<(), AccessError> {
        let given = given.ok_or(AccessError::Missing)?;
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mac = *inner.by_secret.get(given).ok_or(AccessError::Invalid)?;
        if inner.trips.contains(&mac) {
            return Err(AccessError::Invalid);
        }
        let token = inner.by_mac.get(&mac).ok_or(AccessError::Invalid)?;
        check(mac, token, peer, now)
    }
}

fn check(mac: Mac, token: &Token, peer: IpAddr, now: i64) -> Result<(), AccessError> {
    if token.expires <= now {
        return Err(AccessError::Expired);
    }
    if canonical(token.ip) != canonical(peer) {
        return Err(AccessError::WrongAddress {
            mac,
            bound: token.ip,
            peer,
        });
    }
    Ok(())
}

/// IPv4 seen through an IPv6 socket (`::ffff:a.b.c.d`) is the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Compares secrets in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_only_for_its_host_from_its_address_until_it_expires() {
        let tokens = Tokens::default();
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        let other: Mac = "52:54:00:00:00:02".parse().unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let neighbour: IpAddr = "10.0.0.6".parse().unwrap();
        tokens.insert(
            mac,
            Token {
                secret: "s1".into(),
                ip,
                expires: 100,
            },
        );
        assert_eq!(tokens.check_host(mac, Some("s1"), ip, 50), Ok(()));
        assert_eq!(tokens.check_any(Some("s1"), ip, 50), Ok(()));
        assert_eq!(
            tokens.check_host(mac, Some("s1"), "::ffff:10.0.0.5".parse().unwrap(), 50),
            Ok(())
        );
        assert!(matches!(
            tokens.check_host(mac, Some("s1"), neighbour, 50),
            Err(AccessError::WrongAddress { .. })
        ));
        assert!(matches!(
            tokens.check_any(Some("s1"), neighbour, 50),
            Err(AccessError::WrongAddress { .. })
        ));
        assert_eq!(
            tokens.check_host(other, Some("s1"), ip, 50),
            Err(AccessError::Invalid)
        );
        assert_eq!(
            tokens.check_host(mac, Some("s2"), ip, 50),
            Err(AccessError::Invalid)
        );
        assert_eq!(
            tokens.check_host(mac, None, ip, 50),
            Err(AccessError::Missing)
        );
        assert_eq!(
            tokens.check_host(mac, Some("s1"), ip, 100),
            Err(AccessError::Expired)
        );
        assert_eq!(tokens.live(mac, 100), None);
        tokens.insert(
            mac,
            Token {
                secret: "s2".into(),
                ip,
                expires: 200,
            },
        );
        assert_eq!(
            tokens.check_any(Some("s1"), ip, 50),
            Err(AccessError::Invalid),
            "a replaced token is void"
        );
        tokens.remove(mac);
        assert_eq!(
            tokens.check_host(mac, Some("s2"), ip, 50),
            Err(AccessError::Invalid)
        );
    }
}
