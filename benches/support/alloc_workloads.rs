//! Workloads and measurements shared by the allocator benches (`alloc_jemalloc`,
//! `alloc_memtel`, `alloc_tracking_crate`) and `span_layer`.
//!
//! A binary has one global allocator, so each allocator is its own bench target; they all
//! run the same workloads under the same criterion group names (`alloc/churn`,
//! `alloc/realistic`, `alloc/dom`) with the allocator's name as the function id, so the
//! results land side by side under `target/criterion/`. `scripts/alloc-bench.sh` runs them all in one
//! `cargo bench` invocation and prints the ratios.
//!
//! Every workload is deterministic (a fixed-seed PRNG, a fixed hasher): each allocator
//! serves exactly the same sequence of requests.

// Each bench binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use serde_json::{json, Value};

/// The two workers of the realistic workload.
pub const WORKERS: usize = 2;
/// Buffer churn: operations per iteration and live buffers in the ring.
pub const CHURN_OPS: usize = 1024;
pub const CHURN_RING: usize = 64;
/// Realistic workload: records each worker builds per iteration.
pub const REALISTIC_RECORDS: usize = 200;
/// Memory figures: records each worker builds and keeps (about 40 MiB in all).
pub const DATASET_RECORDS: usize = 5_000;

/// How a workload's allocations are attributed: `run(worker, f)` runs `f` inside the
/// attribution scope of `worker` (0 or 1), on the calling thread.
pub trait Scope: Sync {
    fn run<R>(&self, worker: usize, f: impl FnOnce() -> R) -> R;
}

/// One memtel component for both workers (of `realistic` and `dom`), as a service's
/// request handlers would share one.
pub struct InComponent(pub memtel::Component);

impl Scope for InComponent {
    fn run<R>(&self, _worker: usize, f: impl FnOnce() -> R) -> R {
        self.0.in_scope(f)
    }
}

/// No attribution scope at all.
pub struct NoScope;

impl Scope for NoScope {
    fn run<R>(&self, _worker: usize, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// xorshift64*: cheap, deterministic, allocation-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn word(&mut self) -> &'static str {
        WORDS[self.below(WORDS.len() as u64) as usize]
    }
}

const WORDS: &[&str] = &[
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "storage",
    "network",
    "latency",
    "throughput",
    "request",
    "response",
];

// ---------------------------------------------------------------------------------------
// (a) Buffer churn

/// One buffer size, log-uniform over 16..4096 bytes.
fn churn_size(rng: &mut Rng) -> usize {
    let low = 16usize << rng.below(8);
    low + rng.below(low as u64) as usize
}

/// A ring of live buffers, each replaced in turn by a new one of another size.
pub struct Churn {
    ring: Vec<Vec<u8>>,
    rng: Rng,
}

impl Churn {
    pub fn new() -> Self {
        let mut rng = Rng::new(7);
        let ring = (0..CHURN_RING)
            .map(|_| Vec::with_capacity(churn_size(&mut rng)))
            .collect();
        Self { ring, rng }
    }

    /// `CHURN_OPS` allocations and as many frees; each new buffer gets up to 64 bytes written.
    /// Never inlined, so profilers can count it (`valgrind --toggle-collect='*Churn*run*'`).
    #[inline(never)]
    pub fn run(&mut self) -> usize {
        const FILL: [u8; 64] = [0xA5; 64];
        let mut sum = 0;
        for i in 0..CHURN_OPS {
            let size = churn_size(&mut self.rng);
            let mut buffer = Vec::with_capacity(size);
            buffer.extend_from_slice(&FILL[..size.min(FILL.len())]);
            sum += black_box(&buffer).len();
            self.ring[i % CHURN_RING] = buffer;
        }
        sum
    }
}

