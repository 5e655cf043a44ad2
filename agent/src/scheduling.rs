//! The agent's CPU priority when it adapts (`--cpu-scheduling adaptive`).
//!
//! At SCHED_IDLE a thread runs only on CPU time nothing else wants: a traced service's woken thread
//! preempts the agent at once instead of waiting up to a scheduler slice behind it, which is most
//! of what the agent adds to a service's tail latency. But on a saturated node an idle agent gets
//! almost no CPU, falls behind and drops. So the threads that parse and export run idle while the
//! agent keeps up, and normal while a backlog builds: the ring reader, before each drain (every 10
//! ms at most), looks at how many events of the earlier drains still wait for the pipeline. `HIGH`
//! that lasts `BACKLOG_NS` (or `HIGH_AT_ONCE` at all) raises the pipeline's threads; they go back
//! to idle after `CALM_NS` without more than `LOW` waiting. The export queue after the pipeline
//! counts too: an exporter at idle priority behind a saturated node fills it while the events keep
//! flowing, so a span offered to a queue three quarters full raises the threads as well
//! (`pressure`).
//!
//! The ring reader adapts with them (`join_batch`), to SCHED_BATCH rather than normal when raised.
//! Its lateness is the one that loses data in the kernel, so a watchdog thread at SCHED_BATCH
//! (reader.rs) looks at the ring's fill level and raises everything (`pressure`) when half the ring
//! waits: an idle reader on a saturated node gets almost no CPU, and the watchdog is what is never
//! starved. A batch thread's wakeup does not preempt the thread running on its core; it waits for
//! that thread's slice (a millisecond or two, against the ring's ~70 ms of room at saturation). The
//! reader was SCHED_BATCH throughout before: nginx at half its saturation with every process
//! traced, oha's p99 0.27 ms without the agent, 0.55-0.61 with a batch reader, 0.41-0.46 with an
//! idle one (three alternating rounds); each drain at batch priority kept a woken nginx or oha
//! waiting behind it. The TLS watcher stays at SCHED_BATCH (`batch`). Leaving SCHED_IDLE needs
//! CAP_SYS_NICE (or an RLIMIT_NICE that allows nice 0): without it the agent says so at start and
//! runs normal throughout, so a backlog can never be stuck at idle priority.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

/// Events still waiting for the pipeline that raise its threads to normal priority if they
/// still wait `BACKLOG_NS` later: 1/16 of the channel (65 536), ~10-40 ms of a saturated 2-core
/// node's events. A quarter of the channel held 10-15 MiB more at saturation (the backlog, and
/// the spans it became) for no throughput measured.
const HIGH: usize = 4_096;
/// How long a backlog above `HIGH` may last at idle priority: an idle pipeline runs in the gaps
/// the services leave and catches up in bursts. nginx at half its saturation with every process
/// traced (264k events/s, the host 66% busy) left 4-8k events waiting a few times a minute for
/// a few milliseconds, and each raise at once was a second at normal priority (`CALM_NS`), which
/// the services' tail latency showed. A saturated node reaches `HIGH_AT_ONCE` sooner.
const BACKLOG_NS: u64 = 200_000_000;
/// A backlog that raises the threads at once: a quarter of the channel, ~40 ms of a saturated
/// node's events with nothing handled.
const HIGH_AT_ONCE: usize = 16_384;
/// At or below this many waiting events the pipeline counts as keeping up.
const LOW: usize = 1_024;
/// Keeping up this long, at normal priority, before going back to idle: a saturated node's
/// backlog comes back within milliseconds of idle priority, so the agent would flap.
const CALM_NS: u64 = 1_000_000_000;

pub static ADAPTIVE: Adaptive = Adaptive::new();

pub struct Adaptive {
    enabled: AtomicBool,
    /// The pipeline's threads are at SCHED_IDLE now.
    idle: AtomicBool,
    /// A queue after the pipeline filled since the reader last looked (restarts the calm).
    pressed: AtomicBool,
    /// Since when (monotonic ns; 0: not) more than `HIGH` events have waited, while idle.
    backlog_since_ns: AtomicU64,
    /// Switches to normal priority (a backlog built) and back to idle.
    pub raised: AtomicU64,
    pub lowered: AtomicU64,
    /// sched_setscheduler calls that failed (the thread's priority stays as it was).
    pub failed: AtomicU64,
    state: Mutex<State>,
    /// Why adaptation could not be turned on, until someone reports it.
    refusal: Mutex<Option<String>>,
}

struct State {
    /// Threads whose priority adapts, each with its policy while raised; each removes itself
    /// before it exits, so a tid reused by another process is never touched.
    threads: Vec<(libc::pid_t, libc::c_int)>,
    calm_since_ns: Option<u64>,
}

fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall with a valid parameter; `tid` is a live thread of this process.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

