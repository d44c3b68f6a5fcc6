//! The service's settings: flag > environment > YAML file > default.
//!
//! Values are taken as text and parsed here, so every error names the setting the
//! way the user wrote it (flag, variable or YAML key) and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;

use memtel::Thresholds;

const AFTER_HELP: &str = "\
Precedence: flag > environment variable > YAML file (--config) > default.

OpenTelemetry (standard OTEL_* variables, read as every OpenTelemetry SDK reads them):
  OTEL_SDK_DISABLED=true                 export nothing
  OTEL_METRICS_EXPORTER                  otlp (default) | console | none
  OTEL_EXPORTER_OTLP_PROTOCOL            http/protobuf (default) | grpc
  OTEL_EXPORTER_OTLP_ENDPOINT            default http://localhost:4318 (http/protobuf), http://localhost:4317 (grpc)
  OTEL_EXPORTER_OTLP_METRICS_ENDPOINT    full URL for metrics (http: include /v1/metrics)
  OTEL_EXPORTER_OTLP_HEADERS             key=value,key2=value2 (e.g. an API key)
  OTEL_EXPORTER_OTLP_TIMEOUT             export timeout in ms (default 10000)
  OTEL_METRIC_EXPORT_INTERVAL            export interval in ms (default 60000)
  OTEL_SERVICE_NAME                      service.name (default memtel)
  OTEL_RESOURCE_ATTRIBUTES               key=value,... added to the resource
Signal-specific variants (OTEL_EXPORTER_OTLP_METRICS_*) take precedence.
Logs: RUST_LOG (default info).
Allocator: MEMTEL_ALLOC_SCHEME=tags attributes every allocation with a tag byte instead of
  placing small ones in per-component jemalloc arenas (placement, the default): an escape
  hatch, as exact, read once at start.

Invalid settings exit with status 2; runtime failures (address in use) with 1.";

