//! Drawing one model from a policy's probabilities under the route's exploration setting, and
//! the order in which models are tried when one fails.

use llmroute_api::Exploration;
use rand::Rng;

/// One drawn action with its propensity `π₀(a | x, w)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Index in the policy's model order.
    pub index: usize,
    /// Probability that the exploration setting draws this index.
    pub propensity: f64,
}

/// Returns the index of the largest probability; ties go to the lowest index.
pub fn argmax(probabilities: &[f32]) -> usize {
    let mut best = 0;
    for (index, &p) in probabilities.iter().enumerate() {
        if p > probabilities[best] {
            best = index;
        }
    }
    best
}

/// Draws a model from non-empty `probabilities` under `exploration`.
pub fn choose(probabilities: &[f32], exploration: Exploration, rng: &mut impl Rng) -> Choice {
    let count = probabilities.len();
    let greedy = argmax(probabilities);
    match exploration {
        Exploration::Greedy => Choice {
            index: greedy,
            propensity: 1.0,
        },
        Exploration::Sample => {
            let total: f64 = probabilities.iter().map(|&p| f64::from(p.max(0.0))).sum();
            if total <= 0.0 || !total.is_finite() {
                return Choice {
                    index: greedy,
                    propensity: 1.0,
                };
            }
            let mut target = rng.random::<f64>() * total;
            let mut index = count - 1;
            for (k, &p) in probabilities.iter().enumerate() {
                target -= f64::from(p.max(0.0));
                if target < 0.0 {
                    index = k;
                    break;
                }
            }
            Choice {
                index,
                propensity: f64::from(probabilities[index].max(0.0)) / total,
            }
        }
        Exploration::EpsilonGreedy { epsilon } => {
            let index = if rng.random::<f64>() < epsilon {
                rng.random_range(0..count)
            } else {
                greedy
            };
            let uniform = epsilon / count as f64;
            let propensity = if index == greedy {
                1.0 - epsilon + uniform
            } else {
                uniform
            };
            Choice { index, propensity }
        }
    }
}

/// Orders model indices for retries: `first`, then the others by decreasing probability.
pub fn retry_order(probabilities: &[f32], first: usize) -> Vec<usize> {
    let mut rest: Vec<usize> = (0..probabilities.len()).filter(|&k| k != first).collect();
    rest.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    std::iter::once(first).chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn greedy_takes_argmax_with_propensity_one() {
        let mut rng = StdRng::seed_from_u64(1);
        let choice = choose(&[0.1, 0.7, 0.2], Exploration::Greedy, &mut rng);
        assert_eq!(choice.index, 1);
        assert_eq!(choice.propensity, 1.0);
    }

    #[test]
    fn sample_frequencies_match_propensities() {
        let mut rng = StdRng::seed_from_u64(2);
        let probabilities = [0.2f32, 0.5, 0.3];
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let choice = choose(&probabilities, Exploration::Sample, &mut rng);
            counts[choice.index] += 1;
            let expected = f64::from(probabilities[choice.index]);
            assert!((choice.propensity - expected).abs() < 1e-6);
        }
        for (k, &count) in counts.iter().enumerate() {
            let share = count as f64 / 20_000.0;
            let expected = f64::from(probabilities[k]);
            assert!((share - expected).abs() < 0.02, "model {k}: {share}");
        }
    }

    #[test]
    fn epsilon_greedy_propensities_sum_to_one() {
        let mut rng = StdRng::seed_from_u64(3);
        let probabilities = [0.1f32, 0.6, 0.3];
        let exploration = Exploration::EpsilonGreedy { epsilon: 0.3 };
        let mut seen = [None; 3];
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let choice = choose(&probabilities, exploration, &mut rng);
            seen[choice.index] = Some(choice.propensity);
            counts[choice.index] += 1;
        }
        let propensities: Vec<f64> = seen.iter().map(|p| p.expect("every model drawn")).collect();
        assert!((propensities.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((propensities[1] - 0.8).abs() < 1e-9);
        for (k, &count) in counts.iter().enumerate() {
            let share = count as f64 / 20_000.0;
            assert!((share - propensities[k]).abs() < 0.02, "model {k}: {share}");
        }
    }

    #[test]
    fn retry_order_follows_probability() {
        assert_eq!(retry_order(&[0.1, 0.5, 0.15, 0.25], 2), vec![2, 1, 3, 0]);
        assert_eq!(retry_order(&[0.5, 0.5], 1), vec![1, 0]);
    }
}
