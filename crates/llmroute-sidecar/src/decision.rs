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

/// Draws a model from `probabilities` under `exploration`, among the models whose `available`
/// entry is true. `available` has one entry per probability, false for a missing API key.
///
/// The propensity is the probability of the draw under that restriction, because the
/// off-policy evaluation of the logged events needs it. Under `sample` it is the policy's
/// probability renormalised over the available models. Under `epsilonGreedy` it is
/// `1 − ε + ε / n` for the greedy model and `ε / n` for each other, with `n` available models.
/// Returns `None` when no model is available.
pub fn choose(
    probabilities: &[f32],
    available: &[bool],
    exploration: Exploration,
    rng: &mut impl Rng,
) -> Option<Choice> {
    let candidates: Vec<usize> = probabilities
        .iter()
        .zip(available)
        .enumerate()
        .filter(|(_, (_, available))| **available)
        .map(|(k, _)| k)
        .collect();
    let &first = candidates.first()?;
    // The largest probability among the candidates. Ties go to the lowest index.
    let greedy = candidates.iter().copied().fold(first, |best, k| {
        if probabilities[k] > probabilities[best] {
            k
        } else {
            best
        }
    });
    let choice = match exploration {
        Exploration::Greedy => Choice {
            index: greedy,
            propensity: 1.0,
        },
        Exploration::Sample => {
            let weight = |k: usize| f64::from(probabilities[k].max(0.0));
            let total: f64 = candidates.iter().map(|&k| weight(k)).sum();
            if total <= 0.0 || !total.is_finite() {
                return Some(Choice {
                    index: greedy,
                    propensity: 1.0,
                });
            }
            let mut target = rng.random::<f64>() * total;
            let mut index = *candidates.last().expect("candidates is not empty");
            for &k in &candidates {
                target -= weight(k);
                if target < 0.0 {
                    index = k;
                    break;
                }
            }
            Choice {
                index,
                propensity: weight(index) / total,
            }
        }
        Exploration::EpsilonGreedy { epsilon } => {
            let count = candidates.len();
            let index = if rng.random::<f64>() < epsilon {
                candidates[rng.random_range(0..count)]
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
    };
    Some(choice)
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
        let choice = choose(&[0.1, 0.7, 0.2], &[true; 3], Exploration::Greedy, &mut rng).unwrap();
        assert_eq!(choice.index, 1);
        assert_eq!(choice.propensity, 1.0);
    }

    #[test]
    fn sample_frequencies_match_propensities() {
        let mut rng = StdRng::seed_from_u64(2);
        let probabilities = [0.2f32, 0.5, 0.3];
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let choice = choose(&probabilities, &[true; 3], Exploration::Sample, &mut rng).unwrap();
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
            let choice = choose(&probabilities, &[true; 3], exploration, &mut rng).unwrap();
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
    fn unavailable_models_are_never_drawn() {
        let mut rng = StdRng::seed_from_u64(4);
        let probabilities = [0.2f32, 0.5, 0.3];
        let available = [true, false, true];
        let greedy = choose(&probabilities, &available, Exploration::Greedy, &mut rng).unwrap();
        assert_eq!((greedy.index, greedy.propensity), (2, 1.0));
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let choice = choose(&probabilities, &available, Exploration::Sample, &mut rng).unwrap();
            counts[choice.index] += 1;
            // Renormalised over models 0 and 2: 0.2 / 0.5 and 0.3 / 0.5.
            let expected = [0.4, 0.0, 0.6][choice.index];
            assert!((choice.propensity - expected).abs() < 1e-6, "{choice:?}");
        }
        assert_eq!(counts[1], 0);
        assert!(
            (counts[0] as f64 / 20_000.0 - 0.4).abs() < 0.02,
            "{counts:?}"
        );
        let exploration = Exploration::EpsilonGreedy { epsilon: 0.3 };
        let mut seen = [None; 3];
        for _ in 0..20_000 {
            let choice = choose(&probabilities, &available, exploration, &mut rng).unwrap();
            seen[choice.index] = Some(choice.propensity);
        }
        // Two available models: 1 − 0.3 + 0.15 for the greedy one, 0.15 for the other.
        assert_eq!(seen[1], None);
        assert!((seen[2].unwrap() - 0.85).abs() < 1e-9, "{seen:?}");
        assert!((seen[0].unwrap() - 0.15).abs() < 1e-9, "{seen:?}");
    }

    #[test]
    fn no_available_model_draws_nothing() {
        let mut rng = StdRng::seed_from_u64(5);
        for exploration in [
            Exploration::Greedy,
            Exploration::Sample,
            Exploration::EpsilonGreedy { epsilon: 0.1 },
        ] {
            assert_eq!(
                choose(&[0.5, 0.5], &[false, false], exploration, &mut rng),
                None
            );
        }
    }

    #[test]
    fn retry_order_follows_probability() {
        assert_eq!(retry_order(&[0.1, 0.5, 0.15, 0.25], 2), vec![2, 1, 3, 0]);
        assert_eq!(retry_order(&[0.5, 0.5], 1), vec![1, 0]);
    }
}
