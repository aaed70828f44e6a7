//! Redfish over HTTPS (DMTF DSP0266): the system's `PowerState`, `ComputerSystem.Reset`, and a
//! one-time boot override (`BootSourceOverrideTarget: Pxe`, `Enabled: Once`) read back after it
//! is set. Basic auth on every request (no session to leak or expire); the certificate is
//! checked unless `tls_verify: false` (against `ca_file` when given, else Mozilla's roots).

use super::{Bmc, BmcError, PowerAction, PowerState};
use serde_json::{json, Value};
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

fn fail(bmc: &Bmc, message: impl Into<String>) -> BmcError {
    BmcError::Redfish {
        address: bmc.address.clone(),
        message: message.into(),
    }
}

/// One BMC's HTTPS client, its credentials and the system's path.
struct Client<'a> {
    bmc: &'a Bmc,
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl<'a> Client<'a> {
    fn new(bmc: &'a Bmc) -> Result<Client<'a>, BmcError> {
        use base64::Engine as _;
        let mut tls = TlsConfig::builder().disable_verification(!bmc.tls_verify);
        if let Some(path) = &bmc.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| fail(bmc, format!("ca_file {}: {e}", path.display())))?;
            let certs = parse_pem_certs(&pem)
                .map_err(|e| fail(bmc, format!("ca_file {}: {e}", path.display())))?;
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let password = bmc.password()?;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                bmc.username,
                password.expose()
            ))
        );
        let host = if bmc.address.contains(':') && !bmc.address.starts_with('[') {
            format!("[{}]", bmc.address) // an IPv6 literal
        } else {
            bmc.address.clone()
        };
        Ok(Client {
            bmc,
            agent,
            base: format!("https://{host}:{}", bmc.port.unwrap_or(443)),
            auth,
        })
    }

    /// Sends a request; the JSON answer of a 2xx (`Null` for an empty body), or the BMC's
    /// Redfish error message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, BmcError> {
        // Paths come from the BMC's own answers: never let one point the credentials elsewhere.
        if !path.starts_with('/') || path.starts_with("//") || path.contains('@') {
            return Err(fail(
                self.bmc,
                format!("refusing the path {path:?} it gave"),
            ));
        }
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(&b),
            (_, b) => self
                .agent
                .patch(&url)
                .header("Authorization", &self.auth)
                .send_json(b.unwrap_or(Value::Null)),
        };
        let mut resp = result.map_err(|e| {
            // rustls' refusals arrive wrapped in io errors: known by what they say.
            let hint = if e.to_string().contains("certificate") {
                " (give the CA that signed the BMC's certificate as bmc.ca_file)"
            } else {
                ""
            };
            fail(self.bmc, format!("{method} {path}: {e}{hint}"))
        })?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            return Err(fail(
                self.bmc,
                format!("{method} {path}: {status}{}", redfish_message(&value)),
            ));
        }
        Ok(value)
    }

    /// The system's path: `bmc.system` under the Systems collection, or its only member.
    fn system(&self) -> Result<String, BmcError> {
        if let Some(id) = &self.bmc.system {
            return Ok(format!("/redfish/v1/Systems/{id}"));
        }
        let systems = self.call("GET", "/redfish/v1/Systems", None)?;
        let members: Vec<&str> = systems["Members"]
            .as_array()
            .map(|m| m.iter().filter_map(|x| x["@odata.id"].as_str()).collect())
            .unwrap_or_default();
        match members.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(fail(self.bmc, "the BMC lists no system")),
            many => Err(fail(
                self.bmc,
                format!(
                    "the BMC lists {} systems ({}): name one with bmc.system",
                    many.len(),
                    many.join(", ")
                ),
            )),
        }
    }
}

/// The message of a Redfish error answer, if it has one.
fn redfish_message(v: &Value) -> String {
    let e = &v["error"];
    let m = e["@Message.ExtendedInfo"][0]["Message"]
        .as_str()
        .or(e["message"].as_str())
        .or(v.as_str());
    m.map(|m| format!(": {}", m.trim())).unwrap_or_default()
}

fn parse_pem_certs(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_string())?;
    let mut certs = Vec::new();
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let mut rest = text;
    while let Some(start) = rest.find(begin) {
        let stop = rest[start..]
            .find(end)
            .ok_or("a certificate has no END line")?
            + start
            + end.len();
        let cert = Certificate::from_pem(&rest.as_bytes()[start..stop])
            .map_err(|e| format!("a certificate cannot be read: {e}"))?;
        certs.push(cert);
        rest = &rest[stop..];
    }
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

fn parse_power(v: &Value) -> Option<PowerState> {
    match v["PowerState"].as_str()? {
        "On" | "PoweringOn" | "Paused" => Some(PowerState::On),
        "Off" | "PoweringOff" => Some(PowerState::Off),
        _ => None,
    }
}

pub(super) fn power_state(bmc: &Bmc) -> Result<PowerState, BmcError> {
    let c = Client::new(bmc)?;
    let system = c.call("GET", &c.system()?, None)?;
    parse_power(&system).ok_or_else(|| {
        fail(
            bmc,
            format!("the system reports PowerState {}", system["PowerState"]),
        )
    })
}

pub(super) fn power(bmc: &Bmc, action: PowerAction) -> Result<(), BmcError> {
    let c = Client::new(bmc)?;
    let path = c.system()?;
    let system = c.call("GET", &path, None)?;
    let target = system["Actions"]["#ComputerSystem.Reset"]["target"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{path}/Actions/ComputerSystem.Reset"));
    let reset = match action {
        PowerAction::On => "On",
        PowerAction::Off => "ForceOff",
        PowerAction::Cycle => "ForceRestart",
    };
    // Many BMCs refuse On when on and ForceOff when off: already there is done.
    let state = parse_power(&system);
    if matches!(
        (action, state),
        (PowerAction::On, Some(PowerState::On)) | (PowerAction::Off, Some(PowerState::Off))
    ) {
        return Ok(());
    }
    c.call("POST", &target, Some(json!({ "ResetType": reset })))?;
    Ok(())
}

pub(super) fn pxe_next_boot(bmc: &Bmc) -> Result<(), BmcError> {
    let c = Client::new(bmc)?;
    let path = c.system()?;
    c.call(
        "PATCH",
        &path,
        Some(json!({ "Boot": {
            "BootSourceOverrideTarget": "Pxe",
            "BootSourceOverrideEnabled": "Once",
        }})),
    )?;
    let back = c.call("GET", &path, None)?;
    match back["Boot"]["BootSourceOverrideTarget"].as_str() {
        Some("Pxe") => Ok(()),
        other => Err(fail(
            bmc,
            format!(
                "the BMC did not take Pxe as the next boot device (it reads back {})",
                other.unwrap_or("nothing")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redfish_answers() {
        assert_eq!(
            parse_power(&json!({"PowerState": "On"})),
            Some(PowerState::On)
        );
        assert_eq!(
            parse_power(&json!({"PowerState": "PoweringOff"})),
            Some(PowerState::Off)
        );
        assert_eq!(parse_power(&json!({})), None);
        let err = json!({"error": {"code": "Base.1.0.GeneralError", "message": "x",
            "@Message.ExtendedInfo": [{"Message": "The action is not supported."}]}});
        assert_eq!(redfish_message(&err), ": The action is not supported.");
        assert!(parse_pem_certs(b"not pem").is_err());
    }
}
