//! Privileged: the real kernel programs capture real sockets, byte for byte.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    time::Duration,
};

use loupe_tests::{
    Agent, Captured, contains, metric, pattern, privileged,
    sockets::{self, Family, recv, send},
};

/// A connected pair over loopback: (client, server).
fn pair(v6: bool) -> (TcpStream, TcpStream) {
    let listener =
        TcpListener::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).expect("bind loopback");
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Writes `data` on `from` and reads exactly as much on `to`.
fn transfer(from: &mut impl Write, to: &mut impl Read, data: &[u8]) {
    from.write_all(data).unwrap();
    let mut buf = vec![0; data.len()];
    to.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data);
}

fn addrs(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (s.local_addr().unwrap(), s.peer_addr().unwrap())
}

/// One request/response exchange with `family`, payloads larger than one iovec but each call
/// below the capture cap so every byte must come out.
fn exchange(
    family: Family,
    client: &TcpStream,
    server: &TcpStream,
    seed: u8,
) -> (Vec<u8>, Vec<u8>) {
    let request = pattern(3000, seed);
    let response = pattern(2500, seed.wrapping_add(1));
    send(client.as_raw_fd(), family, &request);
    assert_eq!(recv(server.as_raw_fd(), family, request.len()), request);
    send(server.as_raw_fd(), family, &response);
    assert_eq!(recv(client.as_raw_fd(), family, response.len()), response);
    (request, response)
}

fn assert_streams(
    c: &Captured,
    client: &TcpStream,
    server: &TcpStream,
    req: &[u8],
    resp: &[u8],
    family: Family,
) {
    let (cl, cr) = addrs(client);
    let (sl, sr) = addrs(server);
    let what = format!("{family:?} {cl}");
    assert_eq!(c.stream(cl, cr, "send"), req, "{what}: client send stream");
    assert_eq!(c.stream(sl, sr, "recv"), req, "{what}: server recv stream");
    assert_eq!(c.stream(sl, sr, "send"), resp, "{what}: server send stream");
    assert_eq!(c.stream(cl, cr, "recv"), resp, "{what}: client recv stream");

    let (send_sys, recv_sys) = family.syscalls();
    let client_events = c.of(cl, cr);
    assert!(
        client_events
            .iter()
            .all(|e| e.role == "client" && e.pid == std::process::id()),
        "{what}: {client_events:?}"
    );
    assert!(
        client_events
            .iter()
            .filter(|e| e.direction == "send")
            .all(|e| e.syscall == send_sys),
        "{what}"
    );
    assert!(
        client_events
            .iter()
            .filter(|e| e.direction == "recv")
            .all(|e| e.syscall == recv_sys),
        "{what}"
    );
    assert!(
        c.of(sl, sr)
            .iter()
            .all(|e| e.role == "server" && !e.midstream),
        "{what}"
    );
    // `loupe capture` names the thread on every event, not only on a connection's first (which
    // is all `loupe run` asks the kernel for). Both ends are this test's thread, still alive.
    let thread_comm = |tid: u32| {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default()
    };
    for e in client_events.iter().chain(c.of(sl, sr).iter()) {
        assert_eq!(
            e.comm,
            thread_comm(e.tid),
            "{what}: seq {} {}",
            e.seq,
            e.direction
        );
    }
}

/// The capture path the agent must say it uses (its log's `capture:` line).
#[derive(Clone, Copy)]
enum Path {
    /// Whatever this kernel gives: the sock tracepoints on 6.3+.
    Auto,
    /// Forced, as on kernels before 6.3: the syscall tracepoints with the fd resolved in the
    /// program.
    Syscalls,
}

fn start(path: Path, args: &[&str]) -> Agent {
    let mut all = args.to_vec();
    if let Path::Syscalls = path {
        all.extend(["--capture-path", "syscalls"]);
    }
    let agent = Agent::start(&all);
    if let Path::Syscalls = path {
        assert!(
            agent.log().contains("capture: syscall tracepoints"),
            "{}",
            agent.log()
        );
    }
    agent
}

