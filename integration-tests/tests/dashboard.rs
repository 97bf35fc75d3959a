//! `procurator-ctl dashboard` against a real control plane and three real
//! agents, spoken to over plain HTTP/1.1: nothing without its token, the
//! page sets the cookie, and the API answers what ctl's `--output json`
//! does (the fleet with its closures, the history, a machine's log).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Stdio};

use procurator_integration_tests::{Fleet, MACHINES};
use serde_json::{Value, json};

/// The dashboard process, killed on drop.
struct Dashboard {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    token: String,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request: the status code, the headers (lower-case names)
/// and the body.
fn get(addr: &str, target: &str, cookie: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let cookie = cookie.map(|c| ("Cookie", c));
    get_with(addr, target, cookie.as_slice())
}

fn get_with(
    addr: &str,
    target: &str,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the dashboard");
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header and a body");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (code, headers, body.to_owned())
}

/// The server-sent events of a body: (id, event, data as JSON).
fn sse_events(body: &str) -> Vec<(u64, String, Value)> {
    // Chunked transfer: only `id:`/`event:`/`data:` lines matter here.
    let mut events = Vec::new();
    let (mut id, mut kind) = (None, String::new());
    for line in body.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            let data = serde_json::from_str(v.trim()).expect("JSON data");
            events.push((
                id.take().expect("an id before the data"),
                kind.clone(),
                data,
            ));
        }
    }
    events
}

fn json_of(addr: &str, target: &str, cookie: &str) -> Value {
    let (code, _, body) = get(addr, target, Some(cookie));
    assert_eq!(code, 200, "{target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

#[test]
fn the_dashboard_needs_its_token_and_shows_the_fleet_history_and_logs() {
    let fleet = Fleet::start().expect("fleet");
    let ctl = fleet.ctl().expect("ctl");
    let (closures, artifact, commit) = fleet.prepare(&json!({ "generation": 1 })).expect("prepare");
    ctl.run(&["submit", artifact.to_str().expect("utf-8"), "--wait"])
        .expect("submit")
        .expect_code(0)
        .expect("deployed");
    let id = fleet.deployment_id(&commit).expect("deployment id");

    let mut command = ctl.command();
    command
        .args(["dashboard", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("start the dashboard");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("the URL");
    let url = first.trim();
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("a URL: {url:?}"));
    let (addr, token) = rest.split_once("/?token=").expect("a token in the URL");
    let dashboard = Dashboard {
        child,
        addr: addr.to_owned(),
        token: token.to_owned(),
    };
    assert_eq!(dashboard.token.len(), 64, "{url}");

    // Nothing without the token: neither the API nor the page.
    for target in ["/api/agents", "/", "/app.js", "/api/agents?token=wrong"] {
        let (code, _, body) = get(&dashboard.addr, target, None);
        assert_eq!(code, 401, "{target}: {body}");
        assert!(body.contains("needs its token"), "{target}: {body}");
    }
    let (code, _, _) = get(
        &dashboard.addr,
        "/api/agents",
        Some("procurator-dashboard=wrong"),
    );
    assert_eq!(code, 401);

    // The page, with the token in its URL, hands out the cookie.
    let (code, headers, body) = get(
        &dashboard.addr,
        &format!("/?token={}", dashboard.token),
        None,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<script src=\"/app.js\">"), "{body}");
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap_or_default().to_owned())
        .expect("a cookie");
    assert!(headers.iter().any(|(k, v)| k == "set-cookie"
        && v.contains("HttpOnly")
        && v.contains("SameSite=Strict")));
    let (code, _, script) = get(&dashboard.addr, "/app.js", Some(&cookie));
    assert_eq!(code, 200);
    assert!(script.contains("textContent"), "the script is served");

    // The fleet: the three agents, connected, with what they run.
    let agents = json_of(&dashboard.addr, "/api/agents", &cookie);
    let seen: Vec<(&str, bool, &str)> = agents
        .as_array()
        .expect("a list")
        .iter()
        .map(|a| {
            (
                a["machine"].as_str().unwrap_or_default(),
                a["connected"] == true,
                a["currentSystem"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let wanted: Vec<(&str, bool, &str)> = MACHINES
        .iter()
        .map(|m| (*m, true, closures[*m].as_str()))
        .collect();
    assert_eq!(seen, wanted, "{agents}");

    // The history, one deployment's rows, a machine's deployments and log.
    let listed = json_of(&dashboard.addr, "/api/deployments", &cookie);
    assert_eq!(listed[0]["id"], json!(id), "{listed}");
    assert_eq!(listed[0]["state"], "succeeded", "{listed}");
    let rows = json_of(
        &dashboard.addr,
        &format!("/api/deployments/{id}/machines"),
        &cookie,
    );
    assert_eq!(
        rows["machines"].as_array().map(Vec::len),
        Some(MACHINES.len()),
        "{rows}"
    );
    assert_eq!(rows["nextPageToken"], Value::Null, "{rows}");
    let history = json_of(&dashboard.addr, "/api/machines/worker-1", &cookie);
    assert_eq!(history[0]["deploymentId"], json!(id), "{history}");
    assert_eq!(history[0]["hasLog"], true, "{history}");
    let log = json_of(
        &dashboard.addr,
        &format!("/api/machines/worker-1/log?deployment={id}"),
        &cookie,
    );
    let output = log["output"].as_str().unwrap_or_default();
    assert!(
        output.contains(&format!("== succeeded: {} runs", closures["worker-1"])),
        "{log}"
    );

    // The deployment's events as server-sent events: every one, in order,
    // the finishing one last; a reconnect with Last-Event-ID gets only
    // what came after it.
    let target = format!("/api/deployments/{id}/events");
    let (code, headers, body) = get(&dashboard.addr, &target, Some(&cookie));
    assert_eq!(code, 200, "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")),
        "{headers:?}"
    );
    let all = sse_events(&body);
    let revisions: Vec<u64> = all.iter().map(|(id, _, _)| *id).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "in order: {revisions:?}"
    );
    assert_eq!(all.last().map(|e| e.1.as_str()), Some("finished"), "{body}");
    for m in MACHINES {
        assert!(
            all.iter()
                .any(|(_, _, d)| d["machine"] == *m && d["state"] == "succeeded"),
            "{m} succeeded in the events: {body}"
        );
    }
    let middle = revisions[revisions.len() / 2];
    let last_seen = middle.to_string();
    let (_, _, body) = get_with(
        &dashboard.addr,
        &target,
        &[("Cookie", &cookie), ("Last-Event-ID", &last_seen)],
    );
    let after: Vec<u64> = sse_events(&body).iter().map(|(id, _, _)| *id).collect();
    let expected: Vec<u64> = revisions.iter().copied().filter(|r| *r > middle).collect();
    assert_eq!(after, expected, "resumed after {middle}");

    // What the control plane refuses comes back as an error, with its reason.
    let (code, _, body) = get(
        &dashboard.addr,
        "/api/deployments/d-nope/machines",
        Some(&cookie),
    );
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, _, body) = get(&dashboard.addr, "/api/machines/db-9/log", Some(&cookie));
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("no kept deployment has a row for db-9"),
        "{body}"
    );
}