impl Adaptive {
    const fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            pressed: AtomicBool::new(false),
            backlog_since_ns: AtomicU64::new(0),
            raised: AtomicU64::new(0),
            lowered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            state: Mutex::new(State {
                threads: Vec::new(),
                calm_since_ns: None,
            }),
            refusal: Mutex::new(None),
        }
    }

    /// Turns adaptation on if this process may leave SCHED_IDLE again. Tried on a thread of its
    /// own (to idle and back): where leaving is refused, only that thread was ever idle, and it
    /// is gone. Otherwise keeps why not for `refusal`: it is said once the agent knows it can
    /// run at all (a missing capability must stay the one line an agent that cannot start
    /// prints).
    pub fn enable(&self) {
        if let Err(why) = self.try_enable() {
            *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }

    /// Why `enable` left adaptation off, once.
    pub fn refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn try_enable(&self) -> Result<(), String> {
        let probe = std::thread::spawn(|| {
            set_policy(0, libc::SCHED_IDLE)
                .map_err(|e| format!("cannot run at SCHED_IDLE ({e})"))?;
            set_policy(0, libc::SCHED_OTHER).map_err(|e| {
                format!(
                    "cannot leave SCHED_IDLE once there ({e}): give the agent CAP_SYS_NICE (in a DaemonSet: add SYS_NICE to its capabilities), or pass --cpu-scheduling normal to run so without this warning"
                )
            })
        });
        probe
            .join()
            .map_err(|_| "the scheduling probe panicked".to_string())??;
        self.enabled.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// The calling thread must keep up but need not run the moment it wakes (the TLS watcher,
    /// the ring's watchdog): SCHED_BATCH while adapting. At normal priority a wakeup could take
    /// a core from a service: with the ring reader at normal and at batch priority, nginx
    /// selected at a fixed 36k req/s, 22 alternating pairs (11 in each order), oha's p99: lower
    /// in 15 at batch, mean 702 -> 656 µs (−6.5%, on a host whose p99 moves ±30% between runs).
    pub fn batch(&self) {
        if !self.enabled() {
            return;
        }
        if set_policy(0, libc::SCHED_BATCH).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The calling thread parses or exports: its priority adapts from now until `leave`.
    pub fn join(&self) {
        self.join_raised_at(libc::SCHED_OTHER);
    }

    /// The ring reader: idle with the others, SCHED_BATCH when they are raised (see `batch`).
    pub fn join_batch(&self) {
        self.join_raised_at(libc::SCHED_BATCH);
    }

    fn join_raised_at(&self, raised: libc::c_int) {
        if !self.enabled() {
            return;
        }
        let tid = current_tid();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let policy = if self.idle.load(Ordering::Relaxed) {
            libc::SCHED_IDLE
        } else {
            raised
        };
        // A thread joins at the policy it inherited: only a change is a call.
        // SAFETY: plain syscall on the calling thread.
        if unsafe { libc::sched_getscheduler(0) } != policy && set_policy(tid, policy).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        state.threads.push((tid, raised));
    }

    /// The calling thread is about to exit.
    pub fn leave(&self) {
        if !self.enabled() {
            return;
        }
        let tid = current_tid();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.threads.retain(|&(t, _)| t != tid);
    }

    /// Before a drain of the ring: `waiting` events of earlier drains are still queued.
    pub fn observe(&self, waiting: usize, now_ns: u64) {
        if !self.enabled() {
            return;
        }
        let idle = self.idle.load(Ordering::Relaxed);
        if idle {
            if waiting < HIGH {
                self.backlog_since_ns.store(0, Ordering::Relaxed);
                return;
            }
            let since = match self.backlog_since_ns.load(Ordering::Relaxed) {
                0 => {
                    self.backlog_since_ns.store(now_ns, Ordering::Relaxed);
                    now_ns
                }
                since => since,
            };
            if waiting >= HIGH_AT_ONCE || now_ns.saturating_sub(since) >= BACKLOG_NS {
                self.switch(false);
            }
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pressed = self.pressed.swap(false, Ordering::Relaxed);
        if waiting > LOW || pressed {
            state.calm_since_ns = None;
            return;
        }
        let since = *state.calm_since_ns.get_or_insert(now_ns);
        drop(state);
        if now_ns.saturating_sub(since) >= CALM_NS {
            self.switch(true);
        }
    }

    /// A queue after the pipeline (spans waiting for export) is nearly full: raise the threads
    /// now if idle, and keep them raised for another calm second. Lock-free unless it switches.
    pub fn pressure(&self) {
        if !self.enabled() {
            return;
        }
        if self.idle.load(Ordering::Relaxed) {
            self.switch(false);
        } else {
            self.pressed.store(true, Ordering::Relaxed);
        }
    }

    fn switch(&self, to_idle: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for &(tid, raised) in &state.threads {
            let policy = if to_idle { libc::SCHED_IDLE } else { raised };
            if set_policy(tid, policy).is_err() {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.calm_since_ns = None;
        self.backlog_since_ns.store(0, Ordering::Relaxed);
        self.idle.store(to_idle, Ordering::Relaxed);
        let counter = if to_idle { &self.lowered } else { &self.raised };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn idle_after_a_calm_second_normal_as_soon_as_events_wait() {
        // No thread joined: the switches are decided without touching any thread.
        let a = Adaptive::new();
        a.observe(0, 0);
        assert!(!a.is_idle(), "not enabled: nothing changes");
        a.enabled.store(true, Ordering::Relaxed);
        a.observe(0, 0);
        a.observe(LOW, 900 * MS);
        assert!(
            !a.is_idle(),
            "starts at normal priority until a second of keeping up"
        );
        a.observe(LOW + 1, 950 * MS);
        a.observe(0, 1_500 * MS);
        assert!(!a.is_idle(), "a backlog restarts the calm second");
        a.observe(0, 2_600 * MS);
        assert!(a.is_idle());
        assert_eq!(a.lowered.load(Ordering::Relaxed), 1);
        a.observe(HIGH - 1, 2_610 * MS);
        assert!(
            a.is_idle(),
            "some events waiting are normal at idle priority"
        );
        a.observe(HIGH, 2_620 * MS);
        a.observe(HIGH * 3, 2_700 * MS);
        assert!(a.is_idle(), "a backlog may last a while at idle priority");
        a.observe(HIGH - 1, 2_750 * MS);
        a.observe(HIGH, 2_800 * MS);
        a.observe(HIGH, 2_999 * MS);
        assert!(a.is_idle(), "a backlog that went below HIGH starts again");
        a.observe(HIGH, 3_000 * MS);
        assert!(!a.is_idle(), "a backlog that lasts raises the threads");
        assert_eq!(a.raised.load(Ordering::Relaxed), 1);
        a.observe(0, 3_010 * MS);
        a.observe(0, 4_009 * MS);
        assert!(!a.is_idle(), "the calm second counts from after the raise");
        a.observe(0, 4_010 * MS);
        assert!(a.is_idle());
        a.observe(HIGH, 4_020 * MS);
        a.observe(HIGH_AT_ONCE, 4_021 * MS);
        assert!(!a.is_idle(), "a large backlog raises the threads at once");
        a.observe(0, 4_030 * MS);
        a.observe(0, 5_030 * MS);
        a.observe(HIGH, 5_100 * MS);
        a.observe(HIGH, 5_299 * MS);
        assert!(a.is_idle(), "each idle spell's backlog is timed afresh");
    }

    #[test]
    fn threads_that_must_keep_up_run_batch_only_while_adapting() {
        // SCHED_BATCH from normal needs no privilege; each case runs on a thread of its own.
        let policy_after_batch = |enabled: bool| {
            std::thread::spawn(move || {
                let a = Adaptive::new();
                a.enabled.store(enabled, Ordering::Relaxed);
                a.batch();
                // SAFETY: plain syscall on the calling thread.
                (
                    unsafe { libc::sched_getscheduler(0) },
                    a.failed.load(Ordering::Relaxed),
                )
            })
            .join()
            .unwrap()
        };
        assert_eq!(policy_after_batch(false), (libc::SCHED_OTHER, 0));
        assert_eq!(policy_after_batch(true), (libc::SCHED_BATCH, 0));
    }

    #[test]
    fn the_ring_reader_runs_batch_while_raised_and_idle_with_the_others() {
        // Normal -> batch -> idle needs no privilege; the thread reports its own policy.
        let a = std::sync::Arc::new(Adaptive::new());
        a.enabled.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let member = a.clone();
        let thread = std::thread::spawn(move || {
            member.join_batch();
            // SAFETY: plain syscall on the calling thread.
            tx.send(unsafe { libc::sched_getscheduler(0) }).unwrap();
            wait.recv().unwrap();
            // SAFETY: as above.
            tx.send(unsafe { libc::sched_getscheduler(0) }).unwrap();
            member.leave();
        });
        assert_eq!(rx.recv().unwrap(), libc::SCHED_BATCH, "raised: batch");
        a.observe(0, 0);
        a.observe(0, 1_000 * MS);
        assert!(a.is_idle());
        go.send(()).unwrap();
        assert_eq!(rx.recv().unwrap(), libc::SCHED_IDLE, "calm: idle");
        thread.join().unwrap();
        assert_eq!(a.failed.load(Ordering::Relaxed), 0);
        assert!(a.state.lock().unwrap().threads.is_empty(), "it left");
    }

    #[test]
    fn a_filling_export_queue_raises_and_holds_normal_priority() {
        let a = Adaptive::new();
        a.pressure();
        assert_eq!(a.raised.load(Ordering::Relaxed), 0, "not enabled");
        a.enabled.store(true, Ordering::Relaxed);
        a.observe(0, 0);
        a.observe(0, 1_000 * MS);
        assert!(a.is_idle());
        a.pressure();
        assert!(!a.is_idle(), "raised at once, no events waiting");
        a.observe(0, 1_010 * MS);
        a.pressure();
        a.observe(0, 2_010 * MS);
        assert!(!a.is_idle(), "pressure restarts the calm second");
        a.observe(0, 2_020 * MS);
        a.observe(0, 3_019 * MS);
        assert!(!a.is_idle());
        a.observe(0, 3_020 * MS);
        assert!(a.is_idle());
    }
}
