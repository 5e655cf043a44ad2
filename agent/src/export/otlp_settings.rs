//! The OTLP exporter settings the OpenTelemetry specification defines as environment variables:
//! `OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION}`. The signal-specific
//! variable wins over the general one; `--otlp-endpoint` wins over both.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// As users write it (OTEL_EXPORTER_OTLP_PROTOCOL).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" => Some(Protocol::HttpProtobuf),
            _ => None,
        }
    }
}

/// What is exported: each has its own variables, HTTP path and gRPC service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn upper(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }
}

#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    /// Base endpoint from `--otlp-endpoint` (as OTEL_EXPORTER_OTLP_ENDPOINT); None leaves it to
    /// the standard variables.
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where requests go: the gRPC endpoint, or the full URL of the signal's HTTP resource.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings of the trace export.
pub fn settings(cfg: &OtlpConfig) -> anyhow::Result<Settings> {
    settings_for(cfg, Signal::Traces)
}

pub fn settings_for(cfg: &OtlpConfig, signal: Signal) -> anyhow::Result<Settings> {
    settings_from(cfg, signal, |k| {
        std::env::var(k).ok().filter(|v| !v.trim().is_empty())
    })
}

/// `env` looks a variable up (tests pass their own).
pub fn settings_from(
    cfg: &OtlpConfig,
    signal: Signal,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Settings> {
    let sig = signal.upper();
    let var = |name: &str| {
        env(&format!("OTEL_EXPORTER_OTLP_{sig}_{name}"))
            .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{name}")))
    };
    // The general endpoint is a base URL (HTTP appends the signal's path); the signal-specific
    // one is used as it is.
    let base = |b: &str| match cfg.protocol {
        Protocol::Grpc => b.to_string(),
        Protocol::HttpProtobuf => format!("{}{}", b.trim_end_matches('/'), signal.http_path()),
    };
    let url = match (
        &cfg.endpoint,
        env(&format!("OTEL_EXPORTER_OTLP_{sig}_ENDPOINT")),
    ) {
        (Some(flag), _) => base(flag),
        (None, Some(traces)) => traces,
        (None, None) => base(&env("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|| {
            match cfg.protocol {
                Protocol::Grpc => "http://localhost:4317",
                Protocol::HttpProtobuf => "http://localhost:4318",
            }
            .to_string()
        })),
    };
    let timeout = match var("TIMEOUT") {
        Some(ms) => Duration::from_millis(ms.trim().parse::<u64>().map_err(|_| {
            anyhow::anyhow!(
                "OTEL_EXPORTER_OTLP_[{sig}_]TIMEOUT={ms:?}: give a whole number of milliseconds"
            )
        })?),
        None => DEFAULT_TIMEOUT,
    };
    let gzip = match var("COMPRESSION").as_deref().map(str::trim) {
        None | Some("none") => false,
        Some("gzip") => true,
        Some(other) => {
            anyhow::bail!("OTEL_EXPORTER_OTLP_[{sig}_]COMPRESSION={other:?}: use gzip or none")
        }
    };
    Ok(Settings {
        url,
        headers: var("HEADERS")
            .map(|h| key_value_list(&h))
            .unwrap_or_default(),
        timeout,
        gzip,
    })
}

/// `key1=value1,key2=value2`, values percent-encoded (W3C Baggage format, as the spec says for
/// OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES alike).
pub fn key_value_list(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(protocol: Protocol, endpoint: Option<&str>) -> OtlpConfig {
        OtlpConfig {
            protocol,
            endpoint: endpoint.map(str::to_string),
        }
    }

    fn with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let none = with(&[]);
        let url = |c: &OtlpConfig, e: &dyn Fn(&str) -> Option<String>| {
            settings_from(c, Signal::Traces, e).unwrap().url
        };
        assert_eq!(
            url(&cfg(Protocol::Grpc, None), &none),
            "http://localhost:4317"
        );
        assert_eq!(
            url(&cfg(Protocol::HttpProtobuf, None), &none),
            "http://localhost:4318/v1/traces"
        );
        let general = with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]);
        assert_eq!(
            url(&cfg(Protocol::HttpProtobuf, None), &general),
            "http://c:4318/v1/traces"
        );
        let both = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
        ]);
        assert_eq!(
            url(&cfg(Protocol::HttpProtobuf, None), &both),
            "http://t:9/custom"
        );
        assert_eq!(
            url(&cfg(Protocol::HttpProtobuf, Some("http://flag:1")), &both),
            "http://flag:1/v1/traces"
        );
        assert_eq!(
            url(&cfg(Protocol::Grpc, Some("http://flag:1")), &both),
            "http://flag:1"
        );
    }

    #[test]
    fn metrics_have_their_own_path_and_variables() {
        let env = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "tenant=m"),
        ]);
        let s = settings_from(&cfg(Protocol::HttpProtobuf, None), Signal::Metrics, env).unwrap();
        assert_eq!(s.url, "http://c:4318/v1/metrics");
        assert_eq!(s.headers, vec![("tenant".to_string(), "m".to_string())]);
    }

    #[test]
    fn headers_timeout_and_compression() {
        let env = with(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "api-key=se%20cret, x-tenant = t1,bad",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ]);
        let s = settings_from(&cfg(Protocol::Grpc, None), Signal::Traces, env).unwrap();
        assert_eq!(
            s.headers,
            vec![
                ("api-key".to_string(), "se cret".to_string()),
                ("x-tenant".to_string(), "t1".to_string())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(s.gzip);
        let bad = with(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]);
        assert!(settings_from(&cfg(Protocol::Grpc, None), Signal::Traces, bad).is_err());
        let bad = with(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")]);
        assert!(settings_from(&cfg(Protocol::Grpc, None), Signal::Traces, bad).is_err());
    }
}
