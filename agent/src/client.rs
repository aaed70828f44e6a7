//! Talking to the appliance: the boot script (for the token), the assignment, progress, done,
//! failed. Every request is retried with backoff, so a restarting appliance or a dropped link
//! costs time, not the install.

use anyhow::{bail, Context, Result};
use fleetboot_image::api::{cmdline, Assignment, Failed, InstallReport, Progress};
use std::time::Duration;

/// Attempts per request before giving up.
const ATTEMPTS_MAX: u32 = 8;

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

/// Runs `f` until it succeeds, waiting 0.25, 0.5, 1, 2 … s (at most 8 s) between attempts.
pub fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut wait = Duration::from_millis(250);
    for attempt in 1.. {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= ATTEMPTS_MAX => {
                return Err(e.context(format!("{what}: gave up after {attempt} attempts")))
            }
            Err(e) => {
                eprintln!("fleetboot-agent: {what}: {e:#}; retrying in {wait:?}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(8));
            }
        }
    }
    unreachable!("the loop returns")
}

impl Client {
    /// A client with a known token, or one obtained by fetching the boot script as iPXE does.
    pub fn new(server: &str, mac: &str, token: Option<String>) -> Result<Client> {
        let http = http();
        let token = match token {
            Some(t) => t,
            None => {
                let url = format!("{server}/boot/{mac}.ipxe");
                let script = retry("boot script", || {
                    Ok(http.get(&url).call()?.body_mut().read_to_string()?)
                })?;
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

    /// Fetches a whole small document (a manifest).
    pub fn fetch(&self, url: &str) -> Result<Vec<u8>> {
        retry(url, || {
            let mut resp = self
                .http
                .get(url)
                .header("authorization", self.bearer())
                .call()?;
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
