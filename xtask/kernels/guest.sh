#!/bin/bash
# Runs inside the VM of `cargo xtask kernels`, as root, on this machine's own userland (the host's
# / shared read-only over 9p; /tmp and friends are the guest's). Prints LOUPE-* lines the xtask
# reads from the serial console; everything else is the log.
#
# Environment (set by the initramfs's /init): LOUPE_BIN, CAPTURE_TEST, SYSCALL_PATH_TEST.
# The kernel command line's loupe.slowdown (the xtask's, 4 under TCG) becomes
# LOUPE_TEST_SLOWDOWN: the tests' startup deadlines scale with it.
set -u
# HOME stays the host's /root (read-only): the test venv's interpreter lives under it (pyenv).

mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up

echo "LOUPE-KERNEL $(uname -r)"

# Waits (at most a minute) until the agent writing LOG says it is ready or exits.
wait_ready() {
    for _ in $(seq 120); do
        grep -q "ready:" "$1" && return
        kill -0 "$2" 2>/dev/null || return
        sleep 0.5
    done
}

# The README's first command, as a new user would run it: curl -> Python's http.server, the
# agent with its defaults printing traces on the terminal.
smoke() {
    mkdir -p /tmp/www && echo hello > /tmp/www/index.html
    python3 -m http.server 18080 --bind 127.0.0.1 --directory /tmp/www >/dev/null 2>&1 &
    local server=$!
    "$LOUPE_BIN" >/tmp/spans.txt 2>/tmp/agent.log &
    local agent=$!
    wait_ready /tmp/agent.log "$agent"
    grep -o "capture: .*" /tmp/agent.log | head -1 | sed 's/^/LOUPE-PATH /'
    grep -o "degraded: .*" /tmp/agent.log | cut -c1-400 | sed 's/^/LOUPE-DEGRADED /'
    curl -s -o /dev/null http://127.0.0.1:18080/
    curl -s -o /dev/null http://127.0.0.1:18080/missing
    sleep 2
    kill -INT "$agent" 2>/dev/null
    wait "$agent"
    kill "$server"
    if grep -q "SERVER GET /missing" /tmp/spans.txt && grep -q "CLIENT GET /missing" /tmp/spans.txt &&
        grep -q "SERVER GET /" /tmp/spans.txt; then
        echo "LOUPE-TEST smoke curl_to_python_http_server_spans_on_the_terminal ok"
    else
        echo "LOUPE-TEST smoke curl_to_python_http_server_spans_on_the_terminal FAILED"
        echo "--- spans"; cat /tmp/spans.txt; echo "--- agent log"; cut -c1-300 /tmp/agent.log | head -60
    fi
}

# What the kernel cannot carry must be a `degraded:` line, never a failure to start: the agent
# with every optional feature asked for (--tcp-context needs a 6.6 raw tracepoint).
optional() {
    "$LOUPE_BIN" capture --tcp-context >/dev/null 2>/tmp/optional.log &
    local agent=$!
    wait_ready /tmp/optional.log "$agent"
    if grep -q "ready:" /tmp/optional.log; then
        echo "LOUPE-TEST smoke starts_with_every_optional_feature_asked_for ok"
    else
        echo "LOUPE-TEST smoke starts_with_every_optional_feature_asked_for FAILED"
        cut -c1-300 /tmp/optional.log | head -20
    fi
    grep -o "degraded: .*" /tmp/optional.log | grep -v bpf_task_pt_regs | cut -c1-400 |
        sed 's/^/LOUPE-DEGRADED /'
    kill -INT "$agent" 2>/dev/null
    wait "$agent"
}

# A cargo test binary; each result as a LOUPE-TEST line.
suite() {
    local name=$1
    shift
    "$@" --test-threads=1 2>&1 | tee "/tmp/$name.out" |
        sed -n "s/^test \([a-z0-9_]*\) \.\.\. \(ok\|FAILED\)$/LOUPE-TEST $name \1 \2/p"
    if grep -q FAILED "/tmp/$name.out"; then
        echo "--- $name output"; grep -v "^test .* ok$" "/tmp/$name.out" | cut -c1-300 | head -80
    fi
}

cd /tmp
smoke
optional
export LOUPE_BIN
LOUPE_TEST_SLOWDOWN=$(sed -n "s/.*loupe\.slowdown=\([0-9]*\).*/\1/p" /proc/cmdline)
export LOUPE_TEST_SLOWDOWN
# The byte-exact capture of every syscall family (read/write, readv/writev, send/recv, sendto/
# recvfrom, sendmsg/recvmsg, sendmmsg/recvmmsg), on the path the agent picks itself and forced
# onto the syscall path; UDP, unix sockets, pipes and files ignored; a connection opened before
# the agent; where the sock tracepoints are (6.12 here), a read after a reset and a process's
# later connections (the two tests say so and stop on the syscall path).
suite capture "$CAPTURE_TEST" captures_every_syscall_family the_syscall_path \
    a_connection_opened_before_the_agent udp_and_unix_sockets_are_ignored \
    bytes_read_after_a_reset only_a_processs_first_connection
# nginx sendfile() responses on a keep-alive connection, and spans on the terminal: on the path
# the agent picks itself where the kernel has no sock tracepoints, forced where it has.
if [ -e /sys/kernel/tracing/events/sock/sock_send_length ]; then
    path=syscalls
else
    path=auto
fi
LOUPE_TEST_CAPTURE_PATH=$path suite syscall_path "$SYSCALL_PATH_TEST"
echo "LOUPE-DONE"
