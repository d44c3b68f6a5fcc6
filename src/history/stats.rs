//! Robust trend statistics: the Theil–Sen slope and the Mann–Kendall trend test.
//!
//! Both work on ranks and medians, so a few outliers (a spike, one sample taken mid-burst)
//! move neither, and neither assumes the noise is normal. They are O(n²) in the number of
//! points; the history feeds them per-bucket floors, a few dozen points (see `leak`).

/// The Theil–Sen estimate of the slope of `points` (x, y): the median of the slopes of
/// every pair with distinct x. `None` with fewer than two distinct x.
///
/// ```
/// use memtel::history::stats::theil_sen;
/// // y = 2x + 1, with one wild outlier that least squares would follow.
/// let mut points: Vec<(f64, f64)> = (0..20).map(|x| (x as f64, 2.0 * x as f64 + 1.0)).collect();
/// points[7].1 = 1000.0;
/// assert_eq!(theil_sen(&points), Some(2.0));
/// ```
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len().saturating_sub(1) / 2);
    for (i, &(x0, y0)) in points.iter().enumerate() {
        for &(x1, y1) in &points[i + 1..] {
            let dx = x1 - x0;
            if dx != 0.0 && dx.is_finite() && (y1 - y0).is_finite() {
                slopes.push((y1 - y0) / dx);
            }
        }
    }
    median(&mut slopes)
}

/// The intercept that goes with `slope` for `points`: the median of `y − slope·x`.
pub fn intercept(points: &[(f64, f64)], slope: f64) -> Option<f64> {
    let mut offsets: Vec<f64> = points.iter().map(|&(x, y)| y - slope * x).collect();
    median(&mut offsets)
}

/// The median of `values` (reordered in place); `None` if empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The result of [`mann_kendall`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannKendall {
    /// S: the number of later-greater pairs minus later-smaller pairs.
    pub s: i64,
    /// The normal approximation of S's significance, with the continuity correction and
    /// the variance corrected for ties: `Z > 2.33` means an increasing trend at 99 %
    /// confidence (one-sided), `Z > 1.64` at 95 %.
    pub z: f64,
}

/// The Mann–Kendall test for a monotonic trend in `values` (in time order): S counts,
/// over every pair, whether the later value is greater (+1) or smaller (−1). It does not
/// assume a linear trend, only a monotonic one; a series of fewer than 3 values has
/// `z = 0`.
///
/// ```
/// use memtel::history::stats::mann_kendall;
/// let rising: Vec<f64> = (0..12).map(|i| i as f64 + if i % 2 == 0 { 0.5 } else { 0.0 }).collect();
/// assert!(mann_kendall(&rising).z > 2.33);
/// let flat = [5.0, 3.0, 6.0, 4.0, 5.0, 3.0, 6.0, 4.0, 5.0, 3.0];
/// assert!(mann_kendall(&flat).z.abs() < 1.0);
/// ```
pub fn mann_kendall(values: &[f64]) -> MannKendall {
    let n = values.len();
    if n < 3 {
        return MannKendall { s: 0, z: 0.0 };
    }
    let mut s: i64 = 0;
    for (i, &a) in values.iter().enumerate() {
        for &b in &values[i + 1..] {
            s += match b.total_cmp(&a) {
                std::cmp::Ordering::Greater => 1,
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
            };
        }
    }
    // Tie groups reduce the variance: Σ t(t−1)(2t+5) over groups of t equal values.
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut ties = 0.0;
    let mut run = 1usize;
    for i in 1..=sorted.len() {
        if i < sorted.len() && sorted[i] == sorted[i - 1] {
            run += 1;
        } else {
            if run > 1 {
                let t = run as f64;
                ties += t * (t - 1.0) * (2.0 * t + 5.0);
            }
            run = 1;
        }
    }
    let nf = n as f64;
    let variance = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    let z = if variance <= 0.0 {
        0.0
    } else if s > 0 {
        (s - 1) as f64 / variance.sqrt()
    } else if s < 0 {
        (s + 1) as f64 / variance.sqrt()
    } else {
        0.0
    };
    MannKendall { s, z }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theil_sen_needs_two_distinct_x() {
        assert_eq!(theil_sen(&[]), None);
        assert_eq!(theil_sen(&[(1.0, 2.0)]), None);
        assert_eq!(theil_sen(&[(1.0, 2.0), (1.0, 5.0)]), None);
        assert_eq!(theil_sen(&[(0.0, 0.0), (2.0, 1.0)]), Some(0.5));
    }

    #[test]
    fn mann_kendall_matches_a_hand_count() {
        // Pairs of [1, 3, 2, 4]: (1,3)+ (1,2)+ (1,4)+ (3,2)- (3,4)+ (2,4)+ → S = 4.
        let mk = mann_kendall(&[1.0, 3.0, 2.0, 4.0]);
        assert_eq!(mk.s, 4);
        // Var = 4·3·13/18 = 8.667; Z = (4 − 1)/√8.667.
        assert!((mk.z - 3.0 / (52.0f64 / 6.0).sqrt()).abs() < 1e-12);
        // All equal: no trend, no variance.
        assert_eq!(mann_kendall(&[2.0; 8]), MannKendall { s: 0, z: 0.0 });
        assert!(mann_kendall(&[4.0, 3.0, 2.0, 1.0, 0.0]).z < -1.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