impl Default for Churn {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// (b) Realistic: JSON values and a string-keyed index

pub type Index = HashMap<String, Vec<u64>, BuildHasherDefault<DefaultHasher>>;

/// One record as a service might hold it: strings of assorted lengths, small arrays, a
/// nested object.
pub fn record(rng: &mut Rng, id: u64) -> Value {
    let name = format!("{} {}", rng.word(), rng.word());
    let email = format!("{}.{}@example.com", rng.word(), id);
    let tags: Vec<Value> = (0..rng.below(5)).map(|_| Value::from(rng.word())).collect();
    let scores: Vec<Value> = (0..rng.below(12))
        .map(|_| json!(rng.below(10_000) as f64 / 100.0))
        .collect();
    let street = format!("{} {} street", rng.below(999), rng.word());
    let city = rng.word();
    let zip = format!("{:05}", rng.below(100_000));
    let mut note = String::new();
    for _ in 0..rng.below(16) {
        note.push_str(rng.word());
        note.push(' ');
    }
    json!({
        "id": id,
        "name": name,
        "email": email,
        "active": rng.below(2) == 1,
        "balance": rng.below(1_000_000) as f64 / 100.0,
        "tags": tags,
        "scores": scores,
        "address": { "street": street, "city": city, "zip": zip },
        "note": note,
    })
}

/// What one worker builds: records, the same records serialized and parsed back, and an
/// index of `4 × records` entries pushed into string-keyed vectors.
pub struct Built {
    pub records: Vec<Value>,
    pub parsed: Value,
    pub index: Index,
    pub text_len: usize,
}

pub fn build(seed: u64, records: usize) -> Built {
    let mut rng = Rng::new(seed);
    let values: Vec<Value> = (0..records as u64).map(|id| record(&mut rng, id)).collect();
    let text = serde_json::to_string(&values).expect("serialize");
    let parsed: Value = serde_json::from_str(&text).expect("parse");
    let mut index = Index::default();
    for _ in 0..records * 4 {
        let key = format!("{}:{}", rng.word(), rng.below(records as u64));
        index.entry(key).or_default().push(rng.next_u64());
    }
    Built {
        records: values,
        parsed,
        index,
        text_len: text.len(),
    }
}

impl Built {
    pub fn checksum(&self) -> usize {
        self.records.len() + self.parsed.as_array().map_or(0, Vec::len) + self.index.len() + self.text_len
    }
}

/// Each of two threads enters its scope, builds `records` records' worth of data and
/// returns it (the caller keeps or drops it).
pub fn build_on_workers<S: Scope>(scope: &S, records: usize) -> Vec<Built> {
    std::thread::scope(|threads| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|worker| threads.spawn(move || scope.run(worker, || build(worker as u64 + 1, records))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).collect()
    })
}

/// The timed realistic workload: each thread builds and drops its data inside its scope.
pub fn realistic<S: Scope>(scope: &S) -> usize {
    std::thread::scope(|threads| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|worker| threads.spawn(move || realistic_worker(scope, worker)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).sum()
    })
}

/// One worker's share of the realistic workload. Never inlined, so profilers can count it
/// (`valgrind --toggle-collect='*realistic_worker*'`).
#[inline(never)]
pub fn realistic_worker<S: Scope>(scope: &S, worker: usize) -> usize {
    scope.run(worker, || {
        let built = build(worker as u64 + 1, REALISTIC_RECORDS);
        let sum = built.checksum();
        drop(black_box(built));
        sum
    })
}

// ---------------------------------------------------------------------------------------
// (c) DOM: API-like JSON documents parsed into `serde_json::Value` and serialized back

#[path = "dom_corpus.rs"]
mod dom_corpus;

/// The `dom` corpus: texts of API-like documents (see `dom_corpus.rs`), split between the
/// two workers so that each holds about half the bytes.
pub struct DomCorpus {
    pub shares: [Vec<String>; WORKERS],
    pub documents: usize,
    pub bytes: usize,
}

impl DomCorpus {
    /// Generates the corpus (about `dom_corpus::CORPUS_BYTES` of text) from a fixed seed.
    /// Call it outside any measurement: it parses and serializes every document once.
    pub fn generate() -> Self {
        let texts = dom_corpus::generate(11, dom_corpus::CORPUS_BYTES);
        let (documents, bytes) = (texts.len(), texts.iter().map(String::len).sum::<usize>());
        eprintln!(
            "dom corpus: {documents} documents, {:.2} MiB of JSON text",
            bytes as f64 / (1024.0 * 1024.0)
        );
        let mut shares: [Vec<String>; WORKERS] = Default::default();
        let mut held = [0usize; WORKERS];
        for text in texts {
            let worker = (0..WORKERS).min_by_key(|&w| held[w]).expect("workers");
            held[worker] += text.len();
            shares[worker].push(text);
        }
        Self {
            shares,
            documents,
            bytes,
        }
    }
}

/// What a worker hands its peer: a parsed tree for the peer to drop, or the end of its batch.
enum Handoff {
    Tree(Value),
    Done,
}