/// memtel: measured process memory as OpenTelemetry metrics and a JSON profile.
///
/// Serves GET /api/v1/memory/profile and GET /healthz, and exports the memory
/// metrics over OTLP. With the demo workload on, four components (extraction, cache,
/// browser, api) allocate, hold and free memory so every figure moves.
#[derive(Debug, Parser)]
#[command(name = "memtel", version, after_help = AFTER_HELP)]
struct Cli {
    /// YAML settings file (keys server.listen, memory.*, demo.enabled; see README).
    #[arg(long, env = "MEMTEL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "MEMTEL_LISTEN", value_name = "IP:PORT")]
    listen: Option<String>,
    /// Memory limit in MB (MiB) [default: the cgroup's limit, else physical RAM].
    #[arg(long, env = "MEMTEL_LIMIT_MB", value_name = "MB", allow_negative_numbers = true)]
    limit_mb: Option<String>,
    /// Warning threshold, fraction of the limit [default: 0.80].
    #[arg(
        long,
        env = "MEMTEL_WARNING_THRESHOLD",
        value_name = "FRACTION",
        allow_negative_numbers = true
    )]
    warning_threshold: Option<String>,
    /// Critical threshold, fraction of the limit [default: 0.90].
    #[arg(
        long,
        env = "MEMTEL_CRITICAL_THRESHOLD",
        value_name = "FRACTION",
        allow_negative_numbers = true
    )]
    critical_threshold: Option<String>,
    /// Purge the allocator while RSS exceeds this many MB [default: never].
    #[arg(long, env = "MEMTEL_GC_TRIGGER_MB", value_name = "MB", allow_negative_numbers = true)]
    gc_trigger_mb: Option<String>,
    /// How often the memory manager samples, e.g. 1s, 500ms [default: 1s].
    #[arg(long, env = "MEMTEL_CHECK_INTERVAL", value_name = "DURATION")]
    check_interval: Option<String>,
    /// Least time between two cleanups, and between two purges [default: 30s].
    #[arg(long, env = "MEMTEL_COOLDOWN", value_name = "DURATION")]
    cooldown: Option<String>,
    /// A level is left only this far (fraction of the limit) below its threshold [default: 0.05].
    #[arg(
        long,
        env = "MEMTEL_HYSTERESIS",
        value_name = "FRACTION",
        allow_negative_numbers = true
    )]
    hysteresis: Option<String>,
    /// Raise pressure to at least warning while PSI full avg10 exceeds this percent [default: off].
    #[arg(
        long,
        env = "MEMTEL_PSI_FULL_ESCALATION",
        value_name = "PERCENT",
        allow_negative_numbers = true
    )]
    psi_full_escalation: Option<String>,
    /// Time between two history samples, e.g. 10s, 100ms [default: 10s].
    #[arg(long, env = "MEMTEL_HISTORY_INTERVAL", value_name = "DURATION")]
    history_interval: Option<String>,
    /// How long the history keeps samples (older ones as min/mean/max aggregates) [default: 24h].
    #[arg(long, env = "MEMTEL_HISTORY_RETENTION", value_name = "DURATION")]
    history_retention: Option<String>,
    /// Least growth of a component's floor called a leak, MB per hour [default: 1].
    #[arg(long, env = "MEMTEL_LEAK_MIN_RATE_MB_PER_HOUR", value_name = "MB")]
    leak_min_rate_mb_per_hour: Option<String>,
    /// Samples a window needs before a leak is suspected [default: 60].
    #[arg(long, env = "MEMTEL_LEAK_MIN_SAMPLES", value_name = "N")]
    leak_min_samples: Option<String>,
    /// Mann-Kendall Z a rising floor must reach to be called a leak [default: 2.33, 99% one-sided].
    #[arg(long, env = "MEMTEL_LEAK_CONFIDENCE_Z", value_name = "Z")]
    leak_confidence_z: Option<String>,
    /// Make the demo's cache keep this many MB per minute that it never evicts (a leak to find) [default: 0].
    #[arg(long, env = "MEMTEL_DEMO_LEAK_MB_PER_MIN", value_name = "MB")]
    demo_leak_mb_per_min: Option<String>,
    /// Requests per second each client address may make to memtel's routes, bursts of twice that; the history, trends and debug routes allow a tenth; 0 turns it off [default: 100].
    #[arg(long, env = "MEMTEL_RATE_LIMIT", value_name = "N")]
    rate_limit: Option<String>,
    /// File holding the bearer token every data route then requires (or set MEMTEL_AUTH_TOKEN) [default: none].
    #[arg(long, env = "MEMTEL_AUTH_TOKEN_FILE", value_name = "PATH")]
    auth_token_file: Option<String>,
    /// Mean bytes between two sampled allocations of the heap profiler, e.g. 512KiB, 1MiB; 0 turns it off [default: 512KiB].
    #[arg(long, env = "MEMTEL_HEAP_PROFILE_SAMPLE", value_name = "BYTES")]
    heap_profile_sample: Option<String>,
    /// Serve the debug routes (/debug/pprof/heap) [default: off; env MEMTEL_DEBUG_ENDPOINTS=true|false].
    #[arg(long)]
    debug_endpoints: bool,
    /// Run the demo workload [default; env MEMTEL_DEMO=true|false].
    #[arg(long, overrides_with = "no_demo")]
    demo: bool,
    /// Do not run the demo workload.
    #[arg(long, overrides_with = "demo")]
    no_demo: bool,
}

/// The resolved settings of one run.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) limit_bytes: Option<u64>,
    pub(crate) thresholds: Thresholds,
    pub(crate) demo: bool,
    pub(crate) gc_trigger_bytes: Option<u64>,
    pub(crate) check_interval: Duration,
    pub(crate) cooldown: Duration,
    pub(crate) hysteresis: f64,
    pub(crate) psi_full_escalation: Option<f64>,
    pub(crate) history: memtel::HistoryConfig,
    pub(crate) demo_leak_mb_per_min: f64,
    pub(crate) heap_profile_sample: u64,
    pub(crate) debug_endpoints: bool,
    /// The bearer token data routes require, if any.
    pub(crate) auth: Option<memtel::auth::BearerAuth>,
    /// Requests per second per client (0: off).
    pub(crate) rate_limit: u64,
}

/// An invalid setting: the message names it, and the binary exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SettingsError(pub(crate) String);

