//! Least privilege: the agent runs as an unprivileged user holding only the capabilities the
//! README lists (granted as ambient capabilities by capsh), and names what is missing when one is.

use std::{process::Command, time::Duration};

use loupe_tests::{Agent, Server, TestCgroup, free_port, loupe_bin, privileged, tests_dir};

const NEEDED: &str = "cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search";

/// capsh: become `nobody`, keeping `caps` as ambient capabilities, then exec the agent.
fn as_nobody_with(caps: &str) -> Vec<String> {
    vec![
        "capsh".into(),
        format!("--caps={caps},cap_setpcap,cap_setuid,cap_setgid+eip"),
        "--keep=1".into(),
        "--user=nobody".into(),
        format!("--addamb={caps}"),
        "--".into(),
        "-c".into(),
        r#"exec "$0" "$@""#.into(),
    ]
}

#[test]
fn the_listed_capabilities_are_enough_without_root() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("caps");
    let port = free_port();
    let app = tests_dir().join("apps/chain_service.py");
    let svc = Server::start(
        cg.command("python3", &[app.to_str().unwrap(), &port.to_string()]),
        format!("127.0.0.1:{port}").parse().unwrap(),
    );
    // A directory the unprivileged agent may write its output to.
    let dir = std::env::temp_dir().join(format!("loupe-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = dir.join("spans.jsonl");
    let out_s = out.display().to_string();
    let wrapper = as_nobody_with(NEEDED);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::spawn_via(
        &wrapper,
        &loupe_bin(),
        &["run", "--cgroup", &cg.dir, "--output", &out_s],
        &[],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.contains("65534"), "runs as nobody: {uid_line}");

    let script = format!(
        "import urllib.request\nfor i in range(5): urllib.request.urlopen('http://{}/x/{{i}}').read()",
        svc.addr
    );
    cg.run("python3", &["-c", &script]);
    std::thread::sleep(Duration::from_millis(1500));
    let (_, log) = agent.stop_raw();
    let spans = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<serde_json::Value> = spans
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10, "5 requests, both sides\n{log}");
    // With CAP_SYS_PTRACE the other processes' command lines name their services.
    assert!(
        lines
            .iter()
            .any(|s| s["resource"]["service.name"] == "chain_service"),
        "{lines:#?}"
    );
    assert!(!log.contains("degraded"), "{log}");
}

#[test]
fn a_missing_capability_is_named() {
    if !privileged() {
        return;
    }
    let wrapper = as_nobody_with("cap_bpf,cap_sys_ptrace,cap_dac_read_search");
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(loupe_bin())
        .arg("run")
        .output()
        .expect("capsh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without CAP_PERFMON: {err}");
    assert!(err.contains("CAP_PERFMON"), "{err}");
    assert!(!err.contains("CAP_BPF ("), "CAP_BPF is there: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