/// The agent capturing every protocol of this test process only, and its metrics address.
fn this_process_with_metrics() -> (Agent, String) {
    let me = std::process::id().to_string();
    let addr = format!("127.0.0.1:{}", loupe_tests::free_port());
    let agent = Agent::start(&["--all-protocols", "--pid", &me, "--metrics-addr", &addr]);
    (agent, addr)
}

/// Whether the agent captures on the sock tracepoints (6.3+); what only that path does is not
/// asked of the syscall path on older kernels (the matrix runs these tests there too).
fn on_the_sock_path(agent: &Agent) -> bool {
    let sock = agent.log().contains("capture: sock tracepoints");
    if !sock {
        eprintln!("the sock path only; this kernel captures on the syscall tracepoints");
    }
    sock
}

fn every_syscall_family(v6: bool, path: Path) {
    if !privileged() {
        return;
    }
    let me = std::process::id().to_string();
    let agent = start(path, &["--all-protocols", "--pid", &me]);
    let mut runs = Vec::new();
    for (i, family) in Family::ALL.into_iter().enumerate() {
        let (client, server) = pair(v6);
        let (req, resp) = exchange(family, &client, &server, i as u8 * 2);
        // A second exchange on the same connection: streams must continue, not restart.
        let (req2, resp2) = exchange(family, &client, &server, i as u8 * 2 + 1);
        runs.push((
            family,
            client,
            server,
            [req, req2].concat(),
            [resp, resp2].concat(),
        ));
    }
    let captured = agent.stop();
    for (family, client, server, req, resp) in &runs {
        assert_streams(&captured, client, server, req, resp, *family);
    }
}

#[test]
fn captures_every_syscall_family_over_ipv4() {
    every_syscall_family(false, Path::Auto);
}

#[test]
fn captures_every_syscall_family_over_ipv6() {
    every_syscall_family(true, Path::Auto);
}

#[test]
fn the_syscall_path_captures_every_syscall_family_over_ipv4() {
    every_syscall_family(false, Path::Syscalls);
}

#[test]
fn the_syscall_path_captures_every_syscall_family_over_ipv6() {
    every_syscall_family(true, Path::Syscalls);
}

/// A writev and a recvmsg of 100 slices each, more than the programs' unrolled loop walks (32):
/// the sock path walks the rest with bpf_loop, so both streams come out whole and nothing is
/// counted; the syscall path (kernels before 6.3) stops at 32 and says so (`iov_limit`).
fn long_vectors(path: Path, extra: &[&str]) {
    if !privileged() {
        return;
    }
    // The connection is open before the agent, as a service's would be.
    let (client, server) = pair(false);
    let me = std::process::id().to_string();
    let agent = start(path, &[&["--all-protocols", "--pid", &me], extra].concat());
    let data = pattern(3000, 41);
    sockets::writev_sliced(client.as_raw_fd(), &data, 30);
    assert_eq!(
        sockets::recvmsg_sliced(server.as_raw_fd(), data.len(), 30),
        data
    );
    let c = agent.stop();
    let (cl, cr) = addrs(&client);
    let (sl, sr) = addrs(&server);
    match path {
        Path::Auto => {
            assert_eq!(c.stream(cl, cr, "send"), data, "the writev's stream");
            assert_eq!(c.stream(sl, sr, "recv"), data, "the recvmsg's stream");
            assert!(!c.stderr.contains("iov_limit"), "{}", c.stderr);
        }
        Path::Syscalls => {
            let sends: Vec<_> = c
                .of(cl, cr)
                .into_iter()
                .filter(|e| e.direction == "send")
                .collect();
            assert_eq!(sends.len(), 1, "one writev, one event");
            assert_eq!(sends[0].bytes, 3000);
            assert!(sends[0].truncated);
            assert_eq!(sends[0].payload(), &data[..32 * 30]);
            assert!(c.stderr.contains("kernel.iov_limit="), "{}", c.stderr);
        }
    }
}

