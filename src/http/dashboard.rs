//! The dashboard at `/`: every host, its assigned and installed image and live progress; the
//! page reloads itself every two seconds.

use super::api::current_views;
use super::{blocking, AppState};
use axum::extract::State;
use axum::response::Html;
use std::fmt::Write;
use std::sync::Arc;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub async fn page(State(st): State<Arc<AppState>>) -> Html<String> {
    let (views, events) = blocking(move || {
        let views = current_views(&st).unwrap_or_default();
        let events = st.fleet().events(15).unwrap_or_default();
        Ok((views, events))
    })
    .await
    .unwrap_or_default();
    let mut s = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>\
         <title>fleetboot</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}\
         .bar{background:#eee;width:10em;height:.8em}.bar div{background:#2a7;height:100%}\
         .failed{color:#b00}.installed{color:#070}</style></head><body><h1>fleetboot</h1>",
    );
    let _ = write!(
        s,
        "<table id=hosts><tr><th>MAC</th><th>hostname</th><th>group</th><th>assigned</th>\
         <th>installed</th><th>status</th><th>progress</th><th>power</th><th>IP</th><th>hardware</th><th>detail</th><th>install log</th></tr>"
    );
    for v in &views {
        let _ = write!(
            s,
            "<tr class=\"{status}\"><td>{mac}</td><td>{host}</td><td>{group}</td><td>{image}</td><td>{inst}</td>\
             <td class=status>{status}{re}</td><td><div class=bar><div style=\"width:{pct}%\"></div></div></td>\
             <td class=power title=\"{power_full}\">{power}</td><td>{ip}</td><td>{hw}</td><td>{detail}</td><td><a href=\"/api/hosts/{mac}/log\">log</a></td></tr>",
            mac = esc(&v.mac),
            host = esc(v.hostname.as_deref().unwrap_or("")),
            group = esc(v.group.as_deref().unwrap_or("")),
            image = esc(v.image.as_deref().unwrap_or("(local disk)")),
            inst = esc(&v.installed.as_ref().map(ToString::to_string).unwrap_or_default()),
            status = esc(&v.status),
            re = if v.reimage {
                " (reimage requested)"
            } else if v.pending {
                " (installs at next boot)"
            } else {
                ""
            },
            pct = v.progress_pct,
            power = match v.power.as_deref() {
                Some(p @ ("on" | "off")) => p,
                Some(_) => "unknown",
                None => "",
            },
            power_full = esc(v.power.as_deref().unwrap_or("")),
            hw = esc(v.hardware.as_deref().unwrap_or("")),
            ip = esc(v.ip.as_deref().unwrap_or("")),
            detail = esc(v.detail.as_deref().unwrap_or("")),
        );
    }
    s.push_str("</table><h2>Events</h2><ul>");
    for e in events {
        let _ = write!(
            s,
            "<li>{} {} {} {}</li>",
            e.ts,
            esc(e.mac.as_deref().unwrap_or("")),
            esc(&e.kind),
            esc(e.detail.as_deref().unwrap_or(""))
        );
    }
    s.push_str("</ul></body></html>");
    Html(s)
}
