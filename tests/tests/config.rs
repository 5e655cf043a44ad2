//! Bad configuration: a one-line error that says what to do, and a non-zero exit, before anything
//! is loaded (so no privileges are needed here).

use loupe_tests::loupe_bin;

/// Arguments, environment, and the hint the error must contain.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = std::process::Command::new(loupe_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (cargo xtask build)",
                loupe_bin().display()
            )
        });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn bad_configuration_fails_fast_with_a_hint() {
    let missing = std::env::temp_dir().join("loupe-no-such-config.yaml");
    let bad_yaml = std::env::temp_dir().join(format!("loupe-bad-{}.yaml", std::process::id()));
    std::fs::write(&bad_yaml, "redaction:\n  query_value: false\n").unwrap();
    let last_capture =
        std::env::temp_dir().join(format!("loupe-last-capture-{}.jsonl", std::process::id()));
    std::fs::write(&last_capture, "{}\n").unwrap();
    let cases: Vec<Case> = vec![
        (
            vec!["--otlp-protocol", "carrier-pigeon"],
            vec![],
            "use grpc or http/protobuf",
        ),
        (
            vec!["--otlp-endpoint", "collector:4317"],
            vec![],
            "give a URL such as",
        ),
        (
            vec![],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            "give a URL such as",
        ),
        (
            vec!["--config", missing.to_str().unwrap()],
            vec![],
            "give a readable YAML file",
        ),
        (
            vec!["--config", bad_yaml.to_str().unwrap()],
            vec![],
            "query_value",
        ),
        (
            vec!["capture", "--capture-bytes", "0"],
            vec![],
            "must be between 1 and",
        ),
        (
            vec!["--cgroup", "/no/such/cgroup"],
            vec![],
            "give an existing path",
        ),
        (
            vec![],
            vec![("OTEL_TRACES_EXPORTER", "zipkin")],
            "use otlp, console or none",
        ),
        (vec!["--pid", "999999999"], vec![], "no such process"),
        (
            vec!["--output", last_capture.to_str().unwrap()],
            vec![],
            "add --append to add to it",
        ),
    ];
    for (args, env, hint) in cases {
        let (code, stderr) = run(&args, &env);
        assert_ne!(code, 0, "{args:?} {env:?} succeeded");
        assert!(stderr.contains(hint), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    // An unknown flag: clap's usage error, exit code 2.
    let (code, stderr) = run(&["--no-such-flag"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    let _ = std::fs::remove_file(bad_yaml);
    assert_eq!(
        std::fs::read_to_string(&last_capture).unwrap(),
        "{}\n",
        "the refused file is untouched"
    );
    let _ = std::fs::remove_file(last_capture);
}