#[test]
fn vectors_longer_than_the_unrolled_loop_are_captured_whole() {
    long_vectors(Path::Auto, &[]);
}

/// The same with `--tcp-context`, whose larger programs unroll only 20.
#[test]
fn vectors_longer_than_the_unrolled_loop_are_captured_whole_with_tcp_context() {
    long_vectors(Path::Auto, &["--tcp-context"]);
}

#[test]
fn the_syscall_path_stops_at_32_iovecs_and_counts_the_rest() {
    long_vectors(Path::Syscalls, &[]);
}

#[test]
fn payloads_beyond_the_cap_are_truncated_and_marked() {
    if !privileged() {
        return;
    }
    let me = std::process::id().to_string();
    let agent = Agent::start(&["--all-protocols", "--pid", &me, "--capture-bytes", "1000"]);
    let (mut client, mut server) = pair(false);
    let big = pattern(10_000, 7);
    client.write_all(&big).unwrap();
    let mut got = vec![0; big.len()];
    server.read_exact(&mut got).unwrap();
    let c = agent.stop();
    let (cl, cr) = addrs(&client);
    let sends: Vec<_> = c
        .of(cl, cr)
        .into_iter()
        .filter(|e| e.direction == "send")
        .collect();
    assert_eq!(sends.len(), 1, "one write, one event");
    assert_eq!(sends[0].bytes, 10_000);
    assert_eq!(sends[0].captured, 1000);
    assert!(sends[0].truncated);
    assert_eq!(sends[0].payload(), &big[..1000]);
    // The receiving side's stream accounts for every byte even where none were captured.
    let (sl, sr) = addrs(&server);
    let total: u64 = c
        .of(sl, sr)
        .iter()
        .filter(|e| e.direction == "recv")
        .map(|e| e.bytes as u64)
        .sum();
    assert_eq!(total, 10_000);
}

#[test]
fn a_connection_opened_before_the_agent_is_captured_from_its_next_io() {
    opened_before_the_agent(Path::Auto);
}

#[test]
fn the_syscall_path_captures_a_connection_opened_before_the_agent() {
    opened_before_the_agent(Path::Syscalls);
}

fn opened_before_the_agent(path: Path) {
    if !privileged() {
        return;
    }
    // The listener stays open, as a real server's does: the role comes from it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    transfer(&mut client, &mut server, b"before the agent");

    let me = std::process::id().to_string();
    let agent = start(path, &["--all-protocols", "--pid", &me]);
    transfer(&mut client, &mut server, b"after the agent started");
    transfer(&mut server, &mut client, b"reply");
    let c = agent.stop();

    let (cl, cr) = addrs(&client);
    let (sl, sr) = addrs(&server);
    let client_sends: Vec<_> = c
        .of(cl, cr)
        .into_iter()
        .filter(|e| e.direction == "send")
        .collect();
    assert_eq!(client_sends.len(), 1);
    assert_eq!(client_sends[0].payload(), b"after the agent started");
    assert!(client_sends[0].midstream, "joined mid-stream");
    // The role came from /proc: the server side owns the listening port.
    assert_eq!(client_sends[0].role, "client");
    assert!(
        c.of(sl, sr).iter().all(|e| e.role == "server"),
        "{:?}",
        c.of(sl, sr)
    );
    assert_eq!(c.stream(sl, sr, "send"), b"reply");
}

