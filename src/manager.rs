//! [`MemoryManager`]: acts on pressure before the OOM killer does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::snapshot::Pressure;
use crate::MemoryMonitor;

type HookFn = dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

struct Hook {
    level: Pressure,
    name: Arc<str>,
    run: Arc<HookFn>,
}

/// Samples a [`MemoryMonitor`] on a schedule and acts on what it sees:
///
/// - **cleanup**: on entering `warning` (or `critical`), runs the hooks registered for
///   that level ([`on_pressure`](Self::on_pressure)) — once per episode (until the
///   level is back to `normal`) and not again within the cooldown. Hooks run
///   concurrently as Tokio tasks, each bounded by a timeout, so one that panics or
///   hangs stops neither the manager nor the other hooks.
/// - **gc**: while RSS exceeds the gc trigger, asks jemalloc to return its dirty pages
///   to the OS (`arena.<all>.purge`), at most once per cooldown.
///
/// What each action freed is measured before and after (heap bytes for a cleanup,
/// jemalloc resident bytes for a purge) and shows in every snapshot's
/// [`actions`](crate::Snapshot::actions), the JSON `stats` and the
/// `memtel.cleanup.*` / `memtel.gc.*` metrics.
///
/// ```no_run
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// use std::sync::{Arc, Mutex};
/// use memtel::{MemoryManager, MemoryMonitor, Pressure};
///
/// # async fn run() {
/// let cache: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
/// let monitor = MemoryMonitor::new();
/// let held = cache.clone();
/// MemoryManager::new(monitor)
///     .gc_trigger_bytes(1 << 30)
///     .on_pressure(Pressure::Warning, "shrink-cache", move || {
///         let held = held.clone();
///         async move { held.lock().unwrap().clear() }
///     })
///     .spawn();
/// # }
/// ```
pub struct MemoryManager {
    monitor: MemoryMonitor,
    hooks: Vec<Hook>,
    check_interval: Duration,
    cooldown: Duration,
    hook_timeout: Duration,
    gc_trigger_bytes: Option<u64>,
    /// Levels whose hooks already ran in the current episode.
    fired: [bool; 2],
    last_cleanup: Option<Instant>,
    last_gc: Option<Instant>,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field(
                "hooks",
                &self.hooks.iter().map(|h| (h.level, h.name.clone())).collect::<Vec<_>>(),
            )
            .field("check_interval", &self.check_interval)
            .field("cooldown", &self.cooldown)
            .field("hook_timeout", &self.hook_timeout)
            .field("gc_trigger_bytes", &self.gc_trigger_bytes)
            .finish_non_exhaustive()
    }
}

/// What one check decided to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Plan {
    /// Run the cleanup hooks of these levels.
    pub cleanup: Option<Pressure>,
    /// Purge the allocator.
    pub gc: bool,
}

impl MemoryManager {
    /// A manager of `monitor`'s process with no hooks and no gc trigger.
    pub fn new(monitor: MemoryMonitor) -> Self {
        Self {
            monitor,
            hooks: Vec::new(),
            check_interval: Duration::from_secs(1),
            cooldown: Duration::from_secs(30),
            hook_timeout: Duration::from_secs(10),
            gc_trigger_bytes: None,
            fired: [false; 2],
            last_cleanup: None,
            last_gc: None,
        }
    }

    /// How often to sample. Defaults to 1 s.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The least time between two cleanups, and between two purges. Defaults to 30 s.
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// How long a hook may run before it is abandoned. Defaults to 10 s.
    pub fn hook_timeout(mut self, timeout: Duration) -> Self {
        self.hook_timeout = timeout;
        self
    }

    /// Purge the allocator while RSS exceeds `bytes`. Off by default.
    pub fn gc_trigger_bytes(mut self, bytes: u64) -> Self {
        self.gc_trigger_bytes = Some(bytes);
        self
    }

