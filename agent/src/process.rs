//! Who handled a span: the OpenTelemetry resource of each traced process, read from /proc once
//! per process (cached by pid and start time, so a reused pid is a new process).

use foldhash::{HashMap, HashMapExt};
use std::{
    borrow::Cow,
    collections::VecDeque,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::k8s::{
    cgroup::{ContainerRef, container_of},
    pods::SharedPods,
};

/// The cache as the pipeline (which sees a process first) and the exporter share it.
pub type SharedProcesses = Arc<Mutex<ProcessCache>>;

/// How long the info of an exited process is kept: its last spans may still be queued.
const KEEP_EXITED: Duration = Duration::from_secs(120);
/// Exec reports kept for processes not yet looked up: enough for a burst of short-lived
/// programs between two reads of the ring.
const EXECS_KEPT: usize = 4096;

pub use crate::service_rules::ServiceNameRule;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub service_name: String,
    pub executable_name: String,
    pub command_line: String,
    /// The container the process runs in (from its cgroup), if any.
    pub container: Option<ContainerRef>,
    /// The service name came from configuration or the process's own OTEL_* variables, which
    /// outrank Kubernetes metadata.
    pub named_explicitly: bool,
    /// Further resource attributes (`container.id`, `k8s.*`, the process's own
    /// OTEL_RESOURCE_ATTRIBUTES).
    pub attributes: Vec<(Cow<'static, str>, String)>,
}

/// The pure part: a service name from what /proc says.
pub fn service_name(
    exe: &str,
    argv: &[String],
    environ: &[(String, String)],
    rules: &[ServiceNameRule],
) -> String {
    explicit_service_name(exe, argv, environ, rules).unwrap_or_else(|| derived_name(exe, argv))
}

/// A name the user gave: a configured rule, else the process's OTEL_SERVICE_NAME, else
/// service.name in its OTEL_RESOURCE_ATTRIBUTES.
fn explicit_service_name(
    exe: &str,
    argv: &[String],
    environ: &[(String, String)],
    rules: &[ServiceNameRule],
) -> Option<String> {
    if let Some(rule) = rules.iter().find(|r| r.matches(exe, argv)) {
        return Some(rule.name.clone());
    }
    let env = |k: &str| {
        environ
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|v| !v.trim().is_empty()) {
        return Some(name.trim().to_string());
    }
    env("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
        attrs
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("service.name="))
            .map(str::to_string)
    })
}

/// Resource attributes a process declares for itself in OTEL_RESOURCE_ATTRIBUTES, as its own
/// SDK would report them (W3C-baggage-like `k=v` list, values percent-decoded). The agent's
/// measured attributes (`process.*`, `host.*`, `telemetry.*`) and `service.name` (handled with
/// the name) are its own; a secret-looking key's value is masked like any other; at most
/// `MAX_DECLARED` attributes of `MAX_DECLARED_VALUE` bytes each.
pub fn declared_attributes(environ: &[(String, String)]) -> Vec<(Cow<'static, str>, String)> {
    const MAX_DECLARED: usize = 32;
    const MAX_DECLARED_VALUE: usize = 256;
    let Some((_, list)) = environ
        .iter()
        .find(|(k, _)| k == "OTEL_RESOURCE_ATTRIBUTES")
    else {
        return Vec::new();
    };
    let mut out: Vec<(Cow<'static, str>, String)> = Vec::new();
    for (k, mut v) in crate::export::otlp_settings::key_value_list(list) {
        let owned_by_agent = k == "service.name"
            || ["process.", "host.", "telemetry."]
                .iter()
                .any(|p| k.starts_with(p));
        if owned_by_agent || out.iter().any(|(have, _)| *have == k) {
            continue;
        }
        if crate::redact::is_sensitive_name(&k) {
            v = crate::redact::MASK.to_string();
        }
        if v.len() > MAX_DECLARED_VALUE {
            let mut end = MAX_DECLARED_VALUE;
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            v.truncate(end);
        }
        out.push((Cow::Owned(k), v));
        if out.len() == MAX_DECLARED {
            break;
        }
    }
    out
}

/// Interpreters run something else: name the program, not the interpreter.
fn derived_name(exe: &str, argv: &[String]) -> String {
    let stem = |p: &str| {
        let base = p.rsplit('/').next().unwrap_or(p);
        base.split('.').next().unwrap_or(base).to_string()
    };
    let args: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let interpreter = [
        "python", "node", "ruby", "perl", "php", "java", "bun", "deno",
    ]
    .iter()
    .any(|i| exe.starts_with(i));
    if interpreter {
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "-m" => {
                    return it
                        .next()
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| exe.to_string());
                }
                "-jar" => {
                    return it
                        .next()
                        .map(|j| stem(j))
                        .unwrap_or_else(|| exe.to_string());
                }
                "-c" | "-e" => break,
                // Options with a separate value.
                "-cp" | "-classpath" | "-X" | "-W" | "--require" | "-r" => {
                    it.next();
                }
                a if a.starts_with('-') => {}
                a if exe.starts_with("java") => {
                    return a.rsplit('.').next().unwrap_or(a).to_string();
                }
                a => return stem(a),
            }
        }
    }
    if exe.is_empty() {
        "unknown_service".to_string()
    } else {
        exe.to_string()
    }
}