/// A client that resets its connection with a request unread (a timeout, a killed pod): the
/// server still reads the queued bytes after the reset closed the socket. Those reads must not
/// bring the connection back as a new one joined mid-stream (it would never close, and its role
/// would be looked up in /proc); they are counted instead. The sock path only (see
/// agent-ebpf programs/sock.rs `closed`).
#[test]
fn bytes_read_after_a_reset_are_counted_not_captured_as_a_new_connection() {
    if !privileged() {
        return;
    }
    // The connection is open and in use before the agent starts, as a pooled one is.
    let (mut client, mut server) = pair(false);
    // Taken now: a reset socket has no peer address.
    let (sl, sr) = addrs(&server);
    transfer(&mut client, &mut server, b"before the agent");
    let (agent, addr) = this_process_with_metrics();
    if !on_the_sock_path(&agent) {
        return;
    }
    transfer(&mut client, &mut server, b"first request, read in time");
    client
        .write_all(b"second request, QUEUED-AT-RESET")
        .unwrap();
    // SO_LINGER 0: close() sends a reset instead of a FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let mut queued = [0u8; 64];
    let n = server.read(&mut queued).unwrap();
    assert_eq!(&queued[..n], b"second request, QUEUED-AT-RESET");

    let metrics = loupe_tests::scrape(&addr);
    let c = agent.stop();
    assert_eq!(c.stream(sl, sr, "recv"), b"first request, read in time");
    // A revived socket has lost its local port to the close: look at every read.
    let revived: Vec<_> = c
        .data
        .iter()
        .filter(|e| e.direction == "recv" && contains(&e.payload(), b"QUEUED-AT-RESET"))
        .collect();
    assert!(
        revived.is_empty(),
        "the read after the reset revived the connection: {revived:?}"
    );
    let after_close = metric(&metrics, "loupe_kernel_events_total{reason=\"after_close\"");
    assert_eq!(after_close, Some(1), "{metrics}");
}

/// A process's first connection wakes the ring reader at once (the agent reads a new process's
/// /proc before a short-lived client is gone); its later ones wait for the timed drain. A
/// process opening a connection per request (no keep-alive) woke the reader, and the pipeline
/// after it, per request.
#[test]
fn only_a_processs_first_connection_wakes_the_reader() {
    if !privileged() {
        return;
    }
    let (agent, addr) = this_process_with_metrics();
    if !on_the_sock_path(&agent) {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ends = Vec::new();
    for i in 0..40 {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        transfer(&mut client, &mut server, format!("request {i}").as_bytes());
        ends.push(addrs(&server));
        // Apart enough that a reader woken per connection drains each on its own.
        std::thread::sleep(Duration::from_millis(2));
    }
    let metrics = loupe_tests::scrape(&addr);
    let c = agent.stop();
    for (i, (local, remote)) in ends.into_iter().enumerate() {
        assert_eq!(
            c.stream(local, remote, "recv"),
            format!("request {i}").as_bytes()
        );
    }
    let wakeups = metric(&metrics, "loupe_ring_wakeups_total").unwrap();
    // One for this process's first connection; a signal may add one.
    assert!(
        wakeups <= 2,
        "{wakeups} wakeups for 80 connections of one process"
    );
}

/// The ring reader runs at SCHED_IDLE while the agent keeps up, so that its drains never keep a
/// service's woken thread waiting; on a host whose cores are all busy it then gets almost no
/// CPU, and the ring would fill. A watchdog at batch priority raises it when half the ring
/// waits: here every core spins and a traced connection writes ~20k messages a second (the
/// ring, 8 MiB, fills in about a second and a half without a drain); nothing may be lost.
#[test]
fn an_idle_reader_on_a_busy_host_is_raised_before_the_ring_fills() {
    if !privileged() {
        return;
    }
    // The connection is open before the agent, as a service's is.
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"before the agent");
    let (agent, addr) = this_process_with_metrics();
    // The agent starts at normal priority and goes idle after a calm second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&loupe_tests::scrape(&addr), "loupe_cpu_scheduling_idle ") != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never went idle: {}",
            loupe_tests::scrape(&addr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let raised = |text: &str| metric(text, "loupe_cpu_scheduling_raised_total ").unwrap();
    let raised_before = raised(&loupe_tests::scrape(&addr));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        while let Ok(n) = server.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let message = [b'x'; 100];
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        // Paced at ~20k writes a second by spinning: this thread keeps its core busy too.
        let due = Duration::from_micros(50 * sent);
        while started.elapsed() < due {
            std::hint::spin_loop();
        }
        client.write_all(&message).unwrap();
        sent += 1;
    }
    drop(client);
    let received = receiver.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    assert_eq!(received as u64, sent * 100);
    let metrics = loupe_tests::scrape(&addr);
    let _ = agent.stop();
    let full = metric(
        &metrics,
        "loupe_kernel_events_total{reason=\"ringbuf_full\"",
    );
    assert_eq!(full, Some(0), "records lost in a full ring: {metrics}");
    let raised_after = raised(&metrics);
    assert!(
        raised_after > raised_before,
        "the reader was never raised ({raised_before} -> {raised_after}): the test did not starve it"
    );
}

