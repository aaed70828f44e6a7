//! The DHCP handler as a fuzz target: one long-lived server (full mode, with a known host and a
//! lease pool) that every datagram is fed to, on port 67 and on 4011. Used by `crate::fuzz` (the
//! stable engine, `fuzz/` for libFuzzer) and by the tests below.

use super::server::DhcpServer;
use crate::appliance::AppState;
use crate::config::Config;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

static SERVER: OnceLock<Mutex<DhcpServer>> = OnceLock::new();

fn server() -> &'static Mutex<DhcpServer> {
    SERVER.get_or_init(|| {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("fleetboot-fuzz-{}", std::process::id()));
        let yaml = "interface: lo\nstate_dir: state\nstore: store\nunknown_hosts: discover\n\
                    dhcp: { mode: full, range: [10.9.0.10, 10.9.0.20], router: 10.9.0.1 }\n\
                    hosts:\n  \"52:54:00:12:34:56\": { hostname: fuzz, ip: 10.9.0.5 }\n";
        let config = Config::parse(&dir.join("fleetboot.yaml"), yaml).expect("fuzz config");
        let state = AppState::new(config, "http://10.9.0.1".into(), None).expect("fuzz state");
        let server = DhcpServer::new(
            state,
            Ipv4Addr::new(10, 9, 0, 1),
            Ipv4Addr::new(255, 255, 255, 0),
        )
        .expect("fuzz server");
        Mutex::new(server)
    })
}

/// Feeds one datagram to the handler, as if it arrived on port 67 and then on 4011; returns how
/// many answers it produced.
pub fn handle_datagram(data: &[u8]) -> usize {
    let mut s = server().lock().unwrap_or_else(|p| p.into_inner());
    let src = SocketAddr::from((Ipv4Addr::new(10, 9, 0, 99), 68));
    usize::from(s.handle(data, src, false).is_some())
        + usize::from(s.handle(data, src, true).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::packet::tests::discover;

    /// A relay on the appliance's subnet is answered through the relay; one on another subnet
    /// is not (the pool's addresses and mask would be wrong there).
    #[test]
    fn relayed_requests_are_answered_to_the_relay() {
        let mut p = discover([0x52, 0x54, 0, 0x12, 0x34, 0x56], &[]);
        let mut s = server().lock().unwrap();
        p[24..28].copy_from_slice(&[10, 50, 0, 1]); // giaddr on another subnet
        let src = SocketAddr::from((Ipv4Addr::new(10, 50, 0, 1), 67));
        assert!(s.handle(&p, src, false).is_none(), "foreign subnet refused");
        p[24..28].copy_from_slice(&[10, 9, 0, 77]); // giaddr on the appliance's subnet
        let src = SocketAddr::from((Ipv4Addr::new(10, 9, 0, 77), 67));
        let reply = s.handle(&p, src, false).expect("an offer");
        assert_eq!(
            reply.to,
            SocketAddr::from((Ipv4Addr::new(10, 9, 0, 77), 67))
        );
        assert_eq!(
            &reply.bytes[16..20],
            &[10, 9, 0, 5],
            "the host's reservation"
        );
        assert_eq!(&reply.bytes[24..28], &[10, 9, 0, 77], "giaddr echoed");
    }

    #[test]
    fn random_and_mutated_packets_never_panic() {
        let target = crate::fuzz::target("dhcp_packet").expect("a target");
        let r = crate::fuzz::run(target, crate::fuzz::Budget::Executions(20_000), 0x9e37_79b9);
        assert_eq!(r.crash_count, 0, "first: {:?}", r.crashes.first());
        // Mutated packets must still reach the deep paths (pool, reply building), not only
        // the validation at the door.
        assert!(
            r.accepted > 1000,
            "only {} answers: the mutations never get past validation",
            r.accepted
        );
    }
}
