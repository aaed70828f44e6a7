//! `/store/packs/{id}.pack`: pack files by HTTP Range, the agent's hot path.
//!
//! Frames are read with one `pread` each from a pack file kept open (packs are immutable) into a
//! reused buffer, and sent as one body. ServeDir opened, stat'ed and read each file in 64 KiB
//! steps per request; this does one blocking call per request (measured in docs/benchmarks.md).

use super::{AppState, Peer};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use fleetboot_image::PackId;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Larger reads (a whole pack without Range) are streamed instead of read into memory.
const BUFFERED_BYTES_MAX: usize = 16 << 20;

/// A response body that gives its buffer back when hyper is done sending it: a fresh 1 MiB
/// buffer per request cost page faults, zeroing and unmapping (12 % of the time, by perf).
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Its share of the bytes buffered at once, given back with the buffer.
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// Buffers larger than this are not kept for reuse (the pool stays within
/// `BUFFERS_KEPT_MAX` × this).
const BUFFER_KEPT_BYTES_MAX: usize = 4 << 20;

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < crate::store::BUFFERS_KEPT_MAX
            && self.buf.capacity() <= BUFFER_KEPT_BYTES_MAX
        {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `len` bytes: the first and
/// last byte, both within the file.
pub fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.checked_sub(n.min(len))?, len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && end < len).then_some((start, end))
}

pub async fn get(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    Peer(peer): Peer,
    req: Request,
) -> Response {
    let headers = req.headers();
    if let Err(e) = super::store_access(&st, headers, peer) {
        return e.into_response();
    }
    let Some(id) = name
        .strip_suffix(".pack")
        .and_then(|s| s.parse::<PackId>().ok())
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !st.store.is_local() {
        return from_object_store(&st, id, headers).await;
    }
    let Some(pack) = st.packs.get(&st.store, &id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = pack.1;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, status) = match range {
        None => match len.checked_sub(1) {
            Some(last) => (0, last, StatusCode::OK),
            None => return (StatusCode::OK, [(header::CONTENT_LENGTH, "0")]).into_response(),
        },
        Some(r) => match parse_range(r, len) {
            Some((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            None => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response()
            }
        },
    };
    let count = (end - start + 1) as usize;
    if count > BUFFERED_BYTES_MAX {
        use tower::ServiceExt;
        // By path: a gc may move the pack to retired/ between the lookup and the open, so the
        // other place is tried too before answering 404 (which the agent takes as final).
        let (live, retired) = (st.store.pack_path(&id), st.store.retired_pack_path(&id));
        let order = if live.exists() {
            [live, retired]
        } else {
            [retired, live]
        };
        let (parts, body) = req.into_parts();
        let mut last = StatusCode::NOT_FOUND.into_response();
        for path in order {
            let req = Request::from_parts(parts.clone(), Body::empty());
            let resp = match tower_http::services::ServeFile::new(path)
                .oneshot(req)
                .await
            {
                Ok(resp) => resp.map(Body::new),
                Err(never) => match never {},
            };
            if resp.status() != StatusCode::NOT_FOUND {
                return resp;
            }
            last = resp;
        }
        drop(body);
        return last;
    }
    // A bound on the bytes held for responses at once: stalled readers wait here instead of
    // each pinning another buffer.
    let Ok(budget) = st
        .http_buffer_budget
        .clone()
        .acquire_many_owned(count as u32)
        .await
    else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    // Packs being served are hot in the page cache: the read is a copy, quicker than a hop to
    // the blocking pool and back. block_in_place keeps a cold read from stalling other tasks.
    let mut buf = st
        .packs
        .buffers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default();
    if buf.len() < count {
        buf.resize(count, 0);
    }
    let read = tokio::task::block_in_place(|| pack.0.read_exact_at(&mut buf[..count], start));
    if read.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let body = bytes::Bytes::from_owner(Pooled {
        buf,
        len: count,
        pool: st.packs.buffers.clone(),
        _budget: budget,
    });
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

/// A frame of a pack in object storage, through the verified frame cache. Only a Range of
/// exactly one frame that a manifest names is answered (that is what agents ask for).
async fn from_object_store(st: &AppState, id: PackId, headers: &header::HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    // Frames are at most a few MiB: a wider range is not one (and `u64::MAX` would overflow).
    let Some((start, end)) = range.filter(|(a, b)| a <= b && b - a < u64::from(u32::MAX)) else {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            "a pack in object storage is served by frame: give the Range of one frame",
        )
            .into_response();
    };
    match st.frames.get(&st.store, id, start, end - start + 1).await {
        Ok(body) => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            // The pack's length is not known without asking the object store: RFC 9110 `*`.
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{end}/*")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            resp
        }
        Err(e @ crate::appliance::frames::FrameError::Unknown { .. }) => {
            (StatusCode::NOT_FOUND, e.to_string()).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "frame from the object store");
            (StatusCode::BAD_GATEWAY, e.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        for bad in [
            "bytes=100-",
            "bytes=5-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=x-1",
            "bytes=-0",
        ] {
            assert_eq!(parse_range(bad, 100), None, "{bad}");
        }
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
