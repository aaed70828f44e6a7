//! Talking to the appliance: the boot script (for the token), the assignment, progress, done,
//! failed. Every request is retried with backoff for minutes, so a restarting appliance or a
//! dropped link costs time, not the install; an answer that retrying cannot change (a 4xx: no
//! such image or pack, a token refused) fails at once.

use anyhow::{bail, Context, Result};
use fleetboot_image::api::{cmdline, AgentMode, Assignment, Failed, InstallReport, Progress};
use std::time::Duration;

/// How long a request is retried before the agent gives up: an appliance being restarted or
/// upgraded, or a switch rebooting, takes a minute or two; a machine has nothing better to do.
const RETRY_FOR: Duration = Duration::from_secs(300);
/// The longest wait between two attempts.
const RETRY_WAIT_MAX: Duration = Duration::from_secs(5);

/// The appliance, as one host sees it.
pub struct Client {
    pub server: String,
    pub mac: String,
    token: String,
    http: ureq::Agent,
}

/// An HTTP agent with sane timeouts.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Runs `f` until it succeeds, waiting 0.25, 0.5, 1, 2 … s (at most 5 s) between attempts, for
/// up to `RETRY_FOR`; an error retrying cannot mend is returned at once.
pub fn retry<T>(what: &str, f: impl FnMut() -> Result<T>) -> Result<T> {
    retry_for(what, RETRY_FOR, f)
}

fn retry_for<T>(what: &str, budget: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = std::time::Instant::now();
    let mut wait = Duration::from_millis(250);
    for attempt in 1.. {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if is_permanent(&e) => return Err(e.context(what.to_string())),
            Err(e) if start.elapsed() + wait > budget => {
                return Err(e.context(format!(
                    "{what}: gave up after {attempt} attempts in {:.0} s",
                    start.elapsed().as_secs_f64()
                )))
            }
            Err(e) => {
                eprintln!("fleetboot-agent: {what}: {e:#}; retrying in {wait:?}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_WAIT_MAX);
            }
        }
    }
    unreachable!("the loop returns")
}

/// A 4xx answer (but for timeouts and rate limits) says the request itself is wrong: the image
/// or pack does not exist, the token is refused. Everything else (no route, refused connection,
/// 5xx, a cut transfer) may mend itself.
fn is_permanent(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ureq::Error>() {
        Some(ureq::Error::StatusCode(code)) => {
            (400..500).contains(code) && !matches!(code, 408 | 425 | 429)
        }
        _ => false,
    }
}

impl Client {
    /// A client with a known token, or one obtained by fetching the boot script as iPXE does
    /// (an install's script).
    pub fn new(server: &str, mac: &str, token: Option<String>) -> Result<Client> {
        Self::for_errand(server, mac, token, AgentMode::Install)
    }

    /// The same for an errand: `mode` is what the script must boot the agent for.
    pub fn for_errand(
        server: &str,
        mac: &str,
        token: Option<String>,
        mode: AgentMode,
    ) -> Result<Client> {
        let http = http();
        let token = match token {
            Some(t) => t,
            None => {
                let url = format!("{server}/boot/{mac}.ipxe");
                let script = retry("boot script", || {
                    Ok(http.get(&url).call()?.body_mut().read_to_string()?)
                })?;
                // A script for another errand (inspect, wipe) is not this one's.
                let given = AgentMode::from_words(&script)?;
                if given != mode {
                    bail!("the appliance boots {mac} to {given}, not to {mode}");
                }
                let key = format!("{}=", cmdline::TOKEN);
                match script.split_whitespace().find_map(|w| w.strip_prefix(key.as_str())) {
                    Some(t) => t.to_string(),
                    None => bail!("the appliance has nothing to install on {mac} (its script boots the local disk)"),
                }
            }
        };
        Ok(Client {
            server: server.to_string(),
            mac: mac.to_string(),
            token,
            http,
        })
    }

    fn url(&self, what: &str) -> String {
        format!("{}/api/agent/{}/{what}", self.server, self.mac)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// The install token (store reads carry it too).
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn assignment(&self) -> Result<Assignment> {
        retry("assignment", || {
            let mut resp = self
                .http
                .get(self.url("assignment"))
                .header("authorization", self.bearer())
                .call()?;
            Ok(resp.body_mut().read_json::<Assignment>()?)
        })
    }

    /// Fetches `url` whole, with the install token or (a presigned URL, which carries its own
    /// authorization and would be refused beside a second one) without.
    pub fn fetch_as(&self, url: &str, with_token: bool) -> Result<Vec<u8>> {
        retry(url, || {
            let mut req = self.http.get(url);
            if with_token {
                req = req.header("authorization", self.bearer());
            }
            let mut resp = req.call()?;
            Ok(resp.body_mut().with_config().limit(1 << 30).read_to_vec()?)
        })
        .with_context(|| format!("cannot fetch {url}"))
    }

    /// Best effort: a lost progress report must not stop an install.
    pub fn progress(&self, done: u64, total: u64) {
        let r = self
            .http
            .post(self.url("progress"))
            .header("authorization", self.bearer())
            .send_json(Progress { done, total });
        if let Err(e) = r {
            eprintln!("fleetboot-agent: progress report lost: {e}");
        }
    }

    pub fn done(&self, done: &InstallReport) -> Result<()> {
        retry("done", || {
            self.http
                .post(self.url("done"))
                .header("authorization", self.bearer())
                .send_json(done)?;
            Ok(())
        })
    }

    /// Reports the retired machine's disks wiped.
    pub fn wiped(&self, report: &fleetboot_image::api::WipeReport) -> Result<()> {
        retry("wiped", || {
            self.http
                .post(self.url("wiped"))
                .header("authorization", self.bearer())
                .send_json(report)?;
            Ok(())
        })
    }

    /// Reports the machine's inventory (inspection).
    pub fn inventory(&self, inv: &fleetboot_image::api::Inventory) -> Result<()> {
        retry("inventory", || {
            self.http
                .post(self.url("inventory"))
                .header("authorization", self.bearer())
                .send_json(inv)?;
            Ok(())
        })
    }

    pub fn failed(&self, reason: &str) {
        let body = Failed {
            reason: reason.to_string(),
        };
        let _ = retry("failed", || {
            self.http
                .post(self.url("failed"))
                .header("authorization", self.bearer())
                .send_json(&body)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retried_and_refusals_are_not() {
        let mut calls = 0;
        let r: Result<()> = retry_for("x", Duration::from_secs(10), || {
            calls += 1;
            Err(ureq::Error::StatusCode(404).into())
        });
        assert!(r.is_err());
        assert_eq!(calls, 1, "a 404 is not retried");

        let mut calls = 0;
        let r = retry_for("x", Duration::from_secs(10), || {
            calls += 1;
            if calls < 3 {
                Err(ureq::Error::StatusCode(503).into())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3, "a 503 is retried");

        let mut calls = 0;
        let r: Result<()> = retry_for("x", Duration::from_millis(600), || {
            calls += 1;
            Err(ureq::Error::ConnectionFailed.into())
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("gave up after"), "{e}");
        assert!(
            (2..=4).contains(&calls),
            "retried within the budget: {calls}"
        );
    }
}
