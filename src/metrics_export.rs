//! `--metrics-addr` for the mount and the agent: a small HTTP endpoint serving
//! their counters at `/metrics` in the Prometheus text format, read fresh at
//! each scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// One value at scrape time.
#[derive(Debug, Clone)]
pub struct Sample {
    name: &'static str,
    help: &'static str,
    value: u64,
    counter: bool,
}

impl Sample {
    /// Only ever grows (exported as `NAME_total`).
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            value,
            counter: true,
        }
    }

    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            value,
            counter: false,
        }
    }
}

type Collect = Arc<dyn Fn() -> Vec<Sample> + Send + Sync>;

struct Samples(Collect);

impl std::fmt::Debug for Samples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Samples")
    }
}

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for sample in (self.0)() {
            if sample.counter {
                encode_one(&mut encoder, &sample, ConstCounter::new(sample.value))?;
            } else {
                encode_one(&mut encoder, &sample, ConstGauge::new(sample.value as i64))?;
            }
        }
        Ok(())
    }
}

fn encode_one(
    encoder: &mut DescriptorEncoder,
    sample: &Sample,
    metric: impl EncodeMetric,
) -> std::fmt::Result {
    let e = encoder.encode_descriptor(sample.name, sample.help, None, metric.metric_type())?;
    metric.encode(e)
}

/// Renders the samples `collect` returns now.
pub fn render(collect: &Collect) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Samples(collect.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// Binds `addr` now (so a taken port is an error at start) and serves
/// `/metrics` from a background task.
pub async fn serve(
    addr: SocketAddr,
    collect: impl Fn() -> Vec<Sample> + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let collect: Collect = Arc::new(collect);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = render(&collect);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_in_the_text_format() {
        let collect: Collect = Arc::new(|| {
            vec![
                Sample::counter("ferry_test_hits", "hits", 7),
                Sample::gauge("ferry_test_pending", "pending", 2),
            ]
        });
        let text = render(&collect);
        assert!(text.contains("ferry_test_hits_total 7"), "{text}");
        assert!(text.contains("ferry_test_pending 2"), "{text}");
        assert!(text.contains("# TYPE ferry_test_hits counter"), "{text}");
    }
}
