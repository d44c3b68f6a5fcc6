//! An independent count of the bytes the program asks the global allocator for,
//! recorded per thread while a region is marked: the ground truth that the tracking
//! allocator's per-component counts are checked against.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
    static FREED: Cell<u64> = const { Cell::new(0) };
}

/// Wraps the allocator under test and counts requested sizes on recording threads.
pub struct Truth<A>(pub A);

fn count(allocated: u64, freed: u64) {
    let _ = RECORDING.try_with(|r| {
        if r.get() {
            let _ = ALLOCATED.try_with(|a| a.set(a.get() + allocated));
            let _ = FREED.try_with(|f| f.set(f.get() + freed));
        }
    });
}

unsafe impl<A: GlobalAlloc> GlobalAlloc for Truth<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc(layout);
        if !p.is_null() {
            count(layout.size() as u64, 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = self.0.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as u64, 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, layout.size() as u64);
        self.0.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = self.0.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as u64, layout.size() as u64);
        }
        p
    }
}

/// Bytes (allocated, freed) requested on this thread while `f` ran.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, u64, u64) {
    let (a0, f0) = (ALLOCATED.with(Cell::get), FREED.with(Cell::get));
    let was = RECORDING.with(|r| r.replace(true));
    let out = f();
    RECORDING.with(|r| r.set(was));
    (out, ALLOCATED.with(Cell::get) - a0, FREED.with(Cell::get) - f0)
}

/// A shared tally of what a future's polls allocated and freed, on whatever threads.
#[derive(Default, Clone)]
pub struct Tally {
    pub allocated: Arc<AtomicU64>,
    pub freed: Arc<AtomicU64>,
    pub polls: Arc<AtomicI64>,
}

impl Tally {
    pub fn net(&self) -> i64 {
        self.allocated.load(Ordering::SeqCst) as i64 - self.freed.load(Ordering::SeqCst) as i64
    }
}

/// Records every poll of the inner future into a [`Tally`].
pub struct Recorded<F> {
    pub inner: Pin<Box<F>>,
    pub tally: Tally,
}

impl<F: Future> Future for Recorded<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let (out, a, f) = record(|| this.inner.as_mut().poll(cx));
        this.tally.allocated.fetch_add(a, Ordering::SeqCst);
        this.tally.freed.fetch_add(f, Ordering::SeqCst);
        this.tally.polls.fetch_add(1, Ordering::SeqCst);
        out
    }
}
