//! Leak detection on synthetic series whose truth is known: linear leaks under noise
//! (the rate must come out within 5 %), rhythms that are not leaks (a sawtooth, a cache
//! filling to a plateau, a buffer halved when full, one-off steps, plain noise), and a
//! leak hidden under a sawtooth.

use memtel::history::leak::{assess, LeakDetection};

const MB: f64 = 1_048_576.0;
const HOUR: f64 = 3600.0;

/// xorshift64*: a deterministic noise source.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [−1, 1).
    fn sym(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }
}

/// `hours` of samples every 10 s of `f(t)`.
fn series(hours: f64, mut f: impl FnMut(f64) -> f64) -> Vec<(f64, f64)> {
    (0..(hours * HOUR / 10.0) as usize)
        .map(|i| {
            let t = i as f64 * 10.0;
            (t, f(t))
        })
        .collect()
}

fn rules() -> LeakDetection {
    LeakDetection::default()
}

#[test]
fn linear_leaks_under_noise_are_found_with_their_rate_within_5_percent() {
    for (seed, rate_mb_h, noise_mb) in [
        (1, 10.0, 2.0),
        (2, 10.0, 8.0),
        (3, 60.0, 20.0),
        (4, 3.0, 1.0),
        (5, 200.0, 50.0),
    ] {
        let mut rng = Rng(seed);
        let s = series(1.0, |t| {
            500.0 * MB + rate_mb_h * MB * t / HOUR + noise_mb * MB * rng.sym()
        });
        let found = assess(&s, &rules());
        let rate = found.rate_bytes_per_sec * HOUR / MB;
        assert!(
            found.sustained_growth,
            "{rate_mb_h} MB/h under ±{noise_mb} MB: {found:?}"
        );
        assert!(
            (rate / rate_mb_h - 1.0).abs() <= 0.05,
            "{rate_mb_h} MB/h under ±{noise_mb} MB estimated {rate:.2} MB/h"
        );
        assert!(
            found.since.is_some_and(|s| s < 0.2 * HOUR),
            "a leak from the start: {found:?}"
        );
    }
}

#[test]
fn a_sawtooth_is_not_a_leak() {
    for period in [60.0, 300.0, 900.0] {
        let mut rng = Rng(11);
        let s = series(2.0, |t| {
            200.0 * MB + 80.0 * MB * ((t % period) / period) + MB * rng.sym()
        });
        let found = assess(&s, &rules());
        assert!(!found.sustained_growth, "sawtooth of {period} s: {found:?}");
        assert!(found.rate_bytes_per_sec.abs() * HOUR < MB, "{found:?}");
    }
}

#[test]
fn a_cache_filling_to_a_plateau_is_not_a_leak() {
    // Fills with a time constant of a twelfth of the window, then holds.
    let mut rng = Rng(12);
    let s = series(1.0, |t| {
        100.0 * MB + 300.0 * MB * (1.0 - (-t / 300.0).exp()) + 0.5 * MB * rng.sym()
    });
    let found = assess(&s, &rules());
    assert!(!found.sustained_growth, "{found:?}");
}

#[test]
fn a_buffer_halved_when_full_is_not_a_leak() {
    // Grows 1 MB per sample to 64 MB, then is halved: floors stay at 32 MB.
    let mut size = 32.0;
    let s = series(2.0, |_| {
        size += 1.0;
        if size > 64.0 {
            size /= 2.0;
        }
        50.0 * MB + size * MB
    });
    let found = assess(&s, &rules());
    assert!(!found.sustained_growth, "{found:?}");
}

#[test]
fn one_off_steps_are_not_leaks() {
    for at in [0.2, 0.35, 0.5, 0.65, 0.8] {
        let mut rng = Rng(13);
        let s = series(1.0, |t| {
            let step = if t >= at * HOUR { 150.0 * MB } else { 0.0 };
            400.0 * MB + step + 2.0 * MB * rng.sym()
        });
        let found = assess(&s, &rules());
        assert!(!found.sustained_growth, "step at {at} of the window: {found:?}");
    }
}

#[test]
fn noise_alone_is_never_a_leak() {
    for seed in 1..=200 {
        let mut rng = Rng(seed);
        let s = series(1.0, |_| 300.0 * MB + 20.0 * MB * rng.sym());
        let found = assess(&s, &rules());
        assert!(!found.sustained_growth, "seed {seed}: {found:?}");
    }
}

#[test]
fn a_leak_hidden_under_a_sawtooth_is_found() {
    // A 100 MB sawtooth every 2 minutes over a floor growing 20 MB/h: the leak adds less in
    // a whole window than one tooth.
    let mut rng = Rng(14);
    let s = series(1.0, |t| {
        300.0 * MB + 20.0 * MB * t / HOUR + 100.0 * MB * ((t % 120.0) / 120.0) + MB * rng.sym()
    });
    let found = assess(&s, &rules());
    assert!(found.sustained_growth, "{found:?}");
    let rate = found.rate_bytes_per_sec * HOUR / MB;
    assert!((rate / 20.0 - 1.0).abs() <= 0.05, "estimated {rate:.2} MB/h");
}

#[test]
fn a_slow_leak_below_the_minimum_rate_is_not_reported() {
    let s = series(1.0, |t| 100.0 * MB + 0.5 * MB * t / HOUR);
    let found = assess(&s, &rules());
    assert!(!found.sustained_growth, "{found:?}");
    assert!((found.rate_bytes_per_sec * HOUR / MB - 0.5).abs() < 0.01);
}

#[test]
fn too_few_samples_are_not_judged() {
    let s: Vec<(f64, f64)> = (0..30).map(|i| (i as f64 * 10.0, 100.0 * MB + i as f64 * MB)).collect();
    assert!(!assess(&s, &rules()).sustained_growth);
    assert!(
        assess(
            &s,
            &LeakDetection {
                min_samples: 30,
                ..rules()
            }
        )
        .sustained_growth
    );
}
