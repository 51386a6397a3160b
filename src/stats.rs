//! Statistics for honest evaluation: confidence intervals, paired and unpaired tests.
//!
//! Everything is a pure function on `f64`. The special functions (log-gamma, the regularized
//! incomplete beta function and through it the Student-t distribution) are implemented here in
//! the Numerical Recipes style, so no statistics crate is needed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The z value of a two-sided 95% normal interval.
pub const Z95: f64 = 1.959964;

/// Arithmetic mean; NaN for an empty slice.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample variance (divisor n - 1); NaN with fewer than two values.
fn sample_var(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let m = mean(xs);
    xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (xs.len() - 1) as f64
}

/// Wilson score interval for a binomial proportion `successes / n` at normal quantile `z`
/// (use [`Z95`] for 95%). `n = 0` gives the uninformative `(0, 1)`.
pub fn wilson_interval(successes: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Natural log of the gamma function (Lanczos approximation, relative error below 1e-14 for
/// x > 0).
pub fn ln_gamma(x: f64) -> f64 {
    // Coefficients for g = 7, n = 9 (as used widely, e.g. in Boost's and Python's examples).
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Log of the binomial coefficient C(n, k).
fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// Two-sided exact McNemar test on the discordant pair counts `b` (only the first system right)
/// and `c` (only the second right): `p = min(1, 2 P(X <= min(b, c)))` with `X ~ Bin(b + c, 1/2)`.
/// Computed in log space, so it is accurate for `b + c` in the tens of thousands.
/// `b + c = 0` gives 1.
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let terms: Vec<f64> = (0..=k).map(|i| ln_choose(n, i) - ln_half_n).collect();
    let top = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ln_tail = top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln();
    (2.0 * ln_tail.exp()).min(1.0)
}

/// Continued fraction for the incomplete beta function (Numerical Recipes `betacf`, modified
/// Lentz's method).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const MAX_ITER: usize = 10_000;
    const EPS: f64 = 1e-15;
    const FPMIN: f64 = 1e-300;
    let qab = a + b;
    let qap = a + 1.0;
    let qam = a - 1.0;
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < FPMIN {
        d = FPMIN;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=MAX_ITER {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Even step.
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < FPMIN {
            d = FPMIN;
        }
        c = 1.0 + aa / c;
        if c.abs() < FPMIN {
            c = FPMIN;
        }
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < FPMIN {
            d = FPMIN;
        }
        c = 1.0 + aa / c;
        if c.abs() < FPMIN {
            c = FPMIN;
        }
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// Regularized incomplete beta function `I_x(a, b)` for `a, b > 0` and `0 <= x <= 1`.
pub fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x.is_nan() || a.is_nan() || b.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    // Use the continued fraction where it converges fast, and the symmetry relation elsewhere.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Two-sided p-value of Student's t distribution: `P(|T| >= |t|)` with `df` degrees of freedom
/// (`df` may be fractional, as in Welch's test). Infinite `t` gives 0; NaN gives NaN.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    inc_beta(df / 2.0, 0.5, df / (df + t * t)).clamp(0.0, 1.0)
}

/// Student's t cumulative distribution function `P(T <= t)`.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let p = t_two_sided_p(t, df);
    if t >= 0.0 {
        1.0 - p / 2.0
    } else {
        p / 2.0
    }
}

/// The result of [`welch_t_test`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WelchTest {
    /// Mean of the first sample.
    pub mean_a: f64,
    /// Mean of the second sample.
    pub mean_b: f64,
    /// `mean_a - mean_b`.
    pub diff: f64,
    /// Welch's t statistic.
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p_two_sided: f64,
    /// Cohen's d with the pooled standard deviation.
    pub cohens_d: f64,
}

/// Welch's unequal-variance t-test of `mean(a) = mean(b)`.
///
/// Edge cases:
/// - fewer than two values in either sample: no test is possible, so `t`, `df` and `cohens_d`
///   are NaN and `p_two_sided` is 1 (no evidence of a difference);
/// - both variances zero: `df = n_a + n_b - 2`; equal means give `t = 0`, `p = 1`, `d = 0`;
///   different means give `t = ±inf`, `p = 0`, `d = ±inf`.
pub fn welch_t_test(a: &[f64], b: &[f64]) -> WelchTest {
    let mean_a = mean(a);
    let mean_b = mean(b);
    let diff = mean_a - mean_b;
    let (na, nb) = (a.len() as f64, b.len() as f64);
    if a.len() < 2 || b.len() < 2 {
        return WelchTest {
            mean_a,
            mean_b,
            diff,
            t: f64::NAN,
            df: f64::NAN,
            p_two_sided: 1.0,
            cohens_d: f64::NAN,
        };
    }
    let (va, vb) = (sample_var(a), sample_var(b));
    let pooled_sd = (((na - 1.0) * va + (nb - 1.0) * vb) / (na + nb - 2.0)).sqrt();
    let cohens_d = if pooled_sd > 0.0 {
        diff / pooled_sd
    } else if diff == 0.0 {
        0.0
    } else {
        diff.signum() * f64::INFINITY
    };
    let (sa, sb) = (va / na, vb / nb);
    let se2 = sa + sb;
    if se2 == 0.0 {
        let (t, p) = if diff == 0.0 { (0.0, 1.0) } else { (diff.signum() * f64::INFINITY, 0.0) };
        return WelchTest { mean_a, mean_b, diff, t, df: na + nb - 2.0, p_two_sided: p, cohens_d };
    }
    let t = diff / se2.sqrt();
    let df = se2 * se2 / (sa * sa / (na - 1.0) + sb * sb / (nb - 1.0));
    let p_two_sided = t_two_sided_p(t, df);
    WelchTest { mean_a, mean_b, diff, t, df, p_two_sided, cohens_d }
}

/// Value at quantile `q` of sorted data, interpolating linearly between order statistics (the
/// same rule as numpy's default).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Percentile bootstrap confidence interval `(low, high)` at level `1 - alpha` for
/// `mean(a) - mean(b)`, resampling each sample independently with replacement `n_boot` times.
/// Seeded (`StdRng::seed_from_u64(seed)`), so the same inputs give the same interval.
/// An empty sample or `n_boot = 0` gives `(NaN, NaN)`.
pub fn bootstrap_diff_ci(a: &[f64], b: &[f64], n_boot: usize, alpha: f64, seed: u64) -> (f64, f64) {
    if a.is_empty() || b.is_empty() || n_boot == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let resample_mean = |xs: &[f64], rng: &mut StdRng| {
        (0..xs.len()).map(|_| xs[rng.gen_range(0..xs.len())]).sum::<f64>() / xs.len() as f64
    };
    let mut diffs: Vec<f64> = (0..n_boot)
        .map(|_| resample_mean(a, &mut rng) - resample_mean(b, &mut rng))
        .collect();
    diffs.sort_by(|x, y| x.total_cmp(y));
    (quantile_sorted(&diffs, alpha / 2.0), quantile_sorted(&diffs, 1.0 - alpha / 2.0))
}

/// Benjamini–Hochberg q-values (step-up, made monotone): `q_(i) = min over j >= i of
/// p_(j) m / j` for the p-values sorted ascending, capped at 1, returned in input order. NaN
/// p-values are left out of `m` and get a NaN q-value.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len() as f64;
    let mut q = vec![f64::NAN; p.len()];
    let mut running = 1.0f64;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * m / (rank + 1) as f64);
        q[i] = running;
    }
    q
}

