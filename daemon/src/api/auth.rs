//! Peer-credential authorization.

use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use nix::unistd::Group;
use tokio::net::UnixListener;

use super::ApiError;
use crate::pipeline::Node;

/// Who is on the other end of the socket, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// Process id (used to read supplementary groups).
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Self {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            // No credentials: treat as the least privileged user possible.
            Err(_) => Self {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        }
    }
}

/// What a peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing.
    None,
    /// Read jobs, logs, attestations, blobs.
    Audit,
    /// Also submit and cancel.
    Submit,
}

/// Supplementary groups of a live process, from `/proc/<pid>/status`.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn gid_of(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Role of a peer under the configured groups.
pub fn role_of(peer: &Peer, submit_group: &str, audit_group: &str) -> Role {
    if peer.uid == 0 {
        return Role::Submit;
    }
    let mut groups = vec![peer.gid];
    if let Some(pid) = peer.pid {
        groups.extend(supplementary_groups(pid));
    }
    let member = |name: &str| gid_of(name).is_some_and(|g| groups.contains(&g));
    if member(submit_group) {
        Role::Submit
    } else if member(audit_group) {
        Role::Audit
    } else {
        Role::None
    }
}

/// Middleware: reads need [`Role::Audit`], everything else [`Role::Submit`].
pub async fn authorize(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let api = &node.config.api;
    let role = role_of(&peer, &api.submit_group, &api.audit_group);
    let needed = if matches!(*req.method(), Method::GET | Method::HEAD) {
        Role::Audit
    } else {
        Role::Submit
    };
    if role < needed {
        tracing::info!(uid = peer.uid, gid = peer.gid, method = %req.method(), path = %req.uri().path(), "request refused: not authorized");
        let what = if needed == Role::Submit {
            format!("root or members of group {:?}", api.submit_group)
        } else {
            format!(
                "root or members of groups {:?} or {:?}",
                api.submit_group, api.audit_group
            )
        };
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "uid {} is not authorized: only {what} may do this",
                peer.uid
            ),
        )
        .into_response();
    }
    next.run(req).await
}
