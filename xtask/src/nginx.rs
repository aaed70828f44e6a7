//! nginx serving a store folder at `/store/` (sendfile and tcp_nopush on), the anchor the
//! serve and fleet benchmarks measure the appliance against.

use anyhow::{Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;

/// Writes a configuration in `dir` (its own pid, logs and temp paths there) that serves `store`
/// at `http://LISTEN/store/`, and sets `cmd` (a command running `nginx`, in the namespace of the
/// caller's choosing) to run it in the foreground.
pub fn configure(
    cmd: &mut Command,
    dir: &Path,
    listen: &str,
    store: &Path,
    worker_connections: usize,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    fs::write(
        &conf,
        format!(
            "user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {listen};
        location /store/ {{ alias {}/; }}
    }}
}}
",
            store.display()
        ),
    )
    .with_context(|| format!("cannot write {}", conf.display()))?;
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"]);
    Ok(())
}