#[test]
fn the_agents_own_traffic_is_never_captured() {
    if !privileged() {
        return;
    }
    let port = loupe_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&["--all-protocols", "--metrics-addr", &addr]);
    let agent_pid = agent.pid();
    // Scrape the agent's own metrics endpoint: the agent answers on a TCP socket.
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = TcpStream::connect(&addr) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: loupe\r\n\r\n")
                .unwrap();
            s.read_to_string(&mut body).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        body.contains("loupe_kernel_events_total"),
        "metrics answer: {body}"
    );
    let c = agent.stop();
    let me = std::process::id();
    // Our side of the scrape is captured (so capture works here) ...
    assert!(
        c.data.iter().any(|d| d.pid == me
            && d.remote.port() == port
            && contains(&d.payload(), b"GET /metrics")),
        "the test's own request was not captured"
    );
    // ... the agent's side is not.
    let own: Vec<_> = c.data.iter().filter(|d| d.pid == agent_pid).collect();
    assert!(own.is_empty(), "agent captured itself: {own:?}");
    // Its socket is the one bound to the metrics port: no event may be on it, whatever the pid.
    assert!(
        c.data.iter().all(|d| d.local.port() != port),
        "the agent's socket was captured"
    );
}

#[test]
fn udp_and_unix_sockets_are_ignored() {
    udp_unix_pipes_and_files_are_ignored(Path::Auto);
}

#[test]
fn the_syscall_path_ignores_udp_unix_sockets_pipes_and_files() {
    udp_unix_pipes_and_files_are_ignored(Path::Syscalls);
}

fn udp_unix_pipes_and_files_are_ignored(path: Path) {
    if !privileged() {
        return;
    }
    let me = std::process::id().to_string();
    let agent = start(path, &["--all-protocols", "--pid", &me]);
    // On the syscall path every read/write is looked at: the fd walk must tell these apart.
    let file = std::env::temp_dir().join(format!("loupe-capture-file-{me}"));
    std::fs::write(&file, b"FILE-MARKER-4").unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"FILE-MARKER-4");
    std::fs::remove_file(&file).unwrap();
    let (mut pr, mut pw) = std::io::pipe().unwrap();
    transfer(&mut pw, &mut pr, b"PIPE-MARKER-5");

    let udp_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_b = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_a
        .send_to(b"UDP-MARKER-1", udp_b.local_addr().unwrap())
        .unwrap();
    let mut buf = [0; 64];
    udp_b.recv_from(&mut buf).unwrap();
    let udp6_a = UdpSocket::bind("[::1]:0").unwrap();
    udp6_a.connect(udp_b.local_addr().unwrap()).ok();
    let (mut ua, mut ub) = UnixStream::pair().unwrap();
    transfer(&mut ua, &mut ub, b"UNIX-MARKER-2");
    // A TCP control in the same run: proves the agent was capturing.
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"TCP-MARKER-3");

    let c = agent.stop();
    assert!(
        c.any_payload_contains(b"TCP-MARKER-3"),
        "TCP control missing"
    );
    assert!(!c.any_payload_contains(b"UDP-MARKER-1"), "UDP captured");
    assert!(
        !c.any_payload_contains(b"UNIX-MARKER-2"),
        "unix socket captured"
    );
    assert!(!c.any_payload_contains(b"FILE-MARKER-4"), "file captured");
    assert!(!c.any_payload_contains(b"PIPE-MARKER-5"), "pipe captured");
}