/// One worker's batch, the unit of the `dom` workload: every document of its share parsed
/// into a `Value` and serialized back to a `String`. Every fourth tree goes to the peer
/// worker, which drops it (a free on another thread than the allocation's); the rest are
/// dropped here. Returns once the peer's batch has ended too and all it handed over has
/// been dropped, so nothing the batch allocated outlives it. Never inlined, so profilers
/// can count it (`valgrind --toggle-collect='*dom_batch*'`; per document: its inclusive
/// cost ÷ the calls of `dom_round_trip`).
#[inline(never)]
fn dom_batch(share: &[String], to_peer: &Sender<Handoff>, from_peer: &Receiver<Handoff>) -> usize {
    let mut peer_done = false;
    let mut sum = 0;
    for (i, text) in share.iter().enumerate() {
        let (tree, len) = dom_round_trip(text);
        sum += len;
        if i % 4 == 0 {
            to_peer.send(Handoff::Tree(tree)).expect("the peer worker");
        } else {
            drop(black_box(tree));
        }
        while let Ok(handoff) = from_peer.try_recv() {
            peer_done |= drop_handoff(handoff);
        }
    }
    to_peer.send(Handoff::Done).expect("the peer worker");
    while !peer_done {
        peer_done = drop_handoff(from_peer.recv().expect("the peer worker"));
    }
    sum
}

/// One document parsed into a tree and serialized back (the serialized text dropped).
/// Never inlined: its calls under a profiler count the documents.
#[inline(never)]
fn dom_round_trip(text: &str) -> (Value, usize) {
    let tree: Value = serde_json::from_str(text).expect("a corpus document parses");
    let out = serde_json::to_string(&tree).expect("a Value serializes");
    let len = black_box(out).len();
    (tree, len)
}

/// Drops a tree the peer handed over; true if it was the end of the peer's batch instead.
fn drop_handoff(handoff: Handoff) -> bool {
    match handoff {
        Handoff::Tree(tree) => {
            drop(black_box(tree));
            false
        }
        Handoff::Done => true,
    }
}

/// Two worker threads that live as long as the benchmark and run one batch each per
/// iteration, each inside its scope (kept threads, as a service's request handlers are:
/// neither thread start-up nor a thread's first allocations are measured).
pub struct DomWorkers {
    go: Vec<Sender<()>>,
    done: Receiver<usize>,
}

impl DomWorkers {
    pub fn start<'scope, S: Scope>(
        threads: &'scope std::thread::Scope<'scope, '_>,
        scope: &'scope S,
        corpus: &'scope DomCorpus,
    ) -> Self {
        let (done_tx, done) = channel();
        let (a_tx, a_rx) = channel();
        let (b_tx, b_rx) = channel();
        let mut links = [(b_tx, a_rx), (a_tx, b_rx)].into_iter();
        let go = (0..WORKERS)
            .map(|worker| {
                let (to_peer, from_peer) = links.next().expect("a link per worker");
                let (go_tx, go_rx) = channel::<()>();
                let done = done_tx.clone();
                let share = &corpus.shares[worker];
                threads.spawn(move || {
                    while go_rx.recv().is_ok() {
                        let sum = scope.run(worker, || dom_batch(share, &to_peer, &from_peer));
                        done.send(sum).expect("the benchmark thread");
                    }
                });
                go_tx
            })
            .collect();
        Self { go, done }
    }

    /// One iteration: both workers run their batch; returns the bytes serialized. Never
    /// inlined, so a profiler can report each iteration (`--dump-after='*DomWorkers*run*'`).
    #[inline(never)]
    pub fn run(&self) -> usize {
        for go in &self.go {
            go.send(()).expect("a worker");
        }
        (0..WORKERS).map(|_| self.done.recv().expect("a worker")).sum()
    }
}

// ---------------------------------------------------------------------------------------
// Criterion set-up and the benchmarks every allocator runs

/// Where criterion writes (`$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else
/// `target/criterion` of this crate); the memory figures go to `alloc-memory/` in it.
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

#[path = "bench_clock.rs"]
mod bench_clock;
use bench_clock::BenchClock;

/// Criterion as the allocator benches use it, measuring with [`BenchClock::from_env`].
pub type Bench = Criterion<BenchClock>;

pub fn criterion() -> Bench {
    let clock = BenchClock::from_env();
    eprintln!("measuring {} time (ALLOC_BENCH_CLOCK=cpu|wall)", clock.name());
    Criterion::default()
        .with_measurement(clock)
        .output_directory(&criterion_dir())
        .without_plots()
        .configure_from_args()
}

pub fn short<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
}

/// `alloc/churn/<name>`: the workload inside `scope`, entered once per iteration.
pub fn bench_churn<S: Scope>(c: &mut Bench, name: &str, scope: &S) {
    let mut group = c.benchmark_group("alloc/churn");
    short(&mut group);
    let mut churn = Churn::new();
    group.bench_function(name, |b| b.iter(|| scope.run(0, || churn.run())));
    group.finish();
}

