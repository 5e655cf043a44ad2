//! What `loupe top` shows, computed from the RED metrics' Prometheus text (the agent's own, or a
//! running agent's `/metrics`): per service and per edge, requests, errors and latency buckets,
//! and from two snapshots a window's rate, error share and quantiles.

use std::collections::BTreeMap;

/// Cumulative counts of one service or edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stat {
    pub requests: u64,
    pub errors: u64,
    /// (upper bound, cumulative count), `f64::INFINITY` last.
    pub buckets: Vec<(f64, u64)>,
}

impl Stat {
    fn add_bucket(&mut self, le: f64, n: u64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += n,
            None => {
                self.buckets.push((le, n));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: Option<&Stat>) -> Stat {
        let Some(b) = before else {
            return self.clone();
        };
        Stat {
            requests: self.requests.saturating_sub(b.requests),
            errors: self.errors.saturating_sub(b.errors),
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let old = b.buckets.iter().find(|(l, _)| *l == le).map_or(0, |x| x.1);
                    (le, n.saturating_sub(old))
                })
                .collect(),
        }
    }

    /// The q-quantile in seconds, interpolated linearly inside its bucket (as Prometheus'
    /// histogram_quantile does); None without requests. Above the last finite bound: that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(le, cumulative) in &self.buckets {
            if cumulative as f64 >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = (cumulative - lower.1) as f64;
                let frac = if in_bucket > 0.0 {
                    (rank - lower.1 as f64) / in_bucket
                } else {
                    0.0
                };
                return Some(lower.0 + (le - lower.0) * frac);
            }
            lower = (le, cumulative);
        }
        Some(lower.0)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Served requests by service (HTTP and RPC server durations).
    pub services: BTreeMap<String, Stat>,
    /// Requests by (client, server), from the service graph.
    pub edges: BTreeMap<(String, String), Stat>,
}

/// A sample's labels: (name, unescaped value).
type Labels<'a> = Vec<(&'a str, String)>;

/// `name{a="x",b="y"} 12` -> (name, labels, value).
fn parse_line(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut s = body;
    while !s.is_empty() {
        let (key, after) = s.split_once("=\"")?;
        // The value ends at the first quote not escaped.
        let mut out = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        out.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => out.push(c),
            }
        }
        let end = end?;
        labels.push((key.trim_start_matches(','), out));
        s = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.as_str())
}

fn is_error(labels: &[(&str, String)]) -> bool {
    label(labels, "error_type").is_some()
        || label(labels, "http_response_status_code")
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| c >= 500)
}