#[test]
fn a_pid_filter_excludes_other_processes() {
    if !privileged() {
        return;
    }
    use std::io::BufRead as _;
    // The selected process runs before the agent starts. The other process is this test: A's
    // parent, so not one of the descendants a pid selection takes in.
    let mut selected = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket,sys\n\
             l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen()\n\
             print('ready', flush=True); sys.stdin.readline()\n\
             c=socket.create_connection(l.getsockname()); a,_=l.accept()\n\
             c.sendall(b'SELECTED-PROCESS-MARKER'); a.recv(64)\n\
             print('done', flush=True)\n",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(selected.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = selected.id();
    let agent = Agent::start(&["--all-protocols", "--pid", &pid.to_string()]);
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"OTHER-PROCESS-MARKER");
    writeln!(selected.stdin.take().unwrap()).unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let _ = selected.wait();
    let c = agent.stop();
    assert!(c.any_payload_contains(b"SELECTED-PROCESS-MARKER"));
    assert!(
        !c.any_payload_contains(b"OTHER-PROCESS-MARKER"),
        "another process was captured"
    );
    assert!(c.data.iter().all(|d| d.pid == pid));
}

#[test]
fn without_all_protocols_only_http_connections_are_captured() {
    if !privileged() {
        return;
    }
    let me = std::process::id().to_string();
    let addr = format!("127.0.0.1:{}", loupe_tests::free_port());
    let agent = Agent::start(&["--pid", &me, "--metrics-addr", &addr]);
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"\x00\x01binary-protocol-MARKER");
    transfer(
        &mut client,
        &mut server,
        b"more binary after classification",
    );

    let (mut hc, mut hs) = pair(false);
    transfer(
        &mut hc,
        &mut hs,
        b"GET /classified HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    transfer(&mut hs, &mut hc, b"HTTP/1.1 204 No Content\r\n\r\n");

    let mut metrics = String::new();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    s.read_to_string(&mut metrics).unwrap();
    let c = agent.stop();
    assert!(c.any_payload_contains(b"GET /classified"));
    assert!(c.any_payload_contains(b"HTTP/1.1 204"));
    assert!(
        !c.any_payload_contains(b"binary"),
        "unclassified traffic was emitted"
    );
    let ignored = metric(
        &metrics,
        "loupe_kernel_events_total{reason=\"conns_ignored\"",
    )
    .unwrap_or(0);
    assert!(
        ignored >= 2,
        "both ends of the binary connection are ignored in the kernel: {ignored}\n{metrics}"
    );
    let (hl, hr) = addrs(&hs);
    assert!(c.of(hl, hr).iter().all(|e| e.protocol == "http1"));
}

/// A Python one-shot TCP exchange sending `marker`, run with `prefix` (e.g. `ip netns exec NS`).
fn python_exchange(prefix: &[&str], setup: &str, marker: &str) {
    let script = format!(
        "{setup}\nimport socket\n\
         l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen()\n\
         c=socket.create_connection(l.getsockname()); a,_=l.accept()\n\
         c.sendall(b'{marker}'); assert a.recv(64)==b'{marker}'\n"
    );
    let mut cmd = std::process::Command::new(prefix.first().copied().unwrap_or("python3"));
    if !prefix.is_empty() {
        cmd.args(&prefix[1..]).arg("python3");
    }
    let out = cmd.arg("-c").arg(&script).output().expect("run python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("iproute2 is installed");
    assert!(st.success(), "ip {args:?} failed");
}

#[test]
fn a_netns_filter_selects_sockets_of_one_namespace() {
    if !privileged() {
        return;
    }
    let ns = format!("loupe-t{}", std::process::id());
    ip(&["netns", "add", &ns]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);

    let agent = Agent::start(&["--all-protocols", "--netns", &ns]);
    python_exchange(&["ip", "netns", "exec", &ns], "", "INSIDE-NETNS-MARKER");
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"ROOT-NETNS-MARKER");
    let c = agent.stop();
    assert!(
        c.any_payload_contains(b"INSIDE-NETNS-MARKER"),
        "traffic in the selected namespace missing"
    );
    assert!(
        !c.any_payload_contains(b"ROOT-NETNS-MARKER"),
        "traffic outside the namespace captured"
    );
}