/// `alloc/realistic/<name>`: each worker thread enters `scope` itself.
pub fn bench_realistic<S: Scope>(c: &mut Bench, name: &str, scope: &S) {
    let mut group = c.benchmark_group("alloc/realistic");
    short(&mut group);
    // An iteration takes milliseconds: few, equal samples fit the 3 s.
    group.sample_size(20).sampling_mode(SamplingMode::Flat);
    group.bench_function(name, |b| b.iter(|| realistic(scope)));
    group.finish();
}

/// `alloc/dom/<name>`: one iteration is one pass over the whole corpus, half on each of
/// two kept worker threads, each entering `scope` for its batch.
pub fn bench_dom<S: Scope>(c: &mut Bench, name: &str, scope: &S, corpus: &DomCorpus) {
    let mut group = c.benchmark_group("alloc/dom");
    short(&mut group);
    // An iteration takes milliseconds, as in `alloc/realistic`.
    group.sample_size(20).sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(corpus.bytes as u64));
    std::thread::scope(|threads| {
        let workers = DomWorkers::start(threads, scope, corpus);
        group.bench_function(name, |b| b.iter(|| workers.run()));
        // Dropping `workers` ends the threads' loops before the scope joins them.
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------
// Memory figures

/// jemalloc's `stats.allocated` and `stats.resident`, after advancing `epoch`.
pub fn jemalloc_stats() -> (u64, u64) {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().expect("jemalloc epoch");
    let allocated = stats::allocated::read().expect("stats.allocated") as u64;
    let resident = stats::resident::read().expect("stats.resident") as u64;
    (allocated, resident)
}

/// How long [`measure_memory`] waits before its second reading of resident bytes.
const SETTLE: Duration = Duration::from_millis(1500);

/// Builds and keeps the realistic data set (two threads, each in its scope) and reports
/// what it added to jemalloc's `allocated` and `resident`. Call it first in `main`, before
/// criterion has allocated anything, so every allocator starts from the same heap.
/// `tracked` reads the allocator's own attribution of live bytes, if it has one.
///
/// Prints the figures and writes them to `<criterion dir>/alloc-memory/<name>.json`.
pub fn measure_memory<S: Scope>(name: &str, scope: &S, tracked: impl Fn() -> Option<u64>) {
    let tracked_before = tracked();
    let (allocated_before, resident_before) = jemalloc_stats();
    let data = build_on_workers(scope, DATASET_RECORDS);
    let (allocated_after, resident_after) = jemalloc_stats();
    let tracked_after = tracked();
    let checksum: usize = data.iter().map(Built::checksum).sum();
    // Again once freed pages have had their decay (memtel's component arenas: 1 s, with its
    // decay thread's 250 ms tick), the data set still held: a figure that does not hang
    // on what the workers' exits purged at that instant.
    std::thread::sleep(SETTLE);
    let (_, resident_settled) = jemalloc_stats();

    let allocated = allocated_after.saturating_sub(allocated_before);
    let resident = resident_after.saturating_sub(resident_before);
    let tracked = tracked_before.zip(tracked_after).map(|(b, a)| a.saturating_sub(b));
    let mib = |v: u64| v as f64 / (1024.0 * 1024.0);
    eprintln!(
        "memory [{name}]: data set of {} records on {WORKERS} threads (checksum {checksum}): \
         allocated +{:.2} MiB, resident +{:.2} MiB{}",
        WORKERS * DATASET_RECORDS,
        mib(allocated),
        mib(resident),
        tracked.map_or(String::new(), |t| format!(", tracked live +{:.2} MiB", mib(t))),
    );
    let dir = criterion_dir().join("alloc-memory");
    let json = json!({
        "allocator": name,
        "records": WORKERS * DATASET_RECORDS,
        "allocated_delta": allocated,
        "resident_delta": resident,
        "resident_settled_delta": resident_settled.saturating_sub(resident_before),
        "tracked_delta": tracked,
        "allocated_before": allocated_before,
        "resident_before": resident_before,
    });
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(format!("{name}.json")), json.to_string()))
    {
        eprintln!("memory [{name}]: cannot write {}: {e}", dir.display());
    }
    drop(black_box(data));
    // Every bench then starts from a heap without the data set's dirty pages.
    purge_all_arenas();
}

/// Returns every jemalloc arena's dirty pages to the OS.
pub fn purge_all_arenas() {
    if !memtel::purge_jemalloc() {
        eprintln!("arena.<all>.purge failed");
    }
}
