//! What a host's installed OS is told about itself on its first boot, as cloud-init's NoCloud
//! data source reads it: `meta-data` (an instance-id new at every install, so cloud-init runs
//! again after a reimage; the hostname; the SSH keys), `user-data` (the operator's cloud-config)
//! and `network-config` (version 2: DHCP on the NIC that PXE-booted, or its static address).
//!
//! Pure functions of the configuration and the host's record: the HTTP side serves them as
//! NoCloud-net (`/meta/{mac}/…`), and the same documents go wherever else the OS may read them.
//! meta-data and network-config are written as JSON, which is YAML, so no value can break them.

use crate::config::Host;
use crate::mac::Mac;

/// The three NoCloud documents of one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCloud {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// The hostname a host gets when the configuration names none: unique, from its MAC.
pub fn default_hostname(mac: Mac) -> String {
    format!("fleetboot-{}", mac.to_string().replace(':', ""))
}

/// The documents for `host`; `instance_id` is the host's current install's (the record's), or
/// `None` before fleetboot ever installed it.
pub fn nocloud(host: &Host, instance_id: Option<&str>) -> NoCloud {
    let mac = host.mac;
    let instance_id = instance_id
        .map(str::to_string)
        .unwrap_or_else(|| default_hostname(mac));
    let hostname = host
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname(mac));
    let meta = serde_json::json!({
        "instance-id": instance_id,
        "local-hostname": hostname,
        "public-keys": host.identity.ssh_authorized_keys,
    });
    let mut nic = serde_json::json!({
        "match": { "macaddress": mac.to_string() },
    });
    match &host.identity.network {
        None => nic["dhcp4"] = true.into(),
        Some(n) => {
            nic["addresses"] = serde_json::json!([format!("{}/{}", n.address, n.prefix)]);
            if let Some(gw) = n.gateway {
                // `0.0.0.0/0`, not `default`: cloud-init before 23.x refuses `default` and
                // then applies no network configuration at all (seen on Debian 12's 22.4).
                nic["routes"] = serde_json::json!([{ "to": "0.0.0.0/0", "via": gw.to_string() }]);
            }
            if !n.dns.is_empty() {
                let dns: Vec<String> = n.dns.iter().map(ToString::to_string).collect();
                nic["nameservers"] = serde_json::json!({ "addresses": dns });
            }
        }
    }
    let network = serde_json::json!({ "version": 2, "ethernets": { "nic0": nic } });
    NoCloud {
        meta_data: pretty(&meta),
        user_data: host
            .identity
            .user_data
            .clone()
            .unwrap_or_else(|| "#cloud-config\n{}\n".into()),
        network_config: pretty(&network),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Identity, StaticNetwork};

    fn host(identity: Identity, hostname: Option<&str>) -> Host {
        Host {
            mac: "52:54:00:ab:cd:01".parse().unwrap(),
            image: None,
            hostname: hostname.map(str::to_string),
            identity,
            group: None,
            disk: Default::default(),
            wipe: Default::default(),
            secure_boot: false,
            ip: None,
            bmc: None,
        }
    }

    #[test]
    fn documents_carry_the_hosts_identity() {
        let h = host(
            Identity {
                ssh_authorized_keys: vec!["ssh-ed25519 AAAA ops: \"quoted\" # not a comment".into()],
                user_data: Some("#cloud-config\nruncmd: [[touch, /x]]\n".into()),
                network: Some(StaticNetwork {
                    address: "10.0.0.5".parse().unwrap(),
                    prefix: 24,
                    gateway: Some("10.0.0.1".parse().unwrap()),
                    dns: vec!["10.0.0.53".parse().unwrap()],
                }),
                cloud_init: Default::default(),
            },
            Some("web-01"),
        );
        let d = nocloud(&h, Some("fleetboot-0123"));
        // YAML readers get exactly the values (JSON is YAML).
        let meta: serde_json::Value = serde_saphyr::from_str(&d.meta_data).unwrap();
        assert_eq!(meta["instance-id"], "fleetboot-0123");
        assert_eq!(meta["local-hostname"], "web-01");
        assert_eq!(
            meta["public-keys"][0],
            "ssh-ed25519 AAAA ops: \"quoted\" # not a comment"
        );
        assert_eq!(d.user_data, "#cloud-config\nruncmd: [[touch, /x]]\n");
        let net: serde_json::Value = serde_saphyr::from_str(&d.network_config).unwrap();
        let nic = &net["ethernets"]["nic0"];
        assert_eq!(net["version"], 2);
        assert_eq!(nic["match"]["macaddress"], "52:54:00:ab:cd:01");
        assert_eq!(nic["addresses"][0], "10.0.0.5/24");
        assert_eq!(nic["routes"][0]["via"], "10.0.0.1");
        assert_eq!(
            nic["routes"][0]["to"], "0.0.0.0/0",
            "what every cloud-init reads"
        );
        assert_eq!(nic["nameservers"]["addresses"][0], "10.0.0.53");
    }

    #[test]
    fn defaults_are_dhcp_a_unique_hostname_and_empty_cloud_config() {
        let d = nocloud(&host(Identity::default(), None), None);
        let meta: serde_json::Value = serde_saphyr::from_str(&d.meta_data).unwrap();
        assert_eq!(meta["local-hostname"], "fleetboot-525400abcd01");
        assert_eq!(meta["instance-id"], "fleetboot-525400abcd01");
        let net: serde_json::Value = serde_saphyr::from_str(&d.network_config).unwrap();
        assert_eq!(net["ethernets"]["nic0"]["dhcp4"], true);
        assert!(d.user_data.starts_with("#cloud-config"));
    }
}
