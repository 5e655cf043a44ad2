//! The deployment files: the Kubernetes manifests validate against the Kubernetes OpenAPI
//! schemas (kubernetes-validate from PyPI, strict: unknown fields are errors) for the oldest
//! and newest Kubernetes versions supported, and hold what a node agent needs.

use std::process::Command;

use loupe_tests::{tests_dir, venv_bin};
use serde_json::Value;

fn manifests() -> std::path::PathBuf {
    tests_dir().join("../deploy/kubernetes/loupe.yaml")
}

/// The example backend (a Collector in front of Jaeger) the README walks through.
fn example_backend() -> std::path::PathBuf {
    tests_dir().join("../deploy/kubernetes/collector-jaeger.yaml")
}

fn validate(path: &std::path::Path, version: &str) -> std::process::Output {
    Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--no-warn", "-k", version])
        .arg(path)
        .output()
        .expect("run kubernetes-validate (tests/setup.sh installs it)")
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    // 1.30: the first release with securityContext.appArmorProfile.
    for version in ["1.30.0", "1.37.0"] {
        for file in [manifests(), example_backend()] {
            let out = validate(&file, version);
            assert!(
                out.status.success(),
                "{} on Kubernetes {version}:\n{}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The header states the minimum the manifests need.
    let text = std::fs::read_to_string(manifests()).unwrap();
    assert!(
        text.contains("Needs Kubernetes 1.30+"),
        "minimum version stated"
    );
    // The validator does catch mistakes: a misspelt field fails.
    let broken = std::env::temp_dir().join(format!("loupe-broken-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(manifests()).unwrap();
    std::fs::write(&broken, text.replace("hostPID: true", "hostPid: true")).unwrap();
    let out = validate(&broken, "1.37.0");
    let _ = std::fs::remove_file(&broken);
    assert!(!out.status.success(), "a misspelt field passed validation");
}

/// The manifests as JSON documents (PyYAML from the validator's own dependencies).
fn documents() -> Vec<Value> {
    documents_of(&manifests())
}

fn documents_of(path: &std::path::Path) -> Vec<Value> {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_daemonset_has_what_a_node_agent_needs() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "PriorityClass",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let pods_rule = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"].as_array().unwrap().contains(&"pods".into()))
        .expect("a rule on pods");
    for verb in ["get", "list", "watch"] {
        assert!(
            pods_rule["verbs"]
                .as_array()
                .unwrap()
                .contains(&verb.into())
        );
    }

    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "host /proc");
    // Its own PriorityClass: system-node-critical outside kube-system is refused on some
    // providers (GKE without a ResourceQuota).
    let priority = docs.iter().find(|d| d["kind"] == "PriorityClass").unwrap();
    assert_eq!(pod["priorityClassName"], priority["metadata"]["name"]);
    assert_ne!(pod["priorityClassName"], "system-node-critical");
    // Metrics: scrape annotations and a headless Service on the metrics port.
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9464);
    assert_eq!(pod["tolerations"][0]["operator"], "Exists", "every node");
    let c = &pod["containers"][0];
    // No image is published: the placeholder cannot be pulled by accident.
    let image = c["image"].as_str().unwrap();
    assert!(image.starts_with("registry.invalid/"), "{image}");
    let env = c["env"].as_array().unwrap();
    // Cross-node traces on by default in a cluster, with the capability sock_ops needs.
    let tcp_context = env
        .iter()
        .find(|e| e["name"] == "LOUPE_TCP_CONTEXT")
        .and_then(|e| e["value"].as_str());
    assert_eq!(tcp_context, Some("true"));
    assert!(
        c["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .contains(&"NET_ADMIN".into())
    );
    // The example backend answers at the address the DaemonSet exports to.
    let endpoint = env
        .iter()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
        .and_then(|e| e["value"].as_str())
        .unwrap();
    let backend = documents_of(&example_backend());
    let collector = backend
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "otel-collector")
        .expect("the Collector's Service");
    let host = format!(
        "http://{}.{}.svc:",
        collector["metadata"]["name"].as_str().unwrap(),
        collector["metadata"]["namespace"].as_str().unwrap()
    );
    assert!(endpoint.starts_with(&host), "{endpoint} vs {host}");
    assert!(
        collector["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| endpoint.ends_with(&format!(":{}", p["port"]))),
        "{endpoint}"
    );
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["cpu"].is_string());
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false, "least privilege, not privileged");
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for cap in ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"] {
        assert!(added.contains(&cap), "{cap} missing from {added:?}");
    }
    assert!(!added.contains(&"SYS_ADMIN"), "{added:?}");
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for path in [
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
        "/etc/loupe",
    ] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
}

#[test]
fn the_image_builds_with_the_projects_own_command() {
    let dockerfile = std::fs::read_to_string(tests_dir().join("../deploy/Dockerfile")).unwrap();
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "multi-stage: build, then a small runtime image");
    // The documented way to a release binary, stripped of debug info.
    assert!(dockerfile.contains("cargo xtask install"));
    assert!(dockerfile.contains("-slim"), "small runtime image");
    // The build context leaves out build output (gigabytes) and the test virtualenv.
    let ignore = std::fs::read_to_string(tests_dir().join("../.dockerignore")).unwrap();
    for path in ["target/", "tests/.venv/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == path),
            "{path} not in .dockerignore"
        );
    }
}

/// The Collector tiers for cluster-wide tail sampling route by trace id and keep errors, slow
/// traces and a share of the rest.
#[test]
fn the_tail_sampling_collector_tiers_route_by_trace_and_keep_errors() {
    let dir = tests_dir().join("../deploy/collector");
    let lb = &documents_of(&dir.join("loadbalancer.yaml"))[0];
    let exporter = &lb["exporters"]["loadbalancing"];
    assert_eq!(exporter["routing_key"], "traceID");
    assert!(exporter["resolver"]["dns"]["hostname"].is_string());
    assert_eq!(
        lb["service"]["pipelines"]["traces"]["exporters"][0],
        "loadbalancing"
    );
    let ts = &documents_of(&dir.join("tail-sampling.yaml"))[0];
    let policies = ts["processors"]["tail_sampling"]["policies"]
        .as_array()
        .unwrap();
    let types: Vec<&str> = policies.iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types, ["status_code", "latency", "probabilistic"]);
    assert_eq!(policies[0]["status_code"]["status_codes"][0], "ERROR");
    assert_eq!(
        ts["service"]["pipelines"]["traces"]["processors"][0],
        "tail_sampling"
    );
}
