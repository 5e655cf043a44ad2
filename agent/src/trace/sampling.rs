//! Which traces leave the node. Everything is measured first (RED metrics, the service graph:
//! `red`); sampling only decides what is exported.
//!
//! - Head: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (`always_on`, `always_off`,
//!   `traceidratio`, `parentbased_*`). The ratio decision is a function of the trace id alone
//!   (its last 56 bits against a threshold, as W3C randomness and OpenTelemetry's consistent
//!   probability sampling define them), so every agent of a cluster keeps the same traces. Parent
//!   based: a trace that arrived with a `sampled` flag (traceparent, B3, Jaeger) keeps it.
//! - Rules (YAML `sampling.rules`, first match wins, by service and operation of the trace's
//!   local root): a ratio, or at most N traces a second (a token bucket: a burst cannot flood the
//!   backend). The head sampler is the default for the rest.
//! - Tail (YAML `keep_errors`, `keep_slower_than`): a trace this node would drop is kept when one
//!   of its spans here is an error or its local root is slower than the threshold.
//!
//! A trace is decided once, when its local root (the span with no parent on this node) finishes:
//! its spans wait here until then (bounded: MAX_WAITING_SPANS, and a trace waits at most
//! MAX_WAIT), so a kept trace is whole on this node. Spans that arrive after the decision follow
//! it. Every dropped span is counted.

use foldhash::{HashMap, HashMapExt};
use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::trace::span::SpanRecord;

/// Spans waiting for their trace's decision at most; beyond, the oldest trace is decided early.
const MAX_WAITING_SPANS: usize = 100_000;
/// A trace whose local root never finishes is decided this long after its first span.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Decisions remembered for late spans.
const DECISIONS_KEPT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Head {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

/// `OTEL_TRACES_SAMPLER`'s sampler (the default is parent-based always-on, as in the SDKs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSampler {
    pub head: Head,
    pub parent_based: bool,
}

impl Default for HeadSampler {
    fn default() -> Self {
        Self {
            head: Head::AlwaysOn,
            parent_based: true,
        }
    }
}

impl HeadSampler {
    /// From the standard variables; an unknown sampler or argument is an error that says what
    /// is accepted.
    pub fn from_env(sampler: Option<&str>, arg: Option<&str>) -> anyhow::Result<Self> {
        let ratio = || -> anyhow::Result<f64> {
            match arg {
                None => Ok(1.0),
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => anyhow::bail!(
                        "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1 (e.g. 0.1)"
                    ),
                },
            }
        };
        let Some(name) = sampler.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(Self::default());
        };
        let (head, parent_based) = match name {
            "always_on" => (Head::AlwaysOn, false),
            "always_off" => (Head::AlwaysOff, false),
            "traceidratio" => (Head::Ratio(ratio()?), false),
            "parentbased_always_on" => (Head::AlwaysOn, true),
            "parentbased_always_off" => (Head::AlwaysOff, true),
            "parentbased_traceidratio" => (Head::Ratio(ratio()?), true),
            other => anyhow::bail!(
                "OTEL_TRACES_SAMPLER={other:?} is not supported: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
            ),
        };
        Ok(Self { head, parent_based })
    }
}

/// Whether a ratio keeps this trace: the last 7 bytes of the trace id (its random part) against
/// the threshold `(1 - ratio) * 2^56`.
pub fn ratio_keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut r = [0u8; 8];
    r[1..].copy_from_slice(&trace_id[9..]);
    let randomness = u64::from_be_bytes(r);
    let threshold = ((1.0 - ratio) * (1u64 << 56) as f64) as u64;
    randomness >= threshold
}

/// YAML `sampling:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Keep a trace with an error span on this node, whatever the sampler said.
    #[serde(default)]
    pub keep_errors: bool,
    /// Keep a trace whose local root took longer than this (`500ms`, `2s`).
    #[serde(default, deserialize_with = "duration")]
    pub keep_slower_than: Option<Duration>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The local root's service name; any when absent.
    pub service: Option<String>,
    /// The local root's span name (`GET /items/{id}`); any when absent.
    pub operation: Option<String>,
    /// Keep this fraction (by trace id)...
    pub ratio: Option<f64>,
    /// ...or at most this many traces a second.
    pub per_second: Option<f64>,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// `250ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(format!("{s:?} needs a unit: ms, s or m (e.g. 500ms)"));
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v >= 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("{s:?} is not a duration like 500ms or 2s")),
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            match (r.ratio, r.per_second) {
                (Some(x), None) if (0.0..=1.0).contains(&x) => {}
                (None, Some(n)) if n >= 0.0 => {}
                _ => anyhow::bail!(
                    "sampling.rules[{i}]: give exactly one of `ratio` (0 to 1) or `per_second` (traces a second, 0 or more)"
                ),
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct SamplingStats {
    pub traces_kept: AtomicU64,
    pub traces_dropped: AtomicU64,
    pub spans_kept: AtomicU64,
    pub spans_dropped: AtomicU64,
    /// Traces kept by a tail rule that the sampler would have dropped.
    pub kept_for_error: AtomicU64,
    pub kept_for_latency: AtomicU64,
    /// Traces decided before their local root finished (too many spans waiting, or too long).
    pub decided_early: AtomicU64,
}

/// A token bucket: `rate` a second, bursts of at most `rate` (at least 1).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let burst = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Waiting {
    spans: Vec<SpanRecord>,
    error: bool,
    since: Instant,
}