/// The YAML file: unknown keys are errors, so a typo is never silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    memory: MemorySection,
    #[serde(default)]
    history: HistorySection,
    #[serde(default)]
    profiling: ProfilingSection,
    #[serde(default)]
    demo: DemoSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<Scalar>,
    auth_token_file: Option<Scalar>,
    rate_limit: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemorySection {
    global_memory_limit_mb: Option<Scalar>,
    pressure_threshold: Option<Scalar>,
    critical_threshold: Option<Scalar>,
    gc_trigger_threshold_mb: Option<Scalar>,
    check_interval: Option<Scalar>,
    cooldown: Option<Scalar>,
    hysteresis: Option<Scalar>,
    psi_full_escalation: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilingSection {
    heap_sample: Option<Scalar>,
    debug_endpoints: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySection {
    interval: Option<Scalar>,
    retention: Option<Scalar>,
    leak_min_rate_mb_per_hour: Option<Scalar>,
    leak_min_samples: Option<Scalar>,
    leak_confidence_z: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoSection {
    enabled: Option<Scalar>,
    leak_mb_per_min: Option<Scalar>,
}

/// A YAML scalar kept as text, so YAML values go through the same parsers (and the
/// same messages) as flags and variables.
#[derive(Debug)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_norway::Value;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Scalar(s)),
            Value::Number(n) => Ok(Scalar(n.to_string())),
            Value::Bool(b) => Ok(Scalar(b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a single value, found {other:?}"
            ))),
        }
    }
}

/// Where one setting can come from, for resolution and messages.
struct Names {
    id: &'static str,
    flag: &'static str,
    env: &'static str,
    yaml: &'static str,
}

const LISTEN: Names = Names {
    id: "listen",
    flag: "--listen",
    env: "MEMTEL_LISTEN",
    yaml: "server.listen",
};
const LIMIT_MB: Names = Names {
    id: "limit_mb",
    flag: "--limit-mb",
    env: "MEMTEL_LIMIT_MB",
    yaml: "memory.global_memory_limit_mb",
};
const WARNING: Names = Names {
    id: "warning_threshold",
    flag: "--warning-threshold",
    env: "MEMTEL_WARNING_THRESHOLD",
    yaml: "memory.pressure_threshold",
};
const CRITICAL: Names = Names {
    id: "critical_threshold",
    flag: "--critical-threshold",
    env: "MEMTEL_CRITICAL_THRESHOLD",
    yaml: "memory.critical_threshold",
};
const GC_TRIGGER: Names = Names {
    id: "gc_trigger_mb",
    flag: "--gc-trigger-mb",
    env: "MEMTEL_GC_TRIGGER_MB",
    yaml: "memory.gc_trigger_threshold_mb",
};
const CHECK_INTERVAL: Names = Names {
    id: "check_interval",
    flag: "--check-interval",
    env: "MEMTEL_CHECK_INTERVAL",
    yaml: "memory.check_interval",
};
const COOLDOWN: Names = Names {
    id: "cooldown",
    flag: "--cooldown",
    env: "MEMTEL_COOLDOWN",
    yaml: "memory.cooldown",
};
const HYSTERESIS: Names = Names {
    id: "hysteresis",
    flag: "--hysteresis",
    env: "MEMTEL_HYSTERESIS",
    yaml: "memory.hysteresis",
};
const PSI_ESCALATION: Names = Names {
    id: "psi_full_escalation",
    flag: "--psi-full-escalation",
    env: "MEMTEL_PSI_FULL_ESCALATION",
    yaml: "memory.psi_full_escalation",
};
const HISTORY_INTERVAL: Names = Names {
    id: "history_interval",
    flag: "--history-interval",
    env: "MEMTEL_HISTORY_INTERVAL",
    yaml: "history.interval",
};
const HISTORY_RETENTION: Names = Names {
    id: "history_retention",
    flag: "--history-retention",
    env: "MEMTEL_HISTORY_RETENTION",
    yaml: "history.retention",
};
const LEAK_MIN_RATE: Names = Names {
    id: "leak_min_rate_mb_per_hour",
    flag: "--leak-min-rate-mb-per-hour",
    env: "MEMTEL_LEAK_MIN_RATE_MB_PER_HOUR",
    yaml: "history.leak_min_rate_mb_per_hour",
};
const LEAK_MIN_SAMPLES: Names = Names {
    id: "leak_min_samples",
    flag: "--leak-min-samples",
    env: "MEMTEL_LEAK_MIN_SAMPLES",
    yaml: "history.leak_min_samples",
};
const LEAK_CONFIDENCE_Z: Names = Names {
    id: "leak_confidence_z",
    flag: "--leak-confidence-z",
    env: "MEMTEL_LEAK_CONFIDENCE_Z",
    yaml: "history.leak_confidence_z",
};
const DEMO_LEAK: Names = Names {
    id: "demo_leak_mb_per_min",
    flag: "--demo-leak-mb-per-min",
    env: "MEMTEL_DEMO_LEAK_MB_PER_MIN",
    yaml: "demo.leak_mb_per_min",
};
const RATE_LIMIT: Names = Names {
    id: "rate_limit",
    flag: "--rate-limit",
    env: "MEMTEL_RATE_LIMIT",
    yaml: "server.rate_limit",
};
const AUTH_TOKEN_FILE: Names = Names {
    id: "auth_token_file",
    flag: "--auth-token-file",
    env: "MEMTEL_AUTH_TOKEN_FILE",
    yaml: "server.auth_token_file",
};
/// The token itself, for deployments that inject secrets as variables.
const AUTH_TOKEN_ENV: &str = "MEMTEL_AUTH_TOKEN";
const HEAP_SAMPLE: Names = Names {
    id: "heap_profile_sample",
    flag: "--heap-profile-sample",
    env: "MEMTEL_HEAP_PROFILE_SAMPLE",
    yaml: "profiling.heap_sample",
};
const DEBUG_ENDPOINTS: Names = Names {
    id: "debug_endpoints",
    flag: "--debug-endpoints",
    env: "MEMTEL_DEBUG_ENDPOINTS",
    yaml: "profiling.debug_endpoints",
};
const DEMO: Names = Names {
    id: "demo",
    flag: "--demo/--no-demo",
    env: "MEMTEL_DEMO",
    yaml: "demo.enabled",
};

