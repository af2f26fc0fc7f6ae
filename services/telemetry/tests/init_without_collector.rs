//! Without an OTLP endpoint, `init` installs logging only and `shutdown`
//! returns at once.

use std::time::{Duration, Instant};

#[tokio::test]
async fn init_and_shutdown_without_endpoint_return_quickly() {
    std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
    std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");

    let started = Instant::now();
    let telemetry = telemetry::init("test-no-collector");
    assert_eq!(telemetry.endpoint(), None);
    {
        let span = tracing::info_span!("work");
        let _entered = span.enter();
        tracing::info!("inside a span");
    }
    telemetry.shutdown().await;

    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}