impl Snapshot {
    pub fn parse(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        for line in text.lines() {
            let Some((name, labels, value)) = parse_line(line) else {
                continue;
            };
            let n = value as u64;
            let le = || -> Option<f64> {
                match label(&labels, "le")? {
                    "+Inf" => Some(f64::INFINITY),
                    v => v.parse().ok(),
                }
            };
            match name {
                "http_server_request_duration_seconds_bucket"
                | "rpc_server_call_duration_seconds_bucket" => {
                    if let (Some(svc), Some(le)) = (label(&labels, "service_name"), le()) {
                        snap.services
                            .entry(svc.to_string())
                            .or_default()
                            .add_bucket(le, n);
                    }
                }
                "http_server_request_duration_seconds_count"
                | "rpc_server_call_duration_seconds_count" => {
                    if let Some(svc) = label(&labels, "service_name") {
                        let s = snap.services.entry(svc.to_string()).or_default();
                        s.requests += n;
                        if is_error(&labels) {
                            s.errors += n;
                        }
                    }
                }
                "traces_service_graph_request_total"
                | "traces_service_graph_request_failed_total"
                | "traces_service_graph_request_client_seconds_bucket" => {
                    let (Some(c), Some(s)) = (label(&labels, "client"), label(&labels, "server"))
                    else {
                        continue;
                    };
                    let e = snap
                        .edges
                        .entry((c.to_string(), s.to_string()))
                        .or_default();
                    match name {
                        "traces_service_graph_request_total" => e.requests += n,
                        "traces_service_graph_request_failed_total" => e.errors += n,
                        _ => {
                            if let Some(le) = le() {
                                e.add_bucket(le, n);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        snap
    }
}

/// One row of a table: what changed in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub rate: f64,
    pub error_share: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    #[default]
    Rate,
    Errors,
    P99,
    Name,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        match self {
            SortBy::Rate => SortBy::Errors,
            SortBy::Errors => SortBy::P99,
            SortBy::P99 => SortBy::Name,
            SortBy::Name => SortBy::Rate,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortBy::Rate => "rate",
            SortBy::Errors => "errors",
            SortBy::P99 => "p99",
            SortBy::Name => "name",
        }
    }
}

fn row(name: String, now: &Stat, before: Option<&Stat>, seconds: f64) -> Row {
    let window = now.since(before);
    Row {
        name,
        rate: if seconds > 0.0 {
            window.requests as f64 / seconds
        } else {
            0.0
        },
        error_share: (window.requests > 0).then(|| window.errors as f64 / window.requests as f64),
        p50: window.quantile(0.5),
        p99: window.quantile(0.99),
        total: now.requests,
    }
}

pub fn sort(rows: &mut [Row], by: SortBy) {
    let key = |r: &Row| match by {
        SortBy::Rate => r.rate,
        SortBy::Errors => r.error_share.unwrap_or(-1.0),
        SortBy::P99 => r.p99.unwrap_or(-1.0),
        SortBy::Name => 0.0,
    };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
}

/// (services, edges) over the window from `before` to `now`, `seconds` apart.
pub fn rows(now: &Snapshot, before: &Snapshot, seconds: f64, by: SortBy) -> (Vec<Row>, Vec<Row>) {
    let mut services: Vec<Row> = now
        .services
        .iter()
        .map(|(name, s)| row(name.clone(), s, before.services.get(name), seconds))
        .collect();
    let mut edges: Vec<Row> = now
        .edges
        .iter()
        .map(|((c, s), st)| {
            row(
                format!("{c} → {s}"),
                st,
                before.edges.get(&(c.clone(), s.clone())),
                seconds,
            )
        })
        .collect();
    sort(&mut services, by);
    sort(&mut edges, by);
    (services, edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP http_server_request_duration_seconds Duration of HTTP server requests.
# TYPE http_server_request_duration_seconds histogram
http_server_request_duration_seconds_bucket{http_request_method="GET",http_response_status_code="200",http_route="/users/{id}",service_name="catalog",le="0.005"} 8
http_server_request_duration_seconds_bucket{http_request_method="GET",http_response_status_code="200",http_route="/users/{id}",service_name="catalog",le="0.01"} 10
http_server_request_duration_seconds_bucket{http_request_method="GET",http_response_status_code="200",http_route="/users/{id}",service_name="catalog",le="+Inf"} 10
http_server_request_duration_seconds_count{http_request_method="GET",http_response_status_code="200",http_route="/users/{id}",service_name="catalog"} 10
http_server_request_duration_seconds_bucket{http_response_status_code="503",service_name="catalog",le="0.005"} 0
http_server_request_duration_seconds_bucket{http_response_status_code="503",service_name="catalog",le="0.01"} 2
http_server_request_duration_seconds_bucket{http_response_status_code="503",service_name="catalog",le="+Inf"} 2
http_server_request_duration_seconds_count{http_response_status_code="503",service_name="catalog"} 2
traces_service_graph_request_total{client="frontend",connection_type="",server="catalog"} 12
traces_service_graph_request_failed_total{client="frontend",connection_type="",server="catalog"} 2
traces_service_graph_request_client_seconds_bucket{client="frontend",connection_type="",server="catalog",le="0.01"} 12
traces_service_graph_request_client_seconds_bucket{client="frontend",connection_type="",server="catalog",le="+Inf"} 12
loupe_events_read_total 5
"#;

    #[test]
    fn the_prometheus_text_becomes_services_and_edges() {
        let s = Snapshot::parse(TEXT);
        let catalog = &s.services["catalog"];
        assert_eq!((catalog.requests, catalog.errors), (12, 2));
        assert_eq!(
            catalog.buckets,
            vec![(0.005, 8), (0.01, 12), (f64::INFINITY, 12)]
        );
        let edge = &s.edges[&("frontend".to_string(), "catalog".to_string())];
        assert_eq!((edge.requests, edge.errors), (12, 2));
        assert_eq!(
            parse_line(r#"x{a="q\"uo,te"} 1"#).unwrap().1[0].1,
            "q\"uo,te"
        );
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let s = Stat {
            requests: 100,
            errors: 0,
            buckets: vec![(0.01, 50), (0.1, 90), (1.0, 100), (f64::INFINITY, 100)],
        };
        assert_eq!(s.quantile(0.5), Some(0.01));
        let p75 = s.quantile(0.75).unwrap();
        assert!((p75 - (0.01 + 0.09 * 25.0 / 40.0)).abs() < 1e-9, "{p75}");
        assert_eq!(Stat::default().quantile(0.5), None);
        let over = Stat {
            requests: 1,
            errors: 0,
            buckets: vec![(10.0, 0), (f64::INFINITY, 1)],
        };
        assert_eq!(over.quantile(0.99), Some(10.0));
    }

    #[test]
    fn a_window_is_the_difference_of_two_snapshots() {
        let before = Snapshot::parse(TEXT);
        let now = Snapshot::parse(&TEXT.replace("} 12", "} 22").replace("} 10\n", "} 20\n"));
        let (services, edges) = rows(&now, &before, 2.0, SortBy::Rate);
        assert_eq!(services[0].name, "catalog");
        assert_eq!(edges[0].name, "frontend → catalog");
        assert_eq!(edges[0].rate, 5.0);
        assert_eq!(edges[0].error_share, Some(0.0));
        assert_eq!(edges[0].total, 22);
        let idle = rows(&before, &before, 2.0, SortBy::Rate).0;
        assert_eq!((idle[0].rate, idle[0].p99), (0.0, None));
    }
}
