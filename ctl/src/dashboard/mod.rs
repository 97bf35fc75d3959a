//! `procurator-ctl dashboard`: a web view of the fleet, served from the
//! operator's own machine. A loopback HTTP server (axum) whose every
//! request must carry a random token — in the URL printed at start, then
//! in a cookie the first page sets — and whose data comes from the control
//! plane's gRPC API with the operator's own certificate. The control plane
//! serves nothing new; the page and its script are built into the binary.

mod api;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng as _;
use tokio::sync::Mutex;

use crate::connection::Connection;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The cookie that carries the token after the first page.
const COOKIE: &str = "procurator-dashboard";

/// What every handler shares: one connection, taken in turn (a dashboard
/// has one operator), and the token.
pub struct Dashboard {
    pub conn: Mutex<Connection>,
    token: String,
}

/// A token as Jupyter's: 32 random bytes, hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds `listen` and returns the router's task-to-be and the URL to open.
pub async fn bind(
    conn: Connection,
    listen: SocketAddr,
) -> anyhow::Result<(tokio::net::TcpListener, Router, String)> {
    let token = new_token();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr().context("the listening address")?;
    let url = format!("http://{addr}/?token={token}");
    let state = Arc::new(Dashboard {
        conn: Mutex::new(conn),
        token,
    });
    let router = Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE_CSS, "text/css; charset=utf-8")),
        )
        .merge(api::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    Ok((listener, router, url))
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// The page; a visit with the token in its URL also sets the cookie, so
/// that the page's own requests (and a reload) carry it.
async fn index(State(state): State<Arc<Dashboard>>) -> Response {
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        state.token
    );
    let mut response = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Every request carries the token, in `?token=` or in the cookie, or is
/// refused with 401 and what to do.
async fn require_token(
    State(state): State<Arc<Dashboard>>,
    request: Request,
    next: Next,
) -> Response {
    let from_query = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("token="))
        .any(|given| same(given, &state.token));
    if from_query || cookie_token(request.headers()).is_some_and(|given| same(&given, &state.token))
    {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "this dashboard needs its token: open the URL `procurator-ctl dashboard` printed (it ends in ?token=…)\n",
    )
        .into_response()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            pair.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
        .next()
}

/// Equal, in time that does not depend on where they differ.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a[..63], &a));
        assert!(!same("", &a));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; procurator-dashboard=abc; b=2"),
        );
        assert_eq!(cookie_token(&headers).as_deref(), Some("abc"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }
}