impl Names {
    fn all(&self) -> String {
        format!("{} / {} / {}", self.flag, self.env, self.yaml)
    }
}

impl Settings {
    /// Parses the command line (clap handles `--help` and unknown flags, exiting 2),
    /// then the environment and the file.
    pub(crate) fn load() -> Result<Self, SettingsError> {
        let matches = Cli::command().get_matches();
        let cli = Cli::from_arg_matches(&matches).map_err(|e| SettingsError(e.to_string()))?;
        check_alloc_scheme()?;
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let resolve = |names: &Names, cli_value: &Option<String>, file_value: &Option<Scalar>| {
            resolve(
                &matches,
                names,
                cli_value.as_deref(),
                file_value.as_ref().map(|s| s.0.as_str()),
            )
        };

        let listen = match resolve(&LISTEN, &cli.listen, &file.server.listen) {
            Some((from, text)) => text
                .parse::<SocketAddr>()
                .map_err(|_| invalid(from, &text, "expected IP:PORT, such as 127.0.0.1:8080 or [::1]:8080"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let limit_bytes = resolve(&LIMIT_MB, &cli.limit_mb, &file.memory.global_memory_limit_mb)
            .map(|(from, text)| megabytes(from, &text))
            .transpose()?;
        let gc_trigger_bytes = resolve(&GC_TRIGGER, &cli.gc_trigger_mb, &file.memory.gc_trigger_threshold_mb)
            .map(|(from, text)| megabytes(from, &text))
            .transpose()?;
        let check_interval = resolve(&CHECK_INTERVAL, &cli.check_interval, &file.memory.check_interval)
            .map(|(from, text)| duration(from, &text, Duration::from_millis(10)))
            .transpose()?
            .unwrap_or(Duration::from_secs(1));
        let cooldown = resolve(&COOLDOWN, &cli.cooldown, &file.memory.cooldown)
            .map(|(from, text)| duration(from, &text, Duration::ZERO))
            .transpose()?
            .unwrap_or(Duration::from_secs(30));
        let psi_full_escalation = resolve(
            &PSI_ESCALATION,
            &cli.psi_full_escalation,
            &file.memory.psi_full_escalation,
        )
        .map(|(from, text)| {
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .ok_or_else(|| invalid(from, &text, "expected a percentage in (0, 100], such as 10"))
        })
        .transpose()?;
        let fraction = |names: &Names, value: Option<(&'static str, String)>, default: f64| match value {
            Some((from, text)) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .map(|f| (f, from.to_owned()))
                .ok_or_else(|| invalid(from, &text, "expected a fraction of the limit in (0, 1], such as 0.8")),
            None => Ok((default, names.all())),
        };
        let (warning, warning_from) = fraction(
            &WARNING,
            resolve(&WARNING, &cli.warning_threshold, &file.memory.pressure_threshold),
            0.80,
        )?;
        let (critical, critical_from) = fraction(
            &CRITICAL,
            resolve(&CRITICAL, &cli.critical_threshold, &file.memory.critical_threshold),
            0.90,
        )?;
        let thresholds = Thresholds::new(warning, critical).map_err(|_| {
            SettingsError(format!(
                "invalid thresholds: warning {warning} ({warning_from}) must be below critical {critical} ({critical_from})"
            ))
        })?;

        let hysteresis = match resolve(&HYSTERESIS, &cli.hysteresis, &file.memory.hysteresis) {
            Some((from, text)) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|h| *h >= 0.0 && *h < thresholds.warning())
                .ok_or_else(|| {
                    invalid(
                        from,
                        &text,
                        &format!(
                            "expected a fraction of the limit from 0 to below the warning threshold {}",
                            thresholds.warning()
                        ),
                    )
                })?,
            None => 0.05_f64.min(thresholds.warning() / 2.0),
        };

        let demo = if cli.no_demo {
            false
        } else if cli.demo {
            true
        } else {
            let env = std::env::var(DEMO.env).ok().filter(|v| !v.is_empty());
            match (env, &file.demo.enabled) {
                (Some(text), _) => {
                    parse_bool(&text).ok_or_else(|| invalid(DEMO.env, &text, "expected true or false"))?
                }
                (None, Some(Scalar(text))) => {
                    parse_bool(text).ok_or_else(|| invalid(DEMO.yaml, text, "expected true or false"))?
                }
                (None, None) => true,
            }
        };

        let history = history_config(&resolve, &cli, &file)?;
        let demo_leak_mb_per_min = resolve(&DEMO_LEAK, &cli.demo_leak_mb_per_min, &file.demo.leak_mb_per_min)
            .map(|(from, text)| non_negative(from, &text))
            .transpose()?
            .unwrap_or(0.0);

        let heap_profile_sample = resolve(&HEAP_SAMPLE, &cli.heap_profile_sample, &file.profiling.heap_sample)
            .map(|(from, text)| bytes_with_unit(from, &text))
            .transpose()?
            .unwrap_or(512 << 10);
        let debug_endpoints = if cli.debug_endpoints {
            true
        } else {
            let env = std::env::var(DEBUG_ENDPOINTS.env).ok().filter(|v| !v.is_empty());
            match (env, &file.profiling.debug_endpoints) {
                (Some(text), _) => {
                    parse_bool(&text).ok_or_else(|| invalid(DEBUG_ENDPOINTS.env, &text, "expected true or false"))?
                }
                (None, Some(Scalar(text))) => {
                    parse_bool(text).ok_or_else(|| invalid(DEBUG_ENDPOINTS.yaml, text, "expected true or false"))?
                }
                (None, None) => false,
            }
        };

        let auth = match resolve(&AUTH_TOKEN_FILE, &cli.auth_token_file, &file.server.auth_token_file) {
            Some((from, path)) => {
                let text = std::fs::read_to_string(path.trim())
                    .map_err(|e| SettingsError(format!("cannot read {from} {path:?}: {e}")))?;
                // The file's content is never echoed: it is the secret.
                Some(memtel::auth::BearerAuth::new(&text).ok_or_else(|| {
                    SettingsError(format!(
                        "invalid {from} {path:?}: the file must hold one token of printable characters without spaces"
                    ))
                })?)
            }
            None => match std::env::var(AUTH_TOKEN_ENV) {
                Ok(text) if !text.is_empty() => Some(memtel::auth::BearerAuth::new(&text).ok_or_else(|| {
                    SettingsError(format!(
                        "invalid {AUTH_TOKEN_ENV}: one token of printable characters without spaces expected"
                    ))
                })?),
                _ => None,
            },
        };
        if debug_endpoints && auth.is_none() && !listen.ip().is_loopback() {
            return Err(SettingsError(format!(
                "refusing to serve /debug/* on {listen}, a non-loopback address, without a token: \
                 set --auth-token-file / {} / {} (or {AUTH_TOKEN_ENV}), listen on 127.0.0.1 \
                 (--listen / MEMTEL_LISTEN / server.listen), or drop {} / {}",
                AUTH_TOKEN_FILE.env, AUTH_TOKEN_FILE.yaml, DEBUG_ENDPOINTS.flag, DEBUG_ENDPOINTS.env
            )));
        }

        let rate_limit = resolve(&RATE_LIMIT, &cli.rate_limit, &file.server.rate_limit)
            .map(|(from, text)| {
                text.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= 1_000_000)
                    .ok_or_else(|| {
                        invalid(
                            from,
                            &text,
                            "expected requests per second, a whole number up to 1000000 (0 turns it off)",
                        )
                    })
            })
            .transpose()?
            .unwrap_or(100);

        Ok(Settings {
            rate_limit,
            auth,
            heap_profile_sample,
            debug_endpoints,
            history,
            demo_leak_mb_per_min,
            listen,
            limit_bytes,
            thresholds,
            demo,
            gc_trigger_bytes,
            check_interval,
            cooldown,
            hysteresis,
            psi_full_escalation,
        })
    }
}

/// Resolves one setting: its text and where it came from (see [`resolve`]).
type Resolve<'a> = dyn Fn(&Names, &Option<String>, &Option<Scalar>) -> Option<(&'static str, String)> + 'a;

