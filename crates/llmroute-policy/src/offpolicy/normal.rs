//! Quantiles of the standard normal distribution, for normal-approximation confidence intervals.

/// Quantile function `Φ⁻¹(p)` of the standard normal distribution, for `p ∈ (0, 1)`.
///
/// Peter J. Acklam's rational approximation: relative error below 1.15e-9 over `(0, 1)`, with a
/// central rational function on `[0.02425, 0.97575]` and a tail function in
/// `q = √(−2 ln p)` outside it. Returns −∞ at 0, +∞ at 1 and NaN outside `[0, 1]`.
pub fn standard_normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.02425;

    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// Two-sided critical value `z` of a normal-approximation interval at `confidence`:
/// `Φ⁻¹((1 + confidence) / 2)`, so that `mean ± z · std_error` covers the mean with that
/// probability.
pub(crate) fn two_sided_z(confidence: f64) -> f64 {
    standard_normal_quantile(0.5 + confidence / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_reference_values() {
        // Reference values of Φ⁻¹ to 9 decimals (R `qnorm`).
        let cases = [
            (0.5, 0.0),
            (0.9, 1.281_551_566),
            (0.975, 1.959_963_985),
            (0.995, 2.575_829_304),
            (0.01, -2.326_347_874),
            (0.001, -3.090_232_306),
            (1e-6, -4.753_424_309),
        ];
        for (p, expected) in cases {
            let z = standard_normal_quantile(p);
            assert!(
                (z - expected).abs() < 1e-8,
                "Φ⁻¹({p}) = {z}, expected {expected}"
            );
        }
    }

    #[test]
    fn quantile_is_odd_around_one_half() {
        for p in [0.001, 0.02, 0.1, 0.3, 0.45] {
            let sum = standard_normal_quantile(p) + standard_normal_quantile(1.0 - p);
            assert!(sum.abs() < 1e-9, "Φ⁻¹({p}) + Φ⁻¹(1 − {p}) = {sum}");
        }
    }

    #[test]
    fn quantile_edges() {
        assert_eq!(standard_normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(standard_normal_quantile(1.0), f64::INFINITY);
        assert!(standard_normal_quantile(1.5).is_nan());
        assert!(standard_normal_quantile(f64::NAN).is_nan());
    }

    #[test]
    fn two_sided_z_at_common_levels() {
        assert!((two_sided_z(0.95) - 1.959_963_985).abs() < 1e-8);
        assert!((two_sided_z(0.99) - 2.575_829_304).abs() < 1e-8);
        assert!((two_sided_z(0.90) - 1.644_853_627).abs() < 1e-8);
    }
}
