//! Guest ports other than envd's and the code interpreter's, as E2B's `get_host(port)` names
//! them: each HTTP request is carried to the port on the guest's loopback through an agent
//! connection turned into a TCP stream (`tcp_connect`), over vsock, so no guest network is
//! needed. Without a daemon token the ports are open, as E2B's public sandbox URLs are; with
//! one, a request must carry the sandbox's access token (`X-Access-Token` or
//! `E2B-Traffic-Access-Token`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;

use super::envd::Target;
use super::{E2b, E2bError};
use crate::api::blocking;
use crate::api::process::{agent_error, agent_of};

/// The headers that route a request to a sandbox port: for forkd, not for the guest.
const ROUTING_HEADERS: [&str; 2] = ["e2b-sandbox-id", "e2b-sandbox-port"];

pub async fn forward(e2b: Arc<E2b>, target: Target, port: u16, request: Request) -> Response {
    match try_forward(&e2b, &target, port, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn carries_access(e2b: &E2b, target: &Target, request: &Request) -> bool {
    let expected = e2b.access_token(&target.id);
    ["x-access-token", "e2b-traffic-access-token"]
        .iter()
        .filter_map(|name| request.headers().get(*name))
        .any(|t| bool::from(t.as_bytes().ct_eq(expected.as_bytes())))
}

fn port_closed(target: &Target, port: u16, why: &str) -> E2bError {
    E2bError::new(
        StatusCode::BAD_GATEWAY,
        format!(
            "The sandbox {} is running but port {port} is not open ({why})",
            target.id
        ),
    )
}

async fn try_forward(
    e2b: &E2b,
    target: &Target,
    port: u16,
    mut request: Request,
) -> Result<Response, E2bError> {
    if e2b.requires_key() && !carries_access(e2b, target, &request) {
        return Err(E2bError::new(
            StatusCode::UNAUTHORIZED,
            format!("port {port} of sandbox {}: this daemon has a token, so a forwarded port needs the sandbox's access token (X-Access-Token)", target.id),
        ));
    }
    let (record, client) = agent_of(&e2b.state, target.id.clone(), "port forward").await?;
    let tunnel = blocking(move || match client.tcp_connect(port) {
        Ok((stream, _)) => Ok(Ok(stream)),
        // The agent answered: the port is closed. Anything else is the agent's failure.
        Err(forkd_agent::client::ClientError::Agent { message, .. }) => Ok(Err(message)),
        Err(e) => Err(agent_error(&record, format!("port {port}"), e)),
    })
    .await??;
    let stream = tunnel.map_err(|why| port_closed(target, port, &why))?;
    let io = stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
        .map_err(|e| port_closed(target, port, &e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| port_closed(target, port, &e.to_string()))?;
    tokio::spawn(connection);
    for name in ROUTING_HEADERS {
        request.headers_mut().remove(HeaderName::from_static(name));
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| port_closed(target, port, &format!("the guest's server: {e}")))?;
    Ok(response.map(Body::new))
}
