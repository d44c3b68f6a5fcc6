//! Heap profiles by component, from the tracking allocator's sampled allocations.
//!
//! Turn sampling on with [`set_heap_sample_interval`](crate::alloc::set_heap_sample_interval)
//! (mean bytes between samples; the service's `--heap-profile-sample`), then take a
//! [`heap_profile`]: every sampled stack with its component and its allocated-since-start
//! and in-use objects and bytes, each sample weighted by `1 / (1 − e^(−size/interval))` so
//! the totals estimate all allocations, not only the sampled ones. It converts to pprof's
//! `profile.proto` ([`HeapProfile::to_pprof`], read by `go tool pprof`), folded stacks and
//! a flamegraph SVG, symbolized in the process.
//!
//! ```no_run
//! # #[global_allocator]
//! # static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
//! #     memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();
//! memtel::alloc::set_heap_sample_interval(512 << 10);
//! let cache = memtel::component("cache");
//! let kept = cache.in_scope(|| vec![0u8; 64 << 20]);
//! let profile = memtel::profile::heap_profile();
//! let in_cache: f64 = profile.samples.iter().filter(|s| s.component == "cache").map(|s| s.inuse_space).sum();
//! assert!(in_cache > 0.0);
//! std::fs::write("heap.pb.gz", profile.to_pprof()).unwrap();
//! # drop(kept);
//! ```

mod proto;
#[cfg(feature = "http")]
mod view;

use std::collections::HashMap;
use std::io::Write;
use std::time::SystemTime;

#[cfg(feature = "http")]
pub use view::{debug_router, HEAP_PATH, POOLS_PATH};

/// One sampled stack of a component, with its estimated totals.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProfileSample {
    /// Return addresses, the allocating function's first (as captured; see
    /// [`HeapProfile::symbolize`] for names).
    pub frames: Vec<usize>,
    /// The component the allocations were attributed to.
    pub component: &'static str,
    /// The innermost span entered when they were made (with
    /// [`ComponentLayer`](crate::ComponentLayer) installed); `None` otherwise.
    pub span: Option<&'static str>,
    /// Allocations made from this stack since sampling began (estimated).
    pub alloc_objects: f64,
    /// Bytes allocated from this stack since sampling began (estimated).
    pub alloc_space: f64,
    /// Allocations from this stack still live (estimated).
    pub inuse_objects: f64,
    /// Bytes allocated from this stack still live (estimated).
    pub inuse_space: f64,
}

/// A heap profile ([`heap_profile`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HeapProfile {
    /// When it was taken.
    pub taken_at: SystemTime,
    /// The mean sampling interval in bytes at that time (0: sampling was off).
    pub interval: u64,
    /// How long the profile covers, for a delta ([`HeapProfile::since`]); zero otherwise.
    pub duration: std::time::Duration,
    /// Every sampled stack.
    pub samples: Vec<ProfileSample>,
}

/// The heap profile now: every stack sampled since sampling began, with its in-use and
/// cumulative figures. Empty when sampling never ran (or without the tracking allocator).
pub fn heap_profile() -> HeapProfile {
    let mut samples = Vec::new();
    crate::alloc::sampler::read(|table| {
        table.each(|stack, inuse_objects, inuse_space| {
            samples.push(ProfileSample {
                frames: stack.frames.to_vec(),
                component: crate::alloc::registry::name(stack.slot),
                span: stack.span,
                alloc_objects: stack.alloc_objects,
                alloc_space: stack.alloc_space,
                inuse_objects,
                inuse_space,
            });
        });
    });
    HeapProfile {
        taken_at: SystemTime::now(),
        interval: crate::alloc::heap_sample_interval(),
        duration: std::time::Duration::ZERO,
        samples,
    }
}

/// Function names of a symbolized address, innermost (inlined) first.
type Names = Vec<(String, Option<String>, u32)>;

/// Frames of the allocator itself (and of capturing the stack), left out of profiles: by
/// the function's path where the debug information names it (`debug = 2`), else by its
/// source file (line tables only name functions without their paths).
fn is_allocator_frame(name: &str, file: Option<&str>) -> bool {
    const PREFIXES: [&str; 9] = [
        "backtrace::",
        "memtel::alloc::",
        "<memtel::alloc::",
        "__rust",
        "__rg_",
        "alloc::alloc::",
        "std::alloc::",
        "<alloc::alloc::Global",
        // `LocalKey::with` around the allocator's use of its thread state (debug builds).
        "std::thread::local::",
    ];
    if PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    let Some(file) = file else {
        return false;
    };
    let file = file.replace('\\', "/");
    // memtel's allocator, wherever this crate's sources were built from.
    file.starts_with(concat!(env!("CARGO_MANIFEST_DIR"), "/src/alloc/"))
        // The unwinder, and the standard library's allocation entry points.
        || (file.contains("/backtrace-") && file.contains("/src/backtrace/"))
        || file.ends_with("library/alloc/src/alloc.rs")
        || file.ends_with("library/std/src/alloc.rs")
        || file.ends_with("library/std/src/thread/local.rs")
}

