//! Component handles and the scopes that make them current.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::counters::{self, STATE};
use super::registry;

/// A named component that allocations can be attributed to.
///
/// Cheap to copy: a slot number. Obtained with [`component`](crate::component); at
/// most [`MAX_COMPONENTS`](crate::MAX_COMPONENTS) names are interned, later ones (and
/// invalid names) share the `other` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Component {
    slot: u8,
}

/// The component named `name`, interned on first use.
///
/// Allocations made while it is current (see [`Component::enter`],
/// [`Component::in_scope`], [`InComponent::in_component`]) are attributed to it when
/// the [`TrackingAllocator`](crate::alloc::TrackingAllocator) is the global allocator.
///
/// ```
/// let cache = memtel::component("cache");
/// assert_eq!(cache.name(), "cache");
/// assert_eq!(memtel::component("cache"), cache);
/// assert_eq!(memtel::component("not a valid name").name(), "other");
/// ```
pub fn component(name: &str) -> Component {
    Component {
        slot: registry::intern(name),
    }
}

impl Component {
    /// The component of allocations made outside every scope.
    pub const OTHER: Component = Component { slot: 0 };

    /// Its name (`other` for the overflow slot).
    pub fn name(self) -> &'static str {
        registry::name(self.slot)
    }

    /// Makes this component current on this thread until the guard drops; the
    /// previous one is restored then. Guards nest.
    ///
    /// ```
    /// let api = memtel::component("api");
    /// let _in_api = api.enter();
    /// // allocations here belong to "api"
    /// ```
    pub fn enter(self) -> ComponentGuard {
        ComponentGuard {
            previous: swap_current(self.slot),
            _not_send: PhantomData,
        }
    }

    /// Runs `f` with this component current.
    pub fn in_scope<T>(self, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter();
        f()
    }

    /// Live heap bytes attributed to this component (allocated − freed), exact;
    /// 0 unless the tracking allocator is installed.
    pub fn live_bytes(self) -> u64 {
        let (allocated, freed) = counters::totals(usize::from(self.slot));
        allocated.saturating_sub(freed)
    }

    /// Cumulative bytes ever allocated in this component.
    pub fn allocated_bytes(self) -> u64 {
        counters::totals(usize::from(self.slot)).0
    }
}

/// The component current on this thread.
pub fn current_component() -> Component {
    Component {
        slot: STATE.try_with(|s| s.current.get()).unwrap_or(0),
    }
}

#[inline]
pub(crate) fn swap_current(slot: u8) -> u8 {
    STATE.try_with(|s| s.current.replace(slot)).unwrap_or(0)
}

/// Restores the previous component when dropped. Not `Send`: the scope is per thread.
#[derive(Debug)]
#[must_use = "the component is current only while the guard lives"]
pub struct ComponentGuard {
    previous: u8,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ComponentGuard {
    fn drop(&mut self) {
        swap_current(self.previous);
    }
}

/// Attributes a future's allocations to a component across every poll, on whichever
/// thread polls it.
///
/// ```
/// use memtel::InComponent;
/// # async fn fetch() -> Vec<u8> { vec![0; 1024] }
/// # async fn run() {
/// let body = fetch().in_component(memtel::component("api")).await;
/// # }
/// ```
pub trait InComponent: Future + Sized {
    /// Wraps the future so `component` is current while it is polled.
    fn in_component(self, component: Component) -> ComponentFuture<Self> {
        ComponentFuture { inner: self, component }
    }
}

impl<F: Future> InComponent for F {}

pin_project_lite::pin_project! {
    /// A future whose polls run inside a component's scope; see [`InComponent`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct ComponentFuture<F> {
        #[pin]
        inner: F,
        component: Component,
    }
}

impl<F: Future> Future for ComponentFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = this.component.enter();
        this.inner.poll(cx)
    }
}
