use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounter,
    pub duration: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("pdfleet_operator".into()), None).expect("valid registry");
        let reconciles =
            IntCounter::new("reconciles_total", "Reconciliations started").expect("valid");
        let errors = IntCounter::new("reconcile_errors_total", "Reconciliations that failed")
            .expect("valid");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Duration of successful reconciliations",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid");
        registry
            .register(Box::new(reconciles.clone()))
            .expect("unique");
        registry.register(Box::new(errors.clone())).expect("unique");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique");
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
        }
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