/// The history's settings: interval and retention, and the leak detection thresholds.
fn history_config(
    resolve: &Resolve<'_>,
    cli: &Cli,
    file: &FileSettings,
) -> Result<memtel::HistoryConfig, SettingsError> {
    let interval = resolve(&HISTORY_INTERVAL, &cli.history_interval, &file.history.interval)
        .map(|(from, text)| duration(from, &text, Duration::from_millis(10)))
        .transpose()?;
    let retention = resolve(&HISTORY_RETENTION, &cli.history_retention, &file.history.retention)
        .map(|(from, text)| Ok::<_, SettingsError>((from, duration(from, &text, Duration::from_millis(10))?, text)))
        .transpose()?;
    let mut config = memtel::HistoryConfig::default();
    if let Some(interval) = interval {
        config = config.interval(interval);
    }
    if let Some((from, retention, text)) = retention {
        if retention < config.trend_window {
            return Err(invalid(
                from,
                &text,
                &format!(
                    "expected at least the trend window, 360 history intervals ({:?})",
                    config.trend_window
                ),
            ));
        }
        config = config.retention(retention);
    }
    let mut rules = config.leak;
    if let Some((from, text)) = resolve(
        &LEAK_MIN_RATE,
        &cli.leak_min_rate_mb_per_hour,
        &file.history.leak_min_rate_mb_per_hour,
    ) {
        rules.min_rate_bytes_per_sec = non_negative(from, &text)? * 1_048_576.0 / 3600.0;
    }
    if let Some((from, text)) = resolve(&LEAK_MIN_SAMPLES, &cli.leak_min_samples, &file.history.leak_min_samples) {
        rules.min_samples = text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 3)
            .ok_or_else(|| invalid(from, &text, "expected a whole number of samples, at least 3"))?;
    }
    if let Some((from, text)) = resolve(
        &LEAK_CONFIDENCE_Z,
        &cli.leak_confidence_z,
        &file.history.leak_confidence_z,
    ) {
        rules.confidence_z = text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|z| z.is_finite() && *z > 0.0)
            .ok_or_else(|| {
                invalid(
                    from,
                    &text,
                    "expected a positive number, such as 2.33 (99 %) or 1.64 (95 %)",
                )
            })?;
    }
    Ok(config.leak_detection(rules))
}