    /// Runs `hook` on entering `level` (`Warning` hooks also run when the process
    /// jumps straight to `Critical`). `Normal` hooks never run.
    pub fn on_pressure<F, Fut>(mut self, level: Pressure, name: &str, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hooks.push(Hook {
            level,
            name: Arc::from(name),
            run: Arc::new(move || Box::pin(hook())),
        });
        self
    }

    /// Spawns [`run`](Self::run) on the current Tokio runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    /// Checks every `check_interval` and acts, forever.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let plan = self.check();
            self.act(plan).await;
        }
    }

    /// One sample: decides what to do, without doing it. Cheap: one snapshot and a
    /// few comparisons.
    pub fn check(&mut self) -> Plan {
        let snap = self.monitor.snapshot();
        let now = Instant::now();
        let cooled = |last: Option<Instant>| last.is_none_or(|t| now.duration_since(t) >= self.cooldown);
        let mut plan = Plan::default();
        if snap.pressure == Pressure::Normal {
            self.fired = [false; 2];
        } else if cooled(self.last_cleanup) {
            let due = [Pressure::Warning, Pressure::Critical]
                .into_iter()
                .enumerate()
                .filter(|(i, level)| snap.pressure >= *level && !self.fired[*i])
                .map(|(_, level)| level)
                .max();
            if let Some(level) = due {
                plan.cleanup = Some(level);
            }
        }
        if let (Some(trigger), Some(rss)) = (self.gc_trigger_bytes, snap.rss_bytes) {
            plan.gc = rss > trigger && cooled(self.last_gc);
        }
        plan
    }

    /// Carries out a plan: the cleanup hooks, then the purge.
    pub async fn act(&mut self, plan: Plan) {
        if let Some(level) = plan.cleanup {
            self.cleanup(level).await;
        }
        if plan.gc {
            self.gc();
        }
    }

    async fn cleanup(&mut self, level: Pressure) {
        // Every hook of this level and below that has not run in this episode.
        let mut levels = Vec::with_capacity(2);
        for (i, l) in [Pressure::Warning, Pressure::Critical].into_iter().enumerate() {
            if l <= level && !self.fired[i] {
                self.fired[i] = true;
                levels.push(l);
            }
        }
        let hooks: Vec<(Arc<str>, Arc<HookFn>)> = self
            .hooks
            .iter()
            .filter(|h| levels.contains(&h.level))
            .map(|h| (h.name.clone(), h.run.clone()))
            .collect();
        self.last_cleanup = Some(Instant::now());
        let before = self.monitor.heap_bytes_now();
        let tasks: Vec<_> = hooks
            .into_iter()
            .map(|(name, run)| (name, tokio::spawn(async move { run().await })))
            .collect();
        let deadline = tokio::time::Instant::now() + self.hook_timeout;
        let mut failed = 0usize;
        let count = tasks.len();
        for (name, task) in tasks {
            let abort = task.abort_handle();
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    tracing::error!(target: "memtel::manager", hook = %name, "cleanup hook failed: {e}");
                }
                Err(_) => {
                    failed += 1;
                    abort.abort();
                    tracing::error!(target: "memtel::manager", hook = %name, timeout = ?self.hook_timeout, "cleanup hook timed out");
                }
            }
        }
        let after = self.monitor.heap_bytes_now();
        let freed = before.zip(after).map_or(0, |(b, a)| b.saturating_sub(a));
        self.monitor.inner_actions().record_cleanup(freed);
        tracing::info!(target: "memtel::manager", level = %level, hooks = count, failed, freed_bytes = freed, "cleanup ran");
    }

    fn gc(&mut self) {
        self.last_gc = Some(Instant::now());
        match self.monitor.purge() {
            Some((before, after)) => {
                let freed = before.saturating_sub(after);
                self.monitor.inner_actions().record_gc(freed);
                tracing::info!(target: "memtel::manager", resident_before = before, resident_after = after, freed_bytes = freed, "allocator purged");
            }
            None => tracing::debug!(target: "memtel::manager", "no allocator to purge (jemalloc stats unavailable)"),
        }
    }
}