/// What the local root tells the sampler.
pub struct Root<'a> {
    pub service: &'a str,
    /// The flag the trace arrived with, if it carried context.
    pub carried_sampled: Option<bool>,
}

pub struct Sampler {
    head: HeadSampler,
    config: SamplingConfig,
    buckets: Vec<Option<Bucket>>,
    waiting: HashMap<[u8; 16], Waiting>,
    /// Oldest first: which trace to decide early when too many spans wait.
    order: VecDeque<[u8; 16]>,
    waiting_spans: usize,
    decided: HashMap<[u8; 16], bool>,
    decided_order: VecDeque<[u8; 16]>,
    pub stats: std::sync::Arc<SamplingStats>,
}

impl Sampler {
    pub fn new(head: HeadSampler, config: SamplingConfig) -> Self {
        let now = Instant::now();
        let buckets = config
            .rules
            .iter()
            .map(|r| {
                r.per_second.map(|rate| Bucket {
                    rate,
                    tokens: rate.max(1.0),
                    at: now,
                })
            })
            .collect();
        Self {
            head,
            config,
            buckets,
            waiting: HashMap::new(),
            order: VecDeque::new(),
            waiting_spans: 0,
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
            stats: Default::default(),
        }
    }

    /// The decision when it needs no waiting: an always-on sampler with no rules and no tail
    /// rules keeps everything, except (parent based) what arrived with `sampled` unset.
    pub fn without_waiting(&self, carried: Option<bool>) -> Option<bool> {
        let simple = self.head.head == Head::AlwaysOn
            && self.config.rules.is_empty()
            && !self.config.keep_errors
            && self.config.keep_slower_than.is_none();
        simple.then(|| !self.head.parent_based || carried.unwrap_or(true))
    }

    /// One span decided without waiting: counted. The span stays with the caller (a span moved
    /// in and back out was two copies of it).
    pub fn count_one(&self, keep: bool) {
        let counter = if keep {
            &self.stats.spans_kept
        } else {
            &self.stats.spans_dropped
        };
        // The sampler's counters: the pipeline's thread alone writes them.
        crate::counter::add(counter, 1);
    }

    /// A finished span; `root` when it is its trace's local root. Returns what may be exported
    /// now.
    pub fn offer(&mut self, span: SpanRecord, root: Option<Root<'_>>) -> Vec<SpanRecord> {
        let trace = span.trace_id;
        if let Some(&keep) = self.decided.get(&trace) {
            return self.count(keep, vec![span]);
        }
        let error = span.error.is_some();
        let duration = Duration::from_nanos(span.end_unix_ns.saturating_sub(span.start_unix_ns));
        let w = self.waiting.entry(trace).or_insert_with(|| Waiting {
            spans: Vec::new(),
            error: false,
            since: Instant::now(),
        });
        if w.spans.is_empty() {
            self.order.push_back(trace);
        }
        w.error |= error;
        w.spans.push(span);
        self.waiting_spans += 1;
        let mut out = Vec::new();
        if let Some(root) = root {
            let keep = self.decide(&trace, Some((&root, duration)));
            out.extend(self.settle(trace, keep));
        }
        while self.waiting_spans > MAX_WAITING_SPANS {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.waiting.contains_key(&oldest) {
                self.stats.decided_early.fetch_add(1, Ordering::Relaxed);
                let keep = self.decide(&oldest, None);
                out.extend(self.settle(oldest, keep));
            }
        }
        out
    }