/// A number of bytes, with an optional unit: `B`, `KiB`, `MiB`, `GiB` (powers of 1024) or
/// `KB`, `MB`, `GB` (of 1000).
fn bytes_with_unit(from: &str, text: &str) -> Result<u64, SettingsError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => 0,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| scale > 0)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            invalid(
                from,
                text,
                "expected bytes such as 512KiB, 1MiB or 65536 (0 turns sampling off)",
            )
        })
}

/// A finite number of at least 0.
fn non_negative(from: &str, text: &str) -> Result<f64, SettingsError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| invalid(from, text, "expected a number of at least 0"))
}

/// The text of a setting and the name of where it came from.
fn resolve(
    matches: &ArgMatches,
    names: &Names,
    cli_value: Option<&str>,
    file_value: Option<&str>,
) -> Option<(&'static str, String)> {
    if let Some(text) = cli_value {
        let from = match matches.value_source(names.id) {
            Some(ValueSource::EnvVariable) => names.env,
            _ => names.flag,
        };
        return Some((from, text.to_owned()));
    }
    file_value.map(|text| (names.yaml, text.to_owned()))
}

/// A positive whole number of MB, in bytes.
fn megabytes(from: &str, text: &str) -> Result<u64, SettingsError> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|mb| *mb > 0)
        .and_then(|mb| mb.checked_mul(1 << 20))
        .ok_or_else(|| invalid(from, text, "expected a positive whole number of MB"))
}

