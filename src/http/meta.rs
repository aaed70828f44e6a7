//! `/meta/{mac}/{meta-data|user-data|vendor-data|network-config}`: each host's NoCloud-net data
//! (`appliance::cloudinit`), for installed images whose cloud-init is told to fetch it
//! (`ds=nocloud-net;s=http://APPLIANCE/meta/MAC/`).
//!
//! User data may hold secrets: a host's documents go only to the address that host has (the
//! one DHCP gave its MAC — an address handed to another MAC moves; with DHCP off, the one its
//! install token was bound to, else the last one seen), or to a holder of the admin token.

use super::{bearer, blocking, AppError, AppState, Peer};
use crate::appliance::cloudinit;
use crate::mac::Mac;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use std::sync::Arc;

pub async fn get(
    State(st): State<Arc<AppState>>,
    Path((mac, doc)): Path<(String, String)>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let admin = matches!(
        (&st.admin_token, bearer(&headers)),
        (Some(a), Some(g)) if crate::appliance::same_secret(a, g)
    );
    blocking(move || {
        let mac: Mac = mac
            .parse()
            .map_err(|_| AppError(StatusCode::NOT_FOUND, "not a MAC".into()))?;
        let config = st.config();
        let host = config
            .hosts
            .get(&mac)
            .ok_or_else(|| AppError(StatusCode::NOT_FOUND, format!("{mac} is not a host")))?;
        let record = st.fleet().host(mac)?;
        if !admin {
            // DHCP's knowledge moves with the leases; only without DHCP do the token's address
            // and the last one seen stand in (they may be stale after the machine is gone).
            let known: Option<IpAddr> = match st.address_of(mac) {
                Some(ip) => Some(IpAddr::V4(ip)),
                None if config.dhcp.mode == crate::config::DhcpMode::Off => record
                    .as_ref()
                    .and_then(|r| r.token.as_ref().map(|t| t.ip))
                    .or_else(|| record.as_ref().and_then(|r| r.ip.as_deref()?.parse().ok())),
                None => None,
            };
            match known {
                Some(ip) if crate::appliance::canonical(ip) == peer => {}
                Some(ip) => {
                    tracing::warn!(%mac, %peer, "refused the host's cloud-init data: it has {ip}");
                    return Err(AppError(
                        StatusCode::FORBIDDEN,
                        format!("{mac}'s data is served only to its address"),
                    ));
                }
                None => {
                    return Err(AppError(
                        StatusCode::FORBIDDEN,
                        format!("no address is known for {mac} yet"),
                    ))
                }
            }
        }
        let docs = cloudinit::nocloud(host, record.as_ref().and_then(|r| r.instance_id.as_deref()));
        let body = match doc.as_str() {
            "meta-data" => docs.meta_data,
            "user-data" => docs.user_data,
            "network-config" => docs.network_config,
            "vendor-data" => String::new(),
            _ => return Err(AppError(StatusCode::NOT_FOUND, format!("no {doc}"))),
        };
        Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
    })
    .await
}
