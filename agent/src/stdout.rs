//! Standard output for the views (`loupe`'s trees, `loupe capture`): when its reader goes away
//! (`loupe | head`), the agent stops the way SIGTERM stops it, draining and flushing the other
//! outputs, instead of running on with nothing to print to. Rust ignores SIGPIPE, so the broken
//! pipe arrives as an EPIPE write error, seen here.

use std::{
    io::{self, Write},
    sync::atomic::{AtomicBool, Ordering},
};

static STOPPING: AtomicBool = AtomicBool::new(false);

pub struct Stdout(io::Stdout);

impl Stdout {
    pub fn new() -> Self {
        Self(io::stdout())
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

fn check<T>(r: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &r
        && e.kind() == io::ErrorKind::BrokenPipe
        && !STOPPING.swap(true, Ordering::Relaxed)
    {
        tracing::info!("standard output was closed: stopping");
        // SAFETY: signalling our own process; SIGTERM's handler runs the normal shutdown.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
    r
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if STOPPING.load(Ordering::Relaxed) {
            // Nobody reads: pretend, so the views do not spin on errors while the agent stops.
            return Ok(buf.len());
        }
        check(self.0.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        if STOPPING.load(Ordering::Relaxed) {
            return Ok(());
        }
        check(self.0.flush())
    }
}
