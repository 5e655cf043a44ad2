//! Privileged end-to-end: `loupe top` in a real terminal (tmux), over a Flask service and a
//! Python client: the two services and the edge between them appear with their figures, the
//! view sorts on `s` and the agent stops cleanly on `q`.

use std::{process::Command, time::Duration};

use loupe_tests::{TestCgroup, loupe_bin, privileged};

struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Tmux {
        let name = format!("loupe-top-{}", std::process::id());
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "160",
                "-y",
                "45",
                command,
            ])
            .status()
            .expect("tmux (tests/setup.sh installs it)")
            .success();
        assert!(ok, "tmux new-session");
        Tmux(name)
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        Command::new("tmux")
            .args(["send-keys", "-t", &self.0, keys])
            .status()
            .unwrap();
    }

    /// Waits until the screen satisfies `ok`; the last screen either way.
    fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

fn row<'a>(screen: &'a str, name: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .map(|l| l.trim_matches(|c| c == '│' || c == ' '))
        .find(|l| l.starts_with(name))
        .map(|l| l[name.len()..].split_whitespace().collect())
}

#[test]
fn top_shows_services_and_their_edge_live() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("top");
    let server = loupe_tests::gunicorn(&cg, 2, Some("catalog"));
    let addr = server.addr;

    let view = Tmux::start(&format!(
        "{} top --cgroup {}; echo EXITED $?; sleep 60",
        loupe_bin().display(),
        cg.dir
    ));
    view.wait("the agent to be ready", |s| s.contains("ready:"));
    let script = format!(
        "import http.client\n\
         c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=30)\n\
         for i in range(30):\n\
         \x20   c.request('GET', '/users/%d' % i); r = c.getresponse(); r.read(); assert r.status == 200\n\
         for i in range(10):\n\
         \x20   c.request('GET', '/fail'); r = c.getresponse(); r.read(); assert r.status == 503\n",
        port = addr.port()
    );
    let out = cg
        .command("python3", &["-c", &script])
        .env("OTEL_SERVICE_NAME", "frontend")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let screen = view.wait("both services and the edge with every request", |s| {
        row(s, "catalog").is_some_and(|r| r.last() == Some(&"40"))
            && row(s, "frontend → catalog").is_some_and(|r| r.last() == Some(&"40"))
    });
    // REQ/S ERR% P50 P99 TOTAL: a quarter of the requests in the window failed.
    let catalog = row(&screen, "catalog").unwrap();
    assert_eq!(catalog[1], "25.0", "{screen}");
    let edge = row(&screen, "frontend → catalog").unwrap();
    assert_eq!(edge[1], "25.0", "{screen}");
    assert!(screen.contains("sorted by rate"), "{screen}");
    view.keys("s");
    view.wait("sorting by errors", |s| s.contains("sorted by errors"));
    view.keys("q");
    view.wait("the agent to stop cleanly", |s| s.contains("EXITED 0"));
    drop(server);
}
