//! `GET /metrics` on its own plain-HTTP listener, scraped after real mTLS
//! traffic.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;

/// One HTTP/1.1 request; returns the status line and the body.
async fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("no response within 30 s")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    (status, body.to_owned())
}

/// The value of the sample line that starts with `series` followed by a space.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// A server with its metrics listener, and that listener's address.
async fn start_with_metrics() -> (TestServer, String) {
    let mut metrics_ready = None;
    let server = TestServer::start_with(Duration::from_secs(10), |config| {
        config.metrics_listen = Some("127.0.0.1:0".into());
        let crate::store::Database::Sqlite { data_dir } = &config.database else {
            panic!("the test servers run on SQLite");
        };
        let path = data_dir.with_file_name("metrics-ready");
        config.metrics_ready_file = Some(path.clone());
        metrics_ready = Some(path);
    })
    .await;
    let metrics_addr = wait_for_ready_file(&metrics_ready.unwrap()).await;
    (server, metrics_addr)
}

#[tokio::test]
async fn metrics_count_agents_rpcs_and_deployments() {
    let (server, metrics_addr) = start_with_metrics().await;

    let mut ci = server.deployments(Role::Ci, "ci");
    ci.submit(submit_request(&[("web-1", "sys-new")]))
        .await
        .unwrap();
    let refused = ci
        .submit(SubmitRequest {
            artifact_json: "{".into(),
            force: false,
            on: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let (_tx, mut stream) = server.connect("web-1", hello()).await;
    assert!(matches!(
        next(&mut stream).await,
        control_message::Kind::DesiredState(_)
    ));

    // Agent connects are counted by a task following the event log, which
    // may be a moment behind the stream's Welcome.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (status, text) = loop {
        let (status, text) = http_get(&metrics_addr, "/metrics").await;
        if text.contains("procurator_agent_connects_total 1")
            || tokio::time::Instant::now() > deadline
        {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.contains("200"), "{status}");
    assert_eq!(sample(&text, "procurator_connected_agents"), 1.0);
    assert_eq!(sample(&text, "procurator_agent_connects_total"), 1.0);
    assert_eq!(
        sample(&text, r#"procurator_deployments{state="running"}"#),
        1.0
    );
    let submit = r#"procurator_rpc_requests_total{method="/procurator.v1.DeploymentService/Submit",code="Ok"}"#;
    assert!(sample(&text, submit) >= 1.0);
    assert_eq!(
        sample(&text, r#"procurator_submits_total{outcome="accepted"}"#),
        1.0
    );
    assert_eq!(sample(&text, r#"procurator_machines{state="sent"}"#), 1.0);
    let refused = r#"{method="/procurator.v1.DeploymentService/Submit",code="InvalidArgument"}"#;
    assert_eq!(
        sample(&text, &format!("procurator_rpc_errors_total{refused}")),
        1.0
    );
    let outcome = r#"procurator_submits_total{outcome="InvalidArgument"}"#;
    assert_eq!(sample(&text, outcome), 1.0);
    assert!(sample(&text, "procurator_event_log_revision") >= 2.0);
    assert!(text.ends_with("# EOF\n"), "{text}");

    let (status, _) = http_get(&metrics_addr, "/other").await;
    assert!(status.contains("404"), "{status}");

    // The metrics listener stops with the server.
    server.signal.cancel();
    drop(stream);
    server.handle.await.unwrap().unwrap();
    assert!(TcpStream::connect(&metrics_addr).await.is_err());
}

#[tokio::test]
async fn a_second_connection_from_the_same_endpoint_resumes_the_tls_session() {
    let (server, metrics_addr) = start_with_metrics().await;

    // As the agent does: one endpoint for its stream and its confirmations.
    let pki_dir = server.dir.path().join("pki");
    let (cert, key) = pki::leaf_paths(&pki_dir, Role::Agent, &"web-1".parse().unwrap());
    let endpoint = TlsFiles {
        ca: pki::ca_cert_path(&pki_dir),
        cert,
        key,
    }
    .load()
    .unwrap()
    .endpoint(&format!("https://{}", server.addr), Duration::from_secs(20))
    .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(hello()).await.unwrap();
    let mut stream = AgentServiceClient::new(endpoint.connect().await.unwrap())
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Reading past the handshake also takes in the session tickets.
    assert!(matches!(
        next(&mut stream).await,
        control_message::Kind::Welcome(_)
    ));
    let second = endpoint.connect().await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(second)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1, "SERVING");

    let (_, text) = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(
        sample(&text, r#"procurator_tls_handshakes_total{kind="full"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"procurator_tls_handshakes_total{kind="resumed"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "procurator_tls_handshake_failures_total"),
        0.0
    );
}