    /// Traces waiting longer than MAX_WAIT are decided with what is known (called each second).
    pub fn expire(&mut self) -> Vec<SpanRecord> {
        let old: Vec<[u8; 16]> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.since.elapsed() > MAX_WAIT)
            .map(|(t, _)| *t)
            .collect();
        let mut out = Vec::new();
        for t in old {
            self.stats.decided_early.fetch_add(1, Ordering::Relaxed);
            let keep = self.decide(&t, None);
            out.extend(self.settle(t, keep));
        }
        out
    }

    /// Everything still waiting, decided now (the agent is stopping).
    pub fn drain(&mut self) -> Vec<SpanRecord> {
        let all: Vec<[u8; 16]> = self.waiting.keys().copied().collect();
        let mut out = Vec::new();
        for t in all {
            let keep = self.decide(&t, None);
            out.extend(self.settle(t, keep));
        }
        out
    }

    fn decide(&mut self, trace: &[u8; 16], root: Option<(&Root<'_>, Duration)>) -> bool {
        let error = self.waiting.get(trace).is_some_and(|w| w.error);
        let sampled = self.sampled(trace, root.map(|(r, _)| r));
        if sampled {
            return true;
        }
        if self.config.keep_errors && error {
            self.stats.kept_for_error.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if let (Some(limit), Some((_, took))) = (self.config.keep_slower_than, root)
            && took > limit
        {
            self.stats.kept_for_latency.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The sampler's own decision (rules, then the head sampler).
    fn sampled(&mut self, trace: &[u8; 16], root: Option<&Root<'_>>) -> bool {
        if let Some(root) = root {
            if self.head.parent_based
                && let Some(flag) = root.carried_sampled
            {
                return flag;
            }
            let operation = self
                .waiting
                .get(trace)
                .and_then(|w| w.spans.last())
                .map(|s| &*s.name)
                .unwrap_or("");
            let matched = self.config.rules.iter().position(|r| {
                r.service.as_deref().is_none_or(|s| s == root.service)
                    && r.operation.as_deref().is_none_or(|o| o == operation)
            });
            if let Some(i) = matched {
                let rule = &self.config.rules[i];
                if let Some(ratio) = rule.ratio {
                    return ratio_keeps(trace, ratio);
                }
                if let Some(Some(bucket)) = self.buckets.get_mut(i) {
                    return bucket.take(Instant::now());
                }
            }
        }
        match self.head.head {
            Head::AlwaysOn => true,
            Head::AlwaysOff => false,
            Head::Ratio(r) => ratio_keeps(trace, r),
        }
    }

    fn settle(&mut self, trace: [u8; 16], keep: bool) -> Vec<SpanRecord> {
        if self.decided.insert(trace, keep).is_none() {
            self.decided_order.push_back(trace);
        }
        while self.decided_order.len() > DECISIONS_KEPT {
            if let Some(old) = self.decided_order.pop_front() {
                self.decided.remove(&old);
            }
        }
        let spans = self
            .waiting
            .remove(&trace)
            .map(|w| w.spans)
            .unwrap_or_default();
        self.waiting_spans -= spans.len();
        if keep {
            self.stats.traces_kept.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.traces_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.count(keep, spans)
    }

    fn count(&self, keep: bool, spans: Vec<SpanRecord>) -> Vec<SpanRecord> {
        let n = spans.len() as u64;
        if keep {
            self.stats.spans_kept.fetch_add(n, Ordering::Relaxed);
            spans
        } else {
            self.stats.spans_dropped.fetch_add(n, Ordering::Relaxed);
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::span::{SpanKind, Value};

    fn trace(i: u64) -> [u8; 16] {
        // Trace ids as SDKs make them: random, here a fixed mix of the index.
        let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 29);
        let mut t = [0u8; 16];
        t[8..].copy_from_slice(&r.to_be_bytes());
        t[..8].copy_from_slice(&i.to_be_bytes());
        t
    }

    fn span(t: [u8; 16], name: &str, ms: u64, error: bool) -> SpanRecord {
        SpanRecord {
            trace_id: t,
            span_id: [1; 8],
            parent_span_id: None,
            parent_is_remote: false,
            trace_state: String::new(),
            name: name.into(),
            kind: SpanKind::Server,
            start_unix_ns: 0,
            end_unix_ns: ms * 1_000_000,
            attributes: vec![("http.request.method", Value::Static("GET"))],
            error: error.then(|| "500".to_string()),
            status: None,
            pid: 1,
            comm: "catalog".into(),
        }
    }

    fn root(carried: Option<bool>) -> Option<Root<'static>> {
        Some(Root {
            service: "catalog",
            carried_sampled: carried,
        })
    }

    #[test]
    fn the_standard_variables_name_the_head_sampler() {
        let h = |s: &str, a: Option<&str>| HeadSampler::from_env(Some(s), a).unwrap();
        assert_eq!(
            HeadSampler::from_env(None, None).unwrap(),
            HeadSampler::default()
        );
        assert_eq!(h("traceidratio", Some("0.1")).head, Head::Ratio(0.1));
        assert!(h("parentbased_traceidratio", Some("0.25")).parent_based);
        assert!(!h("always_off", None).parent_based);
        let err = HeadSampler::from_env(Some("jaeger_remote"), None).unwrap_err();
        assert!(
            err.to_string().contains("parentbased_traceidratio"),
            "{err}"
        );
        assert!(HeadSampler::from_env(Some("traceidratio"), Some("2")).is_err());
    }

    #[test]
    fn a_ratio_is_a_function_of_the_trace_id_alone() {
        let kept = (0..100_000)
            .filter(|&i| ratio_keeps(&trace(i), 0.1))
            .count();
        // Binomial(100 000, 0.1): sd ~95; six of them either way.
        assert!((9_430..=10_570).contains(&kept), "{kept}");
        // Same id, same answer, whoever asks; a larger ratio keeps a superset.
        for i in 0..1000 {
            let t = trace(i);
            assert_eq!(ratio_keeps(&t, 0.1), ratio_keeps(&t, 0.1));
            if ratio_keeps(&t, 0.1) {
                assert!(ratio_keeps(&t, 0.5));
            }
        }
        assert!(ratio_keeps(&trace(1), 1.0) && !ratio_keeps(&trace(1), 0.0));
    }

    #[test]
    fn a_trace_waits_for_its_local_root_and_leaves_whole_or_not_at_all() {
        let config = SamplingConfig {
            keep_errors: true,
            keep_slower_than: Some(Duration::from_millis(500)),
            rules: vec![],
        };
        let mut s = Sampler::new(
            HeadSampler {
                head: Head::AlwaysOff,
                parent_based: true,
            },
            config,
        );
        // Children first, then the root: nothing leaves before the root.
        let t = trace(1);
        assert!(s.offer(span(t, "GET /c", 5, true), None).is_empty());
        let out = s.offer(span(t, "GET /a", 10, false), root(None));
        assert_eq!(out.len(), 2, "an error inside keeps the whole trace");
        // Late spans follow the decision.
        assert_eq!(s.offer(span(t, "GET /late", 1, false), None).len(), 1);
        // Slow root: kept; quick and clean: dropped, with its children.
        let slow = trace(2);
        assert_eq!(
            s.offer(span(slow, "GET /s", 600, false), root(None)).len(),
            1
        );
        let quick = trace(3);
        assert!(s.offer(span(quick, "GET /q1", 1, false), None).is_empty());
        assert!(
            s.offer(span(quick, "GET /q", 2, false), root(None))
                .is_empty()
        );
        // The caller said sampled: kept, parent based.
        let carried = trace(4);
        assert_eq!(
            s.offer(span(carried, "GET /p", 1, false), root(Some(true)))
                .len(),
            1
        );
        let st = &s.stats;
        assert_eq!(st.kept_for_error.load(Ordering::Relaxed), 1);
        assert_eq!(st.kept_for_latency.load(Ordering::Relaxed), 1);
        assert_eq!(st.traces_kept.load(Ordering::Relaxed), 3);
        assert_eq!(st.traces_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(st.spans_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(st.spans_kept.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn rules_match_service_and_operation_first_and_rate_limit_bursts() {
        let config = SamplingConfig {
            keep_errors: false,
            keep_slower_than: None,
            rules: vec![
                Rule {
                    service: Some("catalog".into()),
                    operation: Some("GET /health".into()),
                    ratio: Some(0.0),
                    per_second: None,
                },
                Rule {
                    service: Some("catalog".into()),
                    operation: None,
                    ratio: None,
                    per_second: Some(5.0),
                },
            ],
        };
        let mut s = Sampler::new(HeadSampler::default(), config);
        let health = (0..50)
            .filter(|&i| {
                !s.offer(span(trace(i), "GET /health", 1, false), root(None))
                    .is_empty()
            })
            .count();
        assert_eq!(health, 0);
        // A burst of 100 traces in well under a second: the bucket lets about 5 through.
        let burst = (100..200)
            .filter(|&i| {
                !s.offer(span(trace(i), "GET /items", 1, false), root(None))
                    .is_empty()
            })
            .count();
        assert!((5..=6).contains(&burst), "{burst}");
        // Without rules and tail rules, nothing waits: parent based always-on keeps all but
        // what arrived unsampled.
        let plain = Sampler::new(HeadSampler::default(), SamplingConfig::default());
        assert_eq!(plain.without_waiting(None), Some(true));
        assert_eq!(plain.without_waiting(Some(false)), Some(false));
    }

    #[test]
    fn waiting_is_bounded_and_a_lost_root_does_not_hold_a_trace_forever() {
        let mut s = Sampler::new(
            HeadSampler {
                head: Head::AlwaysOn,
                parent_based: false,
            },
            SamplingConfig {
                keep_errors: true,
                ..Default::default()
            },
        );
        let mut out = 0;
        for i in 0..(MAX_WAITING_SPANS as u64 + 10) {
            out += s.offer(span(trace(i), "GET /x", 1, false), None).len();
        }
        assert_eq!(out, 10, "the oldest are decided early");
        assert_eq!(s.stats.decided_early.load(Ordering::Relaxed), 10);
        assert_eq!(s.drain().len(), MAX_WAITING_SPANS);
    }
}