/// Hedges' g from two groups' means, sample variances (divisor n - 1) and sizes: Cohen's d with
/// the pooled standard deviation times the small-sample correction `J = 1 - 3 / (4 (n_a + n_b) - 9)`.
/// Fewer than two values in a group give NaN; zero pooled variance gives 0 for equal means and
/// ±infinity otherwise.
pub fn hedges_g(mean_a: f64, var_a: f64, n_a: usize, mean_b: f64, var_b: f64, n_b: usize) -> f64 {
    if n_a < 2 || n_b < 2 {
        return f64::NAN;
    }
    let (na, nb) = (n_a as f64, n_b as f64);
    let pooled = (((na - 1.0) * var_a + (nb - 1.0) * var_b) / (na + nb - 2.0)).sqrt();
    let diff = mean_a - mean_b;
    let d = if pooled > 0.0 {
        diff / pooled
    } else if diff == 0.0 {
        0.0
    } else {
        diff.signum() * f64::INFINITY
    };
    d * (1.0 - 3.0 / (4.0 * (na + nb) - 9.0))
}

/// Percentile bootstrap confidence interval `(low, high)` at level `1 - alpha` for the mean
/// paired difference `mean(a[i] - b[i])`: items are resampled with replacement (the same item
/// for both), `n_boot` times, seeded with `StdRng::seed_from_u64(seed)`. Empty or unequal
/// samples, or `n_boot = 0`, give `(NaN, NaN)`.
pub fn paired_bootstrap_ci(a: &[f64], b: &[f64], n_boot: usize, alpha: f64, seed: u64) -> (f64, f64) {
    if a.is_empty() || a.len() != b.len() || n_boot == 0 {
        return (f64::NAN, f64::NAN);
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> =
        (0..n_boot).map(|_| (0..d.len()).map(|_| d[rng.gen_range(0..d.len())]).sum::<f64>() / d.len() as f64).collect();
    means.sort_by(|x, y| x.total_cmp(y));
    (quantile_sorted(&means, alpha / 2.0), quantile_sorted(&means, 1.0 - alpha / 2.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} != {b} (tol {tol})");
    }

    #[test]
    fn mean_basic() {
        close(mean(&[1.0, 2.0, 3.0, 4.0]), 2.5, 1e-15);
        assert!(mean(&[]).is_nan());
    }

    #[test]
    fn wilson_known_values() {
        let (lo, hi) = wilson_interval(8, 10, Z95);
        close(lo, 0.4901625, 1e-6);
        close(hi, 0.9433178, 1e-6);
        assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
        let (lo, hi) = wilson_interval(0, 10, Z95);
        close(lo, 0.0, 1e-12);
        close(hi, 0.2775328, 1e-6);
        let (lo, hi) = wilson_interval(10, 10, Z95);
        close(lo, 0.7224672, 1e-6);
        close(hi, 1.0, 1e-12);
        // BoolQ majority baseline: 2033 / 3270.
        let (lo, hi) = wilson_interval(2033, 3270, Z95);
        close(lo, 0.6049570, 1e-6);
        close(hi, 0.6381825, 1e-6);
    }

    #[test]
    fn ln_gamma_known_values() {
        close(ln_gamma(1.0), 0.0, 1e-13);
        close(ln_gamma(2.0), 0.0, 1e-13);
        close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-13);
        close(ln_gamma(10.0), (362880.0f64).ln(), 1e-12);
        close(ln_gamma(10001.0), 82108.92783681436, 1e-7);
    }

    #[test]
    fn mcnemar_known_values() {
        close(mcnemar_exact(0, 5), 0.0625, 1e-12);
        close(mcnemar_exact(5, 0), 0.0625, 1e-12);
        close(mcnemar_exact(3, 10), 0.09228515625, 1e-10);
        close(mcnemar_exact(10, 3), 0.09228515625, 1e-10);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        close(mcnemar_exact(1, 1), 1.0, 1e-12);
        // Large counts stay finite and accurate (reference from exact integer arithmetic).
        close(mcnemar_exact(4900, 5100), 0.04658552770494739, 1e-9);
        let p = mcnemar_exact(0, 10_000);
        assert!(p.is_finite() && p < 1e-300);
        close(mcnemar_exact(5000, 5000), 1.0, 1e-12);
    }

    #[test]
    fn inc_beta_known_values() {
        // I_x(1, 1) = x; I_x(a, 1) = x^a.
        close(inc_beta(1.0, 1.0, 0.3), 0.3, 1e-13);
        close(inc_beta(3.0, 1.0, 0.5), 0.125, 1e-13);
        close(inc_beta(2.0, 3.0, 0.4), 0.5248, 1e-12);
        assert_eq!(inc_beta(2.0, 3.0, 0.0), 0.0);
        assert_eq!(inc_beta(2.0, 3.0, 1.0), 1.0);
    }

    #[test]
    fn t_distribution_known_values() {
        close(t_two_sided_p(2.0, 10.0), 0.07338803477074037, 1e-9);
        close(t_two_sided_p(-2.0, 10.0), 0.07338803477074037, 1e-9);
        close(t_two_sided_p(0.0, 5.0), 1.0, 1e-12);
        // df = 1 is Cauchy: P(|T| >= 1) = 1/2.
        close(t_two_sided_p(1.0, 1.0), 0.5, 1e-12);
        // df = 2 has a closed form: p = 1 - t / sqrt(2 + t^2).
        close(t_two_sided_p(3.0, 2.0), 1.0 - 3.0 / 11f64.sqrt(), 1e-12);
        close(t_cdf(2.0, 10.0), 1.0 - 0.07338803477074037 / 2.0, 1e-9);
        close(t_cdf(-2.0, 10.0), 0.07338803477074037 / 2.0, 1e-9);
        // Large df approaches the normal: P(|Z| >= 1.959964) = 0.05.
        close(t_two_sided_p(1.959964, 1e7), 0.05, 1e-6);
        assert_eq!(t_two_sided_p(f64::INFINITY, 3.0), 0.0);
    }

    #[test]
    fn welch_known_samples() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0];
        // Expected values from Python's `statistics` module and mpmath's `betainc`.
        let w = welch_t_test(&a, &b);
        close(w.mean_a, 3.0, 1e-12);
        close(w.mean_b, 7.0, 1e-12);
        close(w.diff, -4.0, 1e-12);
        close(w.t, -2.3763541031440183, 1e-10);
        close(w.df, 6.9722557297949335, 1e-9);
        close(w.p_two_sided, 0.04928433820673054, 1e-9);
        close(w.cohens_d, -1.3416407864998738, 1e-10);
        // Swapping the samples flips the signs only.
        let s = welch_t_test(&b, &a);
        close(s.t, -w.t, 1e-12);
        close(s.df, w.df, 1e-12);
        close(s.p_two_sided, w.p_two_sided, 1e-12);
    }

    #[test]
    fn welch_edge_cases() {
        let w = welch_t_test(&[1.0, 1.0, 1.0], &[1.0, 1.0]);
        assert_eq!((w.t, w.p_two_sided, w.cohens_d), (0.0, 1.0, 0.0));
        let w = welch_t_test(&[2.0, 2.0, 2.0], &[1.0, 1.0]);
        assert_eq!(w.t, f64::INFINITY);
        assert_eq!(w.p_two_sided, 0.0);
        assert_eq!(w.df, 3.0);
        let w = welch_t_test(&[1.0, 1.0], &[2.0, 2.0]);
        assert_eq!(w.t, f64::NEG_INFINITY);
        // One constant sample: the other's variance alone drives the test.
        let w = welch_t_test(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]);
        close(w.t, -2.0 / (1.0f64 / 3.0).sqrt(), 1e-12);
        close(w.df, 2.0, 1e-12);
        // Too few values: no test.
        let w = welch_t_test(&[1.0], &[1.0, 2.0, 3.0]);
        assert!(w.t.is_nan() && w.df.is_nan());
        assert_eq!(w.p_two_sided, 1.0);
        close(w.diff, -1.0, 1e-12);
        let w = welch_t_test(&[], &[]);
        assert_eq!(w.p_two_sided, 1.0);
    }

    #[test]
    fn bootstrap_ci_is_seeded_and_sensible() {
        let a: Vec<f64> = (0..200).map(|i| if i % 10 < 7 { 1.0 } else { 0.0 }).collect();
        let b: Vec<f64> = (0..200).map(|i| if i % 10 < 5 { 1.0 } else { 0.0 }).collect();
        let ci = bootstrap_diff_ci(&a, &b, 2000, 0.05, 7);
        assert_eq!(ci, bootstrap_diff_ci(&a, &b, 2000, 0.05, 7));
        assert_ne!(ci, bootstrap_diff_ci(&a, &b, 2000, 0.05, 8));
        // True difference 0.2; the normal-approximation half-width is about 0.093.
        assert!(ci.0 < 0.2 && 0.2 < ci.1, "{ci:?}");
        assert!(ci.0 > 0.05 && ci.1 < 0.35, "{ci:?}");
        // Constant samples give a degenerate interval at the true difference.
        assert_eq!(bootstrap_diff_ci(&[3.0; 5], &[1.0; 4], 100, 0.05, 1), (2.0, 2.0));
        assert!(bootstrap_diff_ci(&[], &[1.0], 100, 0.05, 1).0.is_nan());
    }

    #[test]
    fn quantile_interpolates() {
        let s = [0.0, 1.0, 2.0, 3.0, 4.0];
        close(quantile_sorted(&s, 0.5), 2.0, 1e-15);
        close(quantile_sorted(&s, 0.125), 0.5, 1e-15);
    }

    #[test]
    fn benjamini_hochberg_matches_hand_computation() {
        // p sorted: 0.01 0.02 0.03 0.04 0.20 (m = 5): p m / rank = 0.05 0.05 0.05 0.05 0.20,
        // already monotone. The NaN is left out.
        let q = benjamini_hochberg(&[0.04, 0.01, f64::NAN, 0.20, 0.03, 0.02]);
        for (got, want) in q.iter().zip([0.05, 0.05, f64::NAN, 0.20, 0.05, 0.05]) {
            if want.is_nan() { assert!(got.is_nan()) } else { close(*got, want, 1e-12) }
        }
        // Step-up monotonicity: 0.001 0.04 0.041 (m = 3) -> 0.003, min(0.06, 0.041) = 0.041, 0.041.
        let q = benjamini_hochberg(&[0.041, 0.001, 0.04]);
        close(q[0], 0.041, 1e-12);
        close(q[1], 0.003, 1e-12);
        close(q[2], 0.041, 1e-12);
        assert_eq!(benjamini_hochberg(&[0.9, 0.8]), vec![0.9, 0.9]);
    }

    #[test]
    fn hedges_g_known_value() {
        // The Welch example: d = -1.3416407864998738, J = 1 - 3 / (4 * 11 - 9) = 32 / 35.
        let (a, b) = ([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        let g = hedges_g(mean(&a), sample_var(&a), 5, mean(&b), sample_var(&b), 6);
        close(g, -1.3416407864998738 * 32.0 / 35.0, 1e-12);
        assert!(hedges_g(1.0, 0.0, 1, 0.0, 1.0, 5).is_nan());
        assert_eq!(hedges_g(1.0, 0.0, 3, 0.0, 0.0, 3), f64::INFINITY);
    }

    #[test]
    fn paired_bootstrap_is_seeded_and_pairs_items() {
        // b = a - 1 on every item: every resample's mean difference is exactly 1, however
        // different the items are (an unpaired bootstrap would give a wide interval).
        let a: Vec<f64> = (0..50).map(|i| (i % 7) as f64).collect();
        let b: Vec<f64> = a.iter().map(|x| x - 1.0).collect();
        assert_eq!(paired_bootstrap_ci(&a, &b, 500, 0.05, 3), (1.0, 1.0));
        let x: Vec<f64> = (0..200).map(|i| if i % 10 < 7 { 1.0 } else { 0.0 }).collect();
        let y: Vec<f64> = (0..200).map(|i| if i % 10 < 5 { 1.0 } else { 0.0 }).collect();
        let ci = paired_bootstrap_ci(&x, &y, 2000, 0.05, 7);
        assert_eq!(ci, paired_bootstrap_ci(&x, &y, 2000, 0.05, 7));
        assert!(ci.0 < 0.2 && 0.2 < ci.1 && ci.0 > 0.1, "{ci:?}");
        assert!(paired_bootstrap_ci(&[1.0], &[], 10, 0.05, 1).0.is_nan());
    }
}