/// A duration such as `1s`, `500ms` or `2m`, at least `min`.
fn duration(from: &str, text: &str, min: Duration) -> Result<Duration, SettingsError> {
    humantime::parse_duration(text.trim())
        .ok()
        .filter(|d| *d >= min)
        .ok_or_else(|| {
            invalid(
                from,
                text,
                &format!("expected a duration of at least {min:?}, such as 1s or 500ms"),
            )
        })
}

/// The allocator reads `MEMTEL_ALLOC_SCHEME` itself, where it cannot report a bad value:
/// the service refuses one here instead of silently placing.
fn check_alloc_scheme() -> Result<(), SettingsError> {
    let name = memtel::alloc::SCHEME_VARIABLE;
    match std::env::var(name) {
        Ok(value) if memtel::alloc::Scheme::parse(value.as_bytes()).is_none() => {
            Err(invalid(name, &value, "expected tags or placement"))
        }
        _ => Ok(()),
    }
}

fn invalid(from: &str, text: &str, expected: &str) -> SettingsError {
    SettingsError(format!("invalid {from} {text:?}: {expected}"))
}

pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn read_file(path: &Path) -> Result<FileSettings, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SettingsError(format!(
            "cannot read --config / MEMTEL_CONFIG file {}: {e}",
            path.display()
        ))
    })?;
    if text.trim().is_empty() {
        return Ok(FileSettings::default());
    }
    serde_norway::from_str(&text).map_err(|e| {
        let msg = e.to_string().replace('\n', " ");
        SettingsError(format!(
            "invalid --config / MEMTEL_CONFIG file {}: {msg}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_scalars_and_unknown_keys() {
        let f: FileSettings =
            serde_norway::from_str("memory:\n  global_memory_limit_mb: 2048\n  pressure_threshold: 0.7\n").unwrap();
        assert_eq!(f.memory.global_memory_limit_mb.unwrap().0, "2048");
        assert_eq!(f.memory.pressure_threshold.unwrap().0, "0.7");
        let err = serde_norway::from_str::<FileSettings>("memory:\n  pressure_treshold: 0.7\n").unwrap_err();
        assert!(err.to_string().contains("pressure_treshold"), "{err}");
    }

    #[test]
    fn bools() {
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
