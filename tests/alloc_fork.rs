//! A process that forks while memtel's allocator holds per-thread caches of several components
//! has children that allocate, free, start threads and exit cleanly, on every way out: `_exit`,
//! `exit` (atexit handlers), and the end of the forking thread when it is not the main one (its
//! thread-exit cleanup). After a fork, the child's copy of the forking thread still owns every
//! cache it made before, and jemalloc resets only its automatic ones: what the child later tears
//! down must be what jemalloc still knows about. Over jemalloc built with its own assertions
//! (`--features tikv-jemalloc-sys/debug`), a mismatch aborts the child, which is what the parent
//! checks: each child exited with status 0, not by a signal.
#![cfg(feature = "jemalloc")]

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use memtel::alloc::TrackingAllocator;
use memtel::component;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// A fork copies one thread: nothing else of this binary may allocate meanwhile.
static SERIAL: Mutex<()> = Mutex::new(());

const COMPONENTS: [&str; 4] = ["fork_a", "fork_b", "fork_c", "fork_d"];

/// Small and large allocations in each component, all freed.
fn allocate_and_free(names: &[&str]) {
    for name in names {
        let held: Vec<Vec<u8>> = component(name).in_scope(|| {
            (0..2_000)
                .map(|i| vec![i as u8; [8, 24, 100, 512, 3000, 14_336, 40_000][i % 7]])
                .collect()
        });
        drop(held);
    }
}

/// [`allocate_and_free`], and whether each component's live bytes grew meanwhile and came back
/// to where they were. Only where no other thread uses these components.
fn churn(names: &[&str]) -> bool {
    names.iter().all(|name| {
        let scope = component(name);
        let before = scope.live_bytes();
        let held: Vec<u8> = scope.in_scope(|| vec![1; 3000]);
        let grew = scope.live_bytes() == before + 3000;
        drop(held);
        allocate_and_free(&[name]);
        grew && scope.live_bytes() == before
    })
}

/// Threads that allocated in every component and stay parked across the fork, with their
/// per-thread caches full; released when the returned barrier is waited on.
fn parked_threads() -> (Vec<std::thread::JoinHandle<()>>, Arc<Barrier>) {
    const THREADS: usize = 3;
    let (ready, release) = (Arc::new(Barrier::new(THREADS + 1)), Arc::new(Barrier::new(THREADS + 1)));
    let threads = (0..THREADS)
        .map(|_| {
            let (ready, release) = (ready.clone(), release.clone());
            std::thread::spawn(move || {
                // Together in the same components: their live bytes are not theirs to check.
                allocate_and_free(&COMPONENTS);
                ready.wait();
                release.wait();
            })
        })
        .collect();
    ready.wait();
    (threads, release)
}

/// How a forked child ends.
#[derive(Clone, Copy, Debug)]
enum End {
    /// `libc::_exit(0)`: no atexit handlers, no thread-exit cleanup of the forking thread.
    UnderscoreExit,
    /// `std::process::exit(0)`: atexit handlers run.
    Exit,
    /// The forking thread (not the main thread) returns; as the child's only thread, its end
    /// runs its thread-exit cleanup and then ends the process with status 0.
    ThreadReturn,
}

/// The child's work: allocate and free in the parent's components and a new one, and in a thread
/// of its own that starts and ends. Never returns into the test harness unless `end` says so.
fn in_child(end: End) {
    let ok = std::panic::catch_unwind(|| {
        churn(&COMPONENTS)
            && churn(&["fork_child"])
            && std::thread::spawn(|| churn(&COMPONENTS) && churn(&["fork_child_thread"]))
                .join()
                .unwrap_or(false)
            && churn(&COMPONENTS)
    })
    .unwrap_or(false);
    match (ok, end) {
        // SAFETY: ends the process at once.
        (false, _) => unsafe { libc::_exit(2) },
        // SAFETY: as above.
        (true, End::UnderscoreExit) => unsafe { libc::_exit(0) },
        (true, End::Exit) => std::process::exit(0),
        (true, End::ThreadReturn) => {}
    }
}

/// Forks on the calling thread (which has allocated in every component); the child runs
/// [`in_child`]. Returns the child's pid in the parent.
fn fork_child(end: End) -> Option<libc::pid_t> {
    assert!(churn(&COMPONENTS));
    // SAFETY: the child only allocates (jemalloc and memtel are fork-aware) and exits; no lock
    // of this binary is held by another thread at the fork (SERIAL, parked threads).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        in_child(end);
        return None;
    }
    Some(pid)
}

/// Waits for `pid` (up to 60 s, then kills it) and asserts it exited with status 0.
fn assert_exited_cleanly(pid: libc::pid_t, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(rc >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if rc == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what}: the child hung after the fork");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        libc::WIFEXITED(status),
        "{what}: the child was killed by signal {} (6 = SIGABRT: a jemalloc assertion, see its stderr)",
        libc::WTERMSIG(status)
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "{what}: exit status (2: live bytes did not add up)"
    );
}

fn fork_from_this_thread(end: End) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (threads, release) = parked_threads();
    let pid = fork_child(end).expect("the child does not return");
    assert_exited_cleanly(pid, &format!("{end:?}"));
    release.wait();
    for thread in threads {
        thread.join().expect("parked thread");
    }
    assert!(churn(&COMPONENTS), "the parent after its child");
}

#[test]
fn a_forked_child_that_ends_with_underscore_exit_exits_cleanly() {
    fork_from_this_thread(End::UnderscoreExit);
}

#[test]
fn a_forked_child_that_ends_with_exit_exits_cleanly() {
    fork_from_this_thread(End::Exit);
}

#[test]
fn a_child_forked_from_a_spawned_thread_ends_with_that_thread_cleanly() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (threads, release) = parked_threads();
    // In the child, the copy of the forking thread returns from this closure and ends the process
    // there: only the parent gets past the join.
    let pid = std::thread::spawn(|| fork_child(End::ThreadReturn))
        .join()
        .expect("the forking thread")
        .expect("the parent has the child's pid");
    assert_exited_cleanly(pid, "ThreadReturn");
    release.wait();
    for thread in threads {
        thread.join().expect("parked thread");
    }
    assert!(churn(&COMPONENTS), "the parent after its child");
}