#[test]
fn a_cgroup_filter_selects_processes_of_one_cgroup() {
    if !privileged() {
        return;
    }
    let cg = loupe_tests::TestCgroup::new("filter");
    let dir = cg.dir.clone();
    let agent = Agent::start(&["--all-protocols", "--cgroup", &dir]);
    // The child moves itself into the cgroup before it talks.
    let setup = format!("import os\nopen('{dir}/cgroup.procs','w').write(str(os.getpid()))");
    python_exchange(&[], &setup, "IN-CGROUP-MARKER");
    let (mut client, mut server) = pair(false);
    transfer(&mut client, &mut server, b"OUTSIDE-CGROUP-MARKER");
    let c = agent.stop();
    assert!(
        c.any_payload_contains(b"IN-CGROUP-MARKER"),
        "traffic of the selected cgroup missing"
    );
    assert!(
        !c.any_payload_contains(b"OUTSIDE-CGROUP-MARKER"),
        "traffic outside the cgroup captured"
    );
}

/// Names of the kernel programs currently loaded (bpftool).
fn loaded_programs() -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool is installed (tests/setup.sh)");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn nothing_stays_attached_after_kill_9() {
    if !privileged() {
        return;
    }
    let agent = Agent::start(&["--all-protocols"]);
    let ours = |names: &[String]| {
        names
            .iter()
            .filter(|n| {
                // Capture and lifecycle programs of either capture path.
                matches!(
                    n.as_str(),
                    "sock_send_length" | "exit_send_buf" | "inet_sock_set_state"
                )
            })
            .count()
    };
    assert!(
        ours(&loaded_programs()) >= 2,
        "the agent's programs are loaded while it runs"
    );
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = ours(&loaded_programs());
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} programs still loaded 10 s after kill -9"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn captured_secrets_are_masked_unless_asked_for() {
    if !privileged() {
        return;
    }
    let request: &[u8] = b"GET /api?token=SECRET-Q1&page=2 HTTP/1.1\r\nHost: x\r\n\
        Authorization: Bearer SECRET-H1\r\nCookie: sid=SECRET-C1\r\nAccept: */*\r\n\r\n";
    let me = std::process::id().to_string();
    for show in [false, true] {
        let (mut client, mut server) = pair(false);
        let mut args = vec!["--pid", me.as_str()];
        if show {
            args.push("--show-secrets");
        }
        let agent = Agent::start(&args);
        transfer(&mut client, &mut server, request);
        transfer(&mut server, &mut client, b"HTTP/1.1 204 No Content\r\n\r\n");
        let c = agent.stop();
        let (cl, cr) = addrs(&client);
        let sent = c.stream(cl, cr, "send");
        assert!(contains(&sent, b"GET /api?"), "captured at all ({show})");
        for secret in [&b"SECRET-Q1"[..], b"SECRET-H1", b"SECRET-C1"] {
            assert_eq!(
                contains(&sent, secret),
                show,
                "{} with --show-secrets={show}:\n{}",
                String::from_utf8_lossy(secret),
                String::from_utf8_lossy(&sent)
            );
        }
        if !show {
            assert!(
                contains(&sent, b"Authorization: REDACTED\r\n")
                    && contains(&sent, b"Accept: */*\r\n"),
                "{}",
                String::from_utf8_lossy(&sent)
            );
        }
    }
}