/// In one read of up to 16 KiB: /proc reports a size of 0, so `fs::read` would first read 32
/// bytes, and a process exiting between that read and the next left a command line cut at 32
/// bytes (seen in CI: "curl -s -o /dev/null http://127.").
fn read_nul_separated(path: &Path) -> Vec<String> {
    use std::io::Read as _;
    let mut bytes = Vec::with_capacity(16 * 1024);
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map(|_| {
            bytes
                .split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
/// The process's start time, and whether it has exited (a zombie not yet reaped by its parent
/// still has a stat but no command line, executable or environment).
fn start_time(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let exited = matches!(fields.next()?, "Z" | "X");
    Some((fields.nth(18)?.parse().ok()?, exited))
}

struct Entry {
    started: Option<u64>,
    info: ProcessInfo,
    last_used: Instant,
    /// When `started` was last compared with /proc.
    checked: Instant,
}

/// How long a cached process is trusted before its start time is read again. Reading
/// /proc/PID/stat on every lookup cost 5-10% of the agent's CPU at 44k requests/s (A/B, nginx
/// and wrk traced). A pid reused by a new program is caught sooner: its exec record drops the entry.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

pub struct ProcessCache {
    rules: Vec<ServiceNameRule>,
    /// Mask secrets in command lines (`redact::command_line`).
    redact_command_line: bool,
    by_pid: HashMap<u32, Entry>,
    /// The latest exec of each process (oldest first in `exec_order`): what names a process
    /// that exited before it was looked up.
    execs: HashMap<u32, crate::decode::ExecEvent>,
    exec_order: VecDeque<u32>,
    /// The pods of this node, when Kubernetes metadata is on.
    pods: Option<SharedPods>,
}

impl ProcessCache {
    pub fn new(rules: Vec<ServiceNameRule>) -> Self {
        Self {
            rules,
            redact_command_line: true,
            by_pid: HashMap::new(),
            execs: HashMap::new(),
            exec_order: VecDeque::new(),
            pods: None,
        }
    }

    pub fn with_pods(&mut self, pods: SharedPods) {
        self.pods = Some(pods);
    }

    /// The process's resource as of now: what /proc said when it was first seen, plus the
    /// metadata of its pod, looked up at export time (the pod watcher may learn of a pod after
    /// its first connection).
    pub fn resolve(&mut self, pid: u32, comm: &str) -> ProcessInfo {
        let pods = self.pods.clone();
        let mut info = self.get(pid, comm).clone();
        let Some(container) = info.container.clone() else {
            return info;
        };
        let workload = pods.and_then(|p| {
            p.read()
                .ok()?
                .lookup(&container.id, container.pod_uid.as_deref())
        });
        if let Some(w) = workload {
            info.attributes.extend(w.attributes);
            if !info.named_explicitly {
                info.service_name = w.service_name;
            }
        }
        info
    }

    pub fn shared(rules: Vec<ServiceNameRule>, redact_command_line: bool) -> SharedProcesses {
        let mut cache = Self::new(rules);
        cache.redact_command_line = redact_command_line;
        Arc::new(Mutex::new(cache))
    }

    /// A process ran a new program: its next lookup reads it afresh, and if it is gone by then,
    /// this report names it.
    pub fn exec(&mut self, ev: crate::decode::ExecEvent) {
        self.by_pid.remove(&ev.pid);
        if self.execs.insert(ev.pid, ev.clone()).is_none() {
            self.exec_order.push_back(ev.pid);
        }
        while self.exec_order.len() > EXECS_KEPT {
            if let Some(old) = self.exec_order.pop_front() {
                self.execs.remove(&old);
            }
        }
    }

    /// The process's info; `comm` is the fallback name for a process already gone and never
    /// reported by an exec. Read as early as possible (on a connection's first event).
    pub fn get(&mut self, pid: u32, comm: &str) -> &ProcessInfo {
        let now = Instant::now();
        if self
            .by_pid
            .get(&pid)
            .is_some_and(|e| now.duration_since(e.checked) < RECHECK)
        {
            let entry = self.by_pid.get_mut(&pid).expect("present");
            entry.last_used = now;
            return &entry.info;
        }
        let (started, exited) = match start_time(pid) {
            Some((t, exited)) => (Some(t), exited),
            None => (None, true),
        };
        let stale = self
            .by_pid
            .get(&pid)
            .is_none_or(|e| started.is_some() && e.started != started);
        if stale {
            // A process that is exiting has released its memory before it becomes a zombie:
            // /proc then shows no command line either.
            let info = match self.execs.get(&pid) {
                Some(exec) if exited => self.reported(exec),
                Some(exec) => Some(self.read(pid, comm))
                    .filter(|info| !info.command_line.is_empty())
                    .unwrap_or_else(|| self.reported(exec)),
                None => self.read(pid, comm),
            };
            self.by_pid.insert(
                pid,
                Entry {
                    started,
                    info,
                    last_used: now,
                    checked: now,
                },
            );
        }
        let entry = self.by_pid.get_mut(&pid).expect("inserted above");
        entry.last_used = now;
        entry.checked = now;
        &entry.info
    }

    fn read(&self, pid: u32, comm: &str) -> ProcessInfo {
        let root = Path::new("/proc").join(pid.to_string());
        // The command line last: a process that exits releases its memory (and with it all
        // three) once, so a command line read means the two before it were read whole.
        let exe = std::fs::read_link(root.join("exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| comm.to_string());
        let environ: Vec<(String, String)> = read_nul_separated(&root.join("environ"))
            .into_iter()
            .filter(|kv| kv.starts_with("OTEL_"))
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let argv = read_nul_separated(&root.join("cmdline"));
        let container = std::fs::read_to_string(root.join("cgroup"))
            .ok()
            .and_then(|text| container_of(&text));
        self.build(pid, exe, argv, &environ, container)
    }

    /// A process gone before it was looked up, as its exec described it. The container is not
    /// known (its cgroup went with it).
    fn reported(&self, exec: &crate::decode::ExecEvent) -> ProcessInfo {
        let exe = executable_of(&exec.filename, &exec.argv);
        self.build(exec.pid, exe, exec.argv.clone(), &exec.environ, None)
    }

    fn build(
        &self,
        pid: u32,
        exe: String,
        argv: Vec<String>,
        environ: &[(String, String)],
        container: Option<ContainerRef>,
    ) -> ProcessInfo {
        let explicit = explicit_service_name(&exe, &argv, environ, &self.rules);
        ProcessInfo {
            pid,
            named_explicitly: explicit.is_some(),
            service_name: explicit.unwrap_or_else(|| derived_name(&exe, &argv)),
            command_line: if self.redact_command_line {
                crate::redact::command_line(&argv)
            } else {
                argv.join(" ")
            },
            executable_name: exe,
            attributes: container
                .iter()
                .map(|c| (Cow::Borrowed("container.id"), c.id.clone()))
                .chain(declared_attributes(environ))
                .collect(),
            container,
        }
    }

    /// Forgets processes that no longer exist (called periodically).
    pub fn prune(&mut self) {
        self.by_pid.retain(|pid, e| {
            e.last_used.elapsed() < KEEP_EXITED || Path::new("/proc").join(pid.to_string()).exists()
        });
    }
}

/// The executable's file name as /proc/PID/exe would give it: symbolic links resolved; for a
/// script (`#!`), its interpreter, which the kernel put first in the arguments.
fn executable_of(filename: &str, argv: &[String]) -> String {
    let script = std::fs::File::open(filename).is_ok_and(|mut f| {
        let mut magic = [0u8; 2];
        std::io::Read::read_exact(&mut f, &mut magic).is_ok() && &magic == b"#!"
    });
    let path = match argv.first() {
        Some(interpreter) if script => interpreter.as_str(),
        _ => filename,
    };
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.into());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn a_process_gone_before_its_lookup_is_named_from_its_exec() {
        // Above any pid_max: never a live process.
        let pid = 4_194_304 + 7;
        let mut cache = ProcessCache::new(Vec::new());
        assert_eq!(cache.get(pid, "curl").service_name, "curl");
        assert_eq!(cache.get(pid, "curl").command_line, "");
        cache.exec(crate::decode::ExecEvent {
            ts_ns: 1,
            pid,
            filename: "/usr/bin/python3".into(),
            argv: argv("python3 /srv/sdk_client.py --token=abc"),
            environ: vec![("OTEL_RESOURCE_ATTRIBUTES".into(), "team=payments".into())],
        });
        let info = cache.get(pid, "python3").clone();
        assert_eq!(info.service_name, "sdk_client");
        assert!(info.executable_name.starts_with("python3"), "{info:?}");
        assert_eq!(
            info.command_line,
            "python3 /srv/sdk_client.py --token=REDACTED"
        );
        assert!(
            info.attributes
                .iter()
                .any(|(k, v)| k == "team" && v == "payments")
        );
    }

    #[test]
    fn a_script_is_named_by_its_interpreter_like_proc_does() {
        let dir = std::env::temp_dir().join(format!("loupe-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("job.sh");
        std::fs::write(&script, "#!/bin/sh\necho\n").unwrap();
        let path = script.to_string_lossy().into_owned();
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert_eq!(
            executable_of(&path, &argv(&format!("/bin/sh {path}"))),
            sh.file_name().unwrap().to_string_lossy()
        );
        assert_eq!(executable_of("/nonexistent/curl", &argv("curl")), "curl");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_process_own_otel_service_name_wins() {
        let env = vec![("OTEL_SERVICE_NAME".to_string(), "checkout".to_string())];
        assert_eq!(
            service_name("python3.11", &argv("python3 app.py"), &env, &[]),
            "checkout"
        );
        let env = vec![(
            "OTEL_RESOURCE_ATTRIBUTES".to_string(),
            "a=b,service.name=cart".to_string(),
        )];
        assert_eq!(
            service_name("node", &argv("node server.js"), &env, &[]),
            "cart"
        );
    }

    #[test]
    fn a_process_declares_its_own_resource_attributes() {
        let env = vec![(
            "OTEL_RESOURCE_ATTRIBUTES".to_string(),
            "service.name=cart, deployment.environment.name=prod,service.version=1.4%2C2,\
             host.name=spoofed,api.token=abc123,team=pay%20ments,broken"
                .to_string(),
        )];
        let got: Vec<(String, String)> = declared_attributes(&env)
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v))
            .collect();
        let want: Vec<(String, String)> = [
            ("deployment.environment.name", "prod"),
            ("service.version", "1.4,2"),
            ("api.token", "REDACTED"),
            ("team", "pay ments"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(declared_attributes(&[]).is_empty());
    }

    #[test]
    fn configured_rules_override_everything() {
        let rules = vec![ServiceNameRule::matching("gunicorn", "orders")];
        let env = vec![("OTEL_SERVICE_NAME".to_string(), "x".to_string())];
        assert_eq!(
            service_name(
                "python3.11",
                &argv("/usr/bin/python3 /usr/local/bin/gunicorn app:app"),
                &env,
                &rules
            ),
            "orders"
        );
    }

    #[test]
    fn derived_from_the_program_an_interpreter_runs() {
        assert_eq!(
            service_name(
                "python3.11",
                &argv("python3 -u /srv/app/orders.py --port 80"),
                &[],
                &[]
            ),
            "orders"
        );
        assert_eq!(
            service_name("python3.11", &argv("python3 -m http.server 8080"), &[], &[]),
            "http.server"
        );
        assert_eq!(
            service_name("node", &argv("node --require x dist/server.js"), &[], &[]),
            "server"
        );
        assert_eq!(
            service_name(
                "java",
                &argv("java -Xmx1g -jar /opt/billing-1.2.jar"),
                &[],
                &[]
            ),
            "billing-1"
        );
        assert_eq!(
            service_name("java", &argv("java -cp a.jar com.acme.Main"), &[], &[]),
            "Main"
        );
        assert_eq!(
            service_name("nginx", &argv("nginx: worker process"), &[], &[]),
            "nginx"
        );
        assert_eq!(
            service_name("python3", &argv("python3 -c print(1)"), &[], &[]),
            "python3"
        );
        assert_eq!(service_name("", &[], &[], &[]), "unknown_service");
    }
}
