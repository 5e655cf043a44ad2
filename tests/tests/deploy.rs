//! The deployment files: the Kubernetes manifests validate against the Kubernetes OpenAPI
//! schemas (kubernetes-validate from PyPI, strict: unknown fields are errors) for the oldest
//! and newest Kubernetes versions supported, and hold what a node agent needs.

use std::process::Command;

use loupe_tests::{tests_dir, venv_bin};
use serde_json::Value;

fn manifests() -> std::path::PathBuf {
    tests_dir().join("../deploy/kubernetes/loupe.yaml")
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
        let out = validate(&manifests(), version);
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(manifests())
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
    assert_eq!(pod["tolerations"][0]["operator"], "Exists", "every node");
    let c = &pod["containers"][0];
    let env = c["env"].as_array().unwrap();
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
    assert!(dockerfile.contains("cargo xtask build --release"));
    assert!(dockerfile.contains("-slim"), "small runtime image");
}
