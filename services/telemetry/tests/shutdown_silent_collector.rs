//! With the endpoint pointing at a listener that accepts TCP but never speaks
//! HTTP/2, `shutdown` still returns within its bound.

use std::net::TcpListener;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_silent_collector_is_bounded() {
    // The kernel completes handshakes into the backlog; nobody reads.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);

    let telemetry = telemetry::init("test-silent-collector");
    assert_eq!(telemetry.endpoint(), Some(endpoint.as_str()));
    for i in 0..20 {
        let span = tracing::info_span!("work", i);
        let _entered = span.enter();
        tracing::info!("inside a span");
    }

    let started = Instant::now();
    telemetry.shutdown().await;
    let elapsed = started.elapsed();
    eprintln!("shutdown with a silent collector took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    drop(silent);
}
