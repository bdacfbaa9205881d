//! Cumulative -> delta conversion at the exporter edge, for backends that want deltas.
//! As OpenTelemetry SDKs do with a delta preference: monotonic sums and histograms
//! become deltas; non-monotonic sums (`connections.active`, queue sizes) stay
//! cumulative. Per interval, over the series of one request; series that disappear
//! are forgotten, so memory follows the live series.
use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{AggregationTemporality, metric::Data, number_data_point::Value},
};

#[derive(Clone, Debug, PartialEq)]
enum Previous {
    Number(i64),
    Histogram {
        count: u64,
        sum: f64,
        buckets: Vec<u64>,
    },
}

/// The previous cumulative value of each series, by [`series_key`].
#[derive(Default)]
pub struct DeltaConverter {
    previous: HashMap<u64, Previous>,
}

/// A series' identity: its metric name and attributes, hashed (64 bits: a collision
/// among the few hundred thousand series of one node is about one in 10^9). Hashing
/// instead of keeping the text keeps this map at a few dozen bytes per series.
fn series_key(metric: &str, attributes: &[KeyValue]) -> u64 {
    use std::hash::{Hash, Hasher};
    /// Feeds formatted text to the hasher without building it.
    struct HashWriter<'a>(&'a mut std::hash::DefaultHasher);
    impl std::fmt::Write for HashWriter<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            s.hash(self.0);
            Ok(())
        }
    }
    let mut hasher = std::hash::DefaultHasher::new();
    metric.hash(&mut hasher);
    // Attribute values have no `Hash` (doubles): their debug form identifies them.
    let _ =
        std::fmt::Write::write_fmt(&mut HashWriter(&mut hasher), format_args!("{attributes:?}"));
    hasher.finish()
}

impl DeltaConverter {
    /// Starts converting one batch, which may come in several requests: series the
    /// whole batch does not carry are forgotten at [`DeltaBatch::finish`].
    pub fn batch(&mut self) -> DeltaBatch<'_> {
        DeltaBatch {
            current: HashMap::with_capacity(self.previous.len()),
            converter: self,
        }
    }

    /// Converts a batch that is one request.
    #[cfg(test)]
    pub fn convert(&mut self, request: &mut ExportMetricsServiceRequest) {
        let mut batch = self.batch();
        batch.convert(request);
        batch.finish();
    }
}

/// One batch being converted, request by request.
pub struct DeltaBatch<'a> {
    converter: &'a mut DeltaConverter,
    current: HashMap<u64, Previous>,
}

impl DeltaBatch<'_> {
    /// Rewrites a cumulative request into deltas since the previous batch. A series
    /// seen for the first time reports its whole cumulative value (from its start
    /// time); a counter that went backwards (restart) reports its new value.
    pub fn convert(&mut self, request: &mut ExportMetricsServiceRequest) {
        let previous = &self.converter.previous;
        let current = &mut self.current;
        for metric in request
            .resource_metrics
            .iter_mut()
            .flat_map(|rm| rm.scope_metrics.iter_mut())
            .flat_map(|sm| sm.metrics.iter_mut())
        {
            let name = metric.name.as_str();
            match metric.data.as_mut() {
                Some(Data::Sum(sum)) if sum.is_monotonic => {
                    sum.aggregation_temporality = AggregationTemporality::Delta as i32;
                    for point in &mut sum.data_points {
                        let key = series_key(name, &point.attributes);
                        let Some(Value::AsInt(value)) = point.value else {
                            continue;
                        };
                        if let Some(Previous::Number(before)) = previous.get(&key) {
                            if *before <= value {
                                point.value = Some(Value::AsInt(value - before));
                            }
                        }
                        current.insert(key, Previous::Number(value));
                    }
                }
                Some(Data::Histogram(histogram)) => {
                    histogram.aggregation_temporality = AggregationTemporality::Delta as i32;
                    for point in &mut histogram.data_points {
                        let key = series_key(name, &point.attributes);
                        let now = Previous::Histogram {
                            count: point.count,
                            sum: point.sum.unwrap_or(0.0),
                            buckets: point.bucket_counts.clone(),
                        };
                        if let Some(Previous::Histogram {
                            count,
                            sum,
                            buckets,
                        }) = previous.get(&key)
                        {
                            if *count <= point.count && buckets.len() == point.bucket_counts.len() {
                                point.count -= count;
                                point.sum = point.sum.map(|s| s - sum);
                                for (b, before) in point.bucket_counts.iter_mut().zip(buckets) {
                                    *b = b.saturating_sub(*before);
                                }
                            }
                        }
                        // Extremes of the window are unknown from cumulative state.
                        point.min = None;
                        point.max = None;
                        current.insert(key, now);
                    }
                }
                _ => {}
            }
        }
    }

    /// The batch is complete: its series are the ones to compare the next batch with.
    pub fn finish(self) {
        self.converter.previous = self.current;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{encode, model::LinkStats};

    fn request(bytes: u64, active: u64, connects: &[u64]) -> ExportMetricsServiceRequest {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut stats = LinkStats::new(t);
        stats.bytes_transmit = bytes;
        stats.active = active;
        for micros in connects {
            stats
                .connect_duration
                .record(Duration::from_micros(*micros));
        }
        let batch = crate::model::one_link_batch(t, stats);
        encode::metrics::metrics_request(&batch, &encode::resource())
    }

    fn metric<'a>(
        r: &'a ExportMetricsServiceRequest,
        name: &str,
    ) -> &'a opentelemetry_proto::tonic::metrics::v1::Metric {
        r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap()
    }

    fn first_int(r: &ExportMetricsServiceRequest, name: &str) -> (i64, i32) {
        match &metric(r, name).data {
            Some(Data::Sum(s)) => match s.data_points[0].value {
                Some(Value::AsInt(v)) => (v, s.aggregation_temporality),
                _ => unreachable!(),
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn monotonic_sums_and_histograms_become_deltas() {
        let mut converter = DeltaConverter::default();
        let mut first = request(100, 2, &[80]);
        converter.convert(&mut first);
        assert_eq!(
            first_int(&first, "ridley.link.bytes"),
            (100, AggregationTemporality::Delta as i32)
        );

        let mut second = request(250, 1, &[80, 120, 3000]);
        converter.convert(&mut second);
        assert_eq!(first_int(&second, "ridley.link.bytes").0, 150);
        // Non-monotonic stays cumulative.
        assert_eq!(
            first_int(&second, "ridley.link.connections.active"),
            (1, AggregationTemporality::Cumulative as i32)
        );
        let Some(Data::Histogram(h)) = &metric(&second, "ridley.link.connect.duration").data else {
            unreachable!()
        };
        assert_eq!(h.data_points[0].count, 2);
        assert_eq!(h.data_points[0].bucket_counts.iter().sum::<u64>(), 2);
        assert_eq!(h.data_points[0].min, None);
    }
}
