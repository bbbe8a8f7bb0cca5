//! Prometheus exposition with `prometheus-client`: content negotiation, and families of
//! values read at scrape time (collectors).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// `Content-Type` of the Prometheus text format (0.0.4).
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition format a scraper asked for in its `Accept` headers: OpenMetrics when
/// it names `application/openmetrics-text` (as Prometheus does), else the Prometheus
/// text format.
pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> &'static str {
    if accept
        .into_iter()
        .any(|v| v.contains("application/openmetrics-text"))
    {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    }
}

/// `reg` encoded as `content_type` ([`PROMETHEUS_TEXT`] or [`OPENMETRICS_TEXT`]).
pub fn encode(reg: &Registry, content_type: &str) -> String {
    let mut out = String::new();
    let r = if content_type == OPENMETRICS_TEXT {
        prometheus_client::encoding::text::encode(&mut out, reg)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, reg)
    };
    r.expect("writing to a String");
    out
}

/// Labels of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// One counter family of samples read at scrape time; `name` without the `_total` the
/// encoder appends.
pub fn const_counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = samples
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// One gauge family of samples read at scrape time.
pub fn const_gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = samples
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// `n` as a gauge value (saturating).
pub fn gauge_value<T: TryInto<i64>>(n: T) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            const_gauge(&mut enc, "x_up", "Up.", &[(Labels::new(), 1)])?;
            const_counter(
                &mut enc,
                "x_requests",
                "Requests \"quoted\".",
                &[
                    (vec![("code", "200".into())], 3),
                    (vec![("code", "a\"b\\c".into())], 1),
                ],
            )
        }
    }

    #[test]
    fn both_formats_and_the_negotiation() {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed));
        let text = encode(&reg, PROMETHEUS_TEXT);
        assert!(text.contains("# TYPE x_up gauge\nx_up 1\n"), "{text}");
        assert!(text.contains("# TYPE x_requests_total counter\n"), "{text}");
        assert!(
            text.contains("x_requests_total{code=\"200\"} 3\n"),
            "{text}"
        );
        // Label values are escaped.
        assert!(
            text.contains("x_requests_total{code=\"a\\\"b\\\\c\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        let om = encode(&reg, OPENMETRICS_TEXT);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(negotiate(["text/plain"]), PROMETHEUS_TEXT);
        assert_eq!(negotiate([]), PROMETHEUS_TEXT);
        assert_eq!(
            negotiate(["application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"]),
            OPENMETRICS_TEXT
        );
    }
}