impl HeapProfile {
    /// Only `component`'s samples.
    pub fn component(&self, component: &str) -> HeapProfile {
        HeapProfile {
            samples: self
                .samples
                .iter()
                .filter(|s| s.component == component)
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    /// What changed since `earlier`: the allocations made in between (cumulative figures
    /// subtracted) and the change in what is in use; stacks without allocations in between
    /// are left out.
    pub fn since(&self, earlier: &HeapProfile) -> HeapProfile {
        type Key<'a> = (&'a [usize], &'a str, Option<&'a str>);
        let before: HashMap<Key<'_>, &ProfileSample> = earlier
            .samples
            .iter()
            .map(|s| ((s.frames.as_slice(), s.component, s.span), s))
            .collect();
        let samples = self
            .samples
            .iter()
            .filter_map(|s| {
                let old = before.get(&(s.frames.as_slice(), s.component, s.span));
                let (objects, space, inuse_o, inuse_s) = old.map_or((0.0, 0.0, 0.0, 0.0), |o| {
                    (o.alloc_objects, o.alloc_space, o.inuse_objects, o.inuse_space)
                });
                let delta = ProfileSample {
                    frames: s.frames.clone(),
                    component: s.component,
                    span: s.span,
                    alloc_objects: s.alloc_objects - objects,
                    alloc_space: s.alloc_space - space,
                    inuse_objects: s.inuse_objects - inuse_o,
                    inuse_space: s.inuse_space - inuse_s,
                };
                (delta.alloc_objects > 0.0).then_some(delta)
            })
            .collect();
        HeapProfile {
            taken_at: self.taken_at,
            interval: self.interval,
            duration: self.taken_at.duration_since(earlier.taken_at).unwrap_or_default(),
            samples,
        }
    }

    /// The function names of every address in the profile (innermost inlined first), from
    /// the process's own debug information.
    fn names(&self) -> HashMap<usize, Names> {
        let mut names: HashMap<usize, Names> = HashMap::new();
        for sample in &self.samples {
            for &addr in &sample.frames {
                names.entry(addr).or_insert_with(|| {
                    let mut found = Vec::new();
                    // A return address is one past its call: look up the call itself.
                    backtrace::resolve(addr.saturating_sub(1) as *mut std::ffi::c_void, |symbol| {
                        if let Some(name) = symbol.name() {
                            found.push((
                                format!("{name:#}"),
                                symbol.filename().map(|f| f.to_string_lossy().into_owned()),
                                symbol.lineno().unwrap_or(0),
                            ));
                        }
                    });
                    if found.is_empty() {
                        found.push((format!("{addr:#x}"), None, 0));
                    }
                    found
                });
            }
        }
        names
    }

    /// Each sample's stack as function names, root first, allocator frames left out.
    pub fn symbolize(&self) -> Vec<Vec<String>> {
        let names = self.names();
        self.samples.iter().map(|s| stack_names(&s.frames, &names)).collect()
    }

    /// Folded stacks of in-use bytes: `root;…;leaf bytes` per line, one per stack, the
    /// component as the root frame.
    pub fn to_folded(&self) -> String {
        let names = self.names();
        let mut lines: HashMap<String, f64> = HashMap::new();
        for s in &self.samples {
            if s.inuse_space <= 0.0 {
                continue;
            }
            let mut stack = vec![format!("component={}", s.component)];
            stack.extend(stack_names(&s.frames, &names));
            *lines.entry(stack.join(";")).or_default() += s.inuse_space;
        }
        let mut out: Vec<String> = lines
            .into_iter()
            .map(|(stack, bytes)| format!("{stack} {}", bytes.round() as u64))
            .collect();
        out.sort();
        out.join("\n") + "\n"
    }

    /// A flamegraph of in-use bytes (SVG), by `inferno`.
    ///
    /// # Errors
    /// When inferno cannot render (no samples with in-use bytes, for one).
    pub fn to_svg(&self) -> Result<Vec<u8>, String> {
        let folded = self.to_folded();
        let mut options = inferno::flamegraph::Options::default();
        options.title = "memtel: in-use heap by component".into();
        options.count_name = "bytes".into();
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(&mut options, folded.lines().filter(|l| !l.is_empty()), &mut svg)
            .map_err(|e| e.to_string())?;
        Ok(svg)
    }

    /// The profile as pprof's `profile.proto`, gzipped: sample types `alloc_objects/count`,
    /// `alloc_space/bytes`, `inuse_objects/count`, `inuse_space/bytes` (Go's, in Go's
    /// order), a `component` label on every sample and a `span` label where known, every
    /// location symbolized.
    pub fn to_pprof(&self) -> Vec<u8> {
        let names = self.names();
        let mut strings = Strings::default();
        let mut profile = proto::Profile {
            sample_type: [
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
            ]
            .iter()
            .map(|(t, u)| proto::ValueType {
                r#type: strings.get(t),
                unit: strings.get(u),
            })
            .collect(),
            period_type: Some(proto::ValueType {
                r#type: strings.get("space"),
                unit: strings.get("bytes"),
            }),
            period: i64::try_from(self.interval).unwrap_or(i64::MAX),
            time_nanos: self
                .taken_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            duration_nanos: i64::try_from(self.duration.as_nanos()).unwrap_or(i64::MAX),
            ..Default::default()
        };
        profile.default_sample_type = strings.get("inuse_space");
        let binary = std::env::current_exe()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        profile.mapping.push(proto::Mapping {
            id: 1,
            memory_start: 0,
            memory_limit: u64::MAX,
            filename: strings.get(&binary),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Default::default()
        });
        let mut locations: HashMap<usize, u64> = HashMap::new();
        let mut functions: HashMap<String, u64> = HashMap::new();
        let component_key = strings.get("component");
        let span_key = strings.get("span");
        for s in &self.samples {
            let mut ids = Vec::new();
            for &addr in user_frames(&s.frames, &names) {
                let id = *locations.entry(addr).or_insert_with(|| {
                    let id = profile.location.len() as u64 + 1;
                    let lines = names[&addr]
                        .iter()
                        .map(|(name, file, line)| {
                            let function_id = *functions.entry(name.clone()).or_insert_with(|| {
                                let fid = profile.function.len() as u64 + 1;
                                profile.function.push(proto::Function {
                                    id: fid,
                                    name: strings.get(name),
                                    system_name: strings.get(name),
                                    filename: strings.get(file.as_deref().unwrap_or("")),
                                });
                                fid
                            });
                            proto::Line {
                                function_id,
                                line: i64::from(*line),
                            }
                        })
                        .collect();
                    profile.location.push(proto::Location {
                        id,
                        mapping_id: 1,
                        address: addr as u64,
                        line: lines,
                    });
                    id
                });
                ids.push(id);
            }
            profile.sample.push(proto::Sample {
                location_id: ids,
                value: [s.alloc_objects, s.alloc_space, s.inuse_objects, s.inuse_space]
                    .iter()
                    .map(|v| v.round() as i64)
                    .collect(),
                label: std::iter::once(proto::Label {
                    key: component_key,
                    str: strings.get(s.component),
                })
                .chain(s.span.map(|span| proto::Label {
                    key: span_key,
                    str: strings.get(span),
                }))
                .collect(),
            });
        }
        profile.string_table = strings.list;
        let encoded = prost::Message::encode_to_vec(&profile);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&encoded);
        gz.finish().unwrap_or_default()
    }
}

/// The frames after the allocator's own (the allocating function's first).
fn user_frames<'a>(frames: &'a [usize], names: &HashMap<usize, Names>) -> &'a [usize] {
    let skip = frames
        .iter()
        // The last name is the function the code is in (the others were inlined into it).
        .position(|a| {
            !names
                .get(a)
                .and_then(|n| n.last())
                .is_some_and(|(name, file, _)| is_allocator_frame(name, file.as_deref()))
        })
        .unwrap_or(frames.len());
    &frames[skip..]
}

/// A stack's function names, root first.
fn stack_names(frames: &[usize], names: &HashMap<usize, Names>) -> Vec<String> {
    let mut out = Vec::new();
    for addr in user_frames(frames, names).iter().rev() {
        // Inlined frames: the caller (last) first, root-first order.
        for (name, _, _) in names[addr].iter().rev() {
            out.push(name.clone());
        }
    }
    out
}

/// pprof's string table: index 0 is the empty string.
struct Strings {
    list: Vec<String>,
    index: HashMap<String, i64>,
}

impl Default for Strings {
    fn default() -> Self {
        Self {
            list: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.list.len() as i64;
        self.list.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}
