//! `service_names` rules of the configuration file: what a rule matches is explicit, so that a
//! word in a URL on some command line (`curl …/orders/77`) never renames a process.
//!
//! ```yaml
//! service_names:
//!   - match: gunicorn          # the executable name, or one whole command-line argument
//!     name: orders             #   (or that argument's file name: /srv/app.py is app.py)
//!   - executable: java         # the executable name only
//!     name: billing
//!   - command_line: '-jar\s+\S*billing'   # a regular expression, searched in the command line
//!     name: billing
//! ```

use serde::Deserialize;

#[derive(Debug, Clone)]
pub enum Target {
    /// Executable name, or a whole argument, or an argument's file name.
    Match(String),
    Executable(String),
    CommandLine(regex::Regex),
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Target::Match(a), Target::Match(b))
            | (Target::Executable(a), Target::Executable(b)) => a == b,
            (Target::CommandLine(a), Target::CommandLine(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}
impl Eq for Target {}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct ServiceNameRule {
    pub target: Target,
    pub name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    matches: Option<String>,
    executable: Option<String>,
    command_line: Option<String>,
    name: String,
}

impl TryFrom<RawRule> for ServiceNameRule {
    type Error = String;

    fn try_from(r: RawRule) -> Result<Self, String> {
        let target = match (r.matches, r.executable, r.command_line) {
            (Some(m), None, None) if !m.trim().is_empty() => Target::Match(m),
            (None, Some(e), None) if !e.trim().is_empty() => Target::Executable(e),
            (None, None, Some(re)) => Target::CommandLine(regex::Regex::new(&re).map_err(|e| {
                format!("service_names: command_line {re:?} is not a valid regular expression: {e}")
            })?),
            _ => {
                return Err(format!(
                    "service_names rule for {:?}: give exactly one non-empty match, executable or command_line",
                    r.name
                ));
            }
        };
        if r.name.trim().is_empty() {
            return Err("service_names: a rule's name must not be empty".into());
        }
        Ok(Self {
            target,
            name: r.name,
        })
    }
}

impl ServiceNameRule {
    pub fn matches(&self, exe: &str, argv: &[String]) -> bool {
        match &self.target {
            Target::Executable(e) => e == exe,
            Target::Match(m) => {
                m == exe
                    || argv
                        .iter()
                        .any(|a| a == m || a.rsplit('/').next() == Some(m.as_str()))
            }
            Target::CommandLine(re) => re.is_match(&argv.join(" ")),
        }
    }

    /// A `match` rule, as tests and code build them.
    pub fn matching(word: &str, name: &str) -> Self {
        Self {
            target: Target::Match(word.into()),
            name: name.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    fn rules(yaml: &str) -> Result<Vec<ServiceNameRule>, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn match_takes_whole_arguments_not_substrings() {
        let r = ServiceNameRule::matching("orders", "orders");
        assert!(!r.matches("curl", &argv("curl -s http://api/orders/77")));
        assert!(!r.matches("python3", &argv("python3 /srv/orders_old.py")));
        assert!(r.matches("orders", &argv("/usr/local/bin/orders --port 80")));
        assert!(r.matches("python3", &argv("python3 -m orders")));
        let r = ServiceNameRule::matching("gunicorn", "web");
        assert!(r.matches(
            "python3.11",
            &argv("/usr/bin/python3 /usr/local/bin/gunicorn app:app")
        ));
        let r = ServiceNameRule::matching("app.py", "web");
        assert!(r.matches("python3", &argv("python3 -u /srv/app.py")));
    }

    #[test]
    fn executable_and_regex_targets() {
        let r = &rules("- executable: java\n  name: billing\n").unwrap()[0];
        assert!(r.matches("java", &argv("java -jar x.jar")));
        assert!(!r.matches("bash", &argv("bash -c java")));
        let r = &rules("- command_line: '-jar\\s+\\S*billing'\n  name: billing\n").unwrap()[0];
        assert!(r.matches(
            "java",
            &argv("/usr/bin/java -Xmx1g -jar /opt/billing-2.1.jar")
        ));
        assert!(!r.matches("java", &argv("/usr/bin/java -jar /opt/orders.jar")));
    }

    #[test]
    fn a_rule_names_exactly_one_target() {
        for bad in [
            "- name: x\n",
            "- match: a\n  executable: b\n  name: x\n",
            "- match: ''\n  name: x\n",
            "- match: a\n  name: ''\n",
            "- command_line: '('\n  name: x\n",
            "- match: a\n  name: x\n  nmae: y\n",
        ] {
            assert!(rules(bad).is_err(), "{bad}");
        }
        let err = rules("- command_line: '('\n  name: x\n").unwrap_err();
        assert!(err.contains("not a valid regular expression"), "{err}");
    }
}
