//! With the endpoint pointing at a closed port, spans are created and
//! `shutdown` still returns within its bound (on a current-thread runtime,
//! where a blocking shutdown would deadlock).

use std::time::{Duration, Instant};

#[tokio::test]
async fn shutdown_with_closed_port_is_bounded() {
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    // A bare host:port, as people often write it: taken as http.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:1");

    let telemetry = telemetry::init("test-missing-collector");
    assert_eq!(telemetry.endpoint(), Some("http://127.0.0.1:1"));
    for i in 0..20 {
        let span = tracing::info_span!("work", i);
        let _entered = span.enter();
        tracing::info!("inside a span");
    }

    let started = Instant::now();
    telemetry.shutdown().await;
    let elapsed = started.elapsed();
    eprintln!("shutdown with a closed port took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}
