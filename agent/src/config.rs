//! The YAML configuration file (`--config`, `LOUPE_CONFIG`): what does not fit a flag.
//!
//! ```yaml
//! service_names:            # first match wins; before OTEL_SERVICE_NAME and derived names
//!   - match: gunicorn       # the executable name or one whole command-line argument
//!     name: orders          # (also: `executable: NAME`, `command_line: REGEX`)
//! redaction:
//!   query_values: true      # replace every query-string value with REDACTED (default)
//!   command_line: true      # mask secrets in process.command_line (default)
//! databases:
//!   server_spans: false     # SERVER spans on the database's own side too (default: metrics only)
//!   redis_keys: false       # put the Redis key in db.query.text (`GET user:42 ?`); never values
//!   query_text_max: 2048    # bytes of sanitized db.query.text kept (then marked truncated)
//! sampling:                 # the head sampler is OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG
//!   keep_errors: true       # keep a trace the sampler drops when a span here is an error
//!   keep_slower_than: 500ms # ...or when its local root took longer
//!   rules:                  # by the local root's service and span name; first match wins
//!     - service: catalog
//!       operation: GET /health
//!       ratio: 0            # or `per_second: 5`: at most 5 traces a second
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::process::ServiceNameRule;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[derive(Default)]
pub struct FileConfig {
    #[serde(default)]
    pub service_names: Vec<ServiceNameRule>,
    #[serde(default)]
    pub redaction: RedactionConfig,
    #[serde(default)]
    pub databases: DatabasesConfig,
    #[serde(default)]
    pub sampling: crate::trace::sampling::SamplingConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatabasesConfig {
    #[serde(default)]
    pub server_spans: bool,
    #[serde(default)]
    pub redis_keys: bool,
    #[serde(default = "query_text_max")]
    pub query_text_max: usize,
}

fn query_text_max() -> usize {
    2048
}

impl Default for DatabasesConfig {
    fn default() -> Self {
        Self {
            server_spans: false,
            redis_keys: false,
            query_text_max: query_text_max(),
        }
    }
}

impl DatabasesConfig {
    pub fn options(&self) -> crate::protocol::db::DbOptions {
        crate::protocol::db::DbOptions {
            max_query_text: self.query_text_max.clamp(16, 1 << 20),
            redis_keys: self.redis_keys,
            server_spans: self.server_spans,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    #[serde(default = "yes")]
    pub query_values: bool,
    #[serde(default = "yes")]
    pub command_line: bool,
}

fn yes() -> bool {
    true
}

impl Default for RedactionConfig {
    fn default() -> Self {
        Self {
            query_values: true,
            command_line: true,
        }
    }
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Self = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        c.sampling.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read --config {}: {e}; give a readable YAML file",
                path.display()
            )
        })?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("invalid --config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_rules_say_what_is_wrong() {
        let c = FileConfig::parse(
            "sampling:\n  keep_errors: true\n  keep_slower_than: 500ms\n  rules:\n    - service: catalog\n      per_second: 5\n    - operation: GET /health\n      ratio: 0\n",
        )
        .unwrap();
        assert!(c.sampling.keep_errors);
        assert_eq!(
            c.sampling.keep_slower_than,
            Some(std::time::Duration::from_millis(500))
        );
        assert_eq!(c.sampling.rules.len(), 2);
        let err = FileConfig::parse("sampling:\n  rules:\n    - ratio: 0.5\n      per_second: 1\n")
            .unwrap_err();
        assert!(err.contains("exactly one of `ratio`"), "{err}");
        let err = FileConfig::parse("sampling:\n  keep_slower_than: 500\n").unwrap_err();
        assert!(err.contains("needs a unit"), "{err}");
    }

    #[test]
    fn parses_the_documented_example() {
        let c = FileConfig::parse(
            "service_names:\n  - match: gunicorn\n    name: orders\nredaction:\n  query_values: false\n",
        )
        .unwrap();
        assert_eq!(c.service_names[0].name, "orders");
        assert!(!c.redaction.query_values);
        assert_eq!(FileConfig::parse("{}").unwrap(), FileConfig::default());
    }

    #[test]
    fn unknown_keys_are_errors_that_name_them_at_every_level() {
        for (yaml, key) in [
            ("service_name:\n  - match: a\n    name: b\n", "service_name"),
            ("redaction:\n  query_value: false\n", "query_value"),
            ("databases:\n  server_span: true\n", "server_span"),
            ("service_names:\n  - match: a\n    nmae: b\n", "nmae"),
        ] {
            let err = FileConfig::parse(yaml).unwrap_err();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn the_daemonset_configmap_is_a_valid_configuration() {
        let manifests = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/loupe.yaml"
        ))
        .unwrap();
        let embedded = serde_yaml::Deserializer::from_str(&manifests)
            .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
            .find(|doc| doc["kind"] == "ConfigMap")
            .and_then(|cm| cm["data"]["loupe.yaml"].as_str().map(str::to_string))
            .expect("a ConfigMap with loupe.yaml");
        FileConfig::parse(&embedded).unwrap();
    }
}
