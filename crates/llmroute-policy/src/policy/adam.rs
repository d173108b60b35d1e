//! Adam (Kingma and Ba, 2015) over the policy network's parameter tensors.

use super::network::{Gradients, PolicyNetwork};

/// Adam's hyper-parameters and moment estimates.
#[derive(Debug, Clone)]
pub struct Adam {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// Decoupled weight decay λ (AdamW, Loshchilov and Hutter, 2019): each step also applies
    /// `θ ← θ − lr · λ · θ` to the weight matrices, not to biases.
    pub weight_decay: f32,
    step: i32,
    first_moment: Vec<Vec<f32>>,
    second_moment: Vec<Vec<f32>>,
}

impl Adam {
    pub fn new(learning_rate: f32) -> Self {
        Self {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
            step: 0,
            first_moment: Vec::new(),
            second_moment: Vec::new(),
        }
    }

    /// Applies one update `θ ← θ − lr · m̂ / (√v̂ + ε)` with bias-corrected moments
    /// `m̂ = m / (1 − β₁ᵗ)`, `v̂ = v / (1 − β₂ᵗ)`.
    pub fn step(&mut self, network: &mut PolicyNetwork, gradients: &mut Gradients) {
        let mut params = parameter_slices(network);
        let grads = gradient_slices(gradients);
        if self.first_moment.is_empty() {
            self.first_moment = params.iter().map(|p| vec![0.0; p.len()]).collect();
            self.second_moment = self.first_moment.clone();
        }
        self.step += 1;
        let correction1 = 1.0 - self.beta1.powi(self.step);
        let correction2 = 1.0 - self.beta2.powi(self.step);

        for (index, (param, grad)) in params.iter_mut().zip(grads.iter()).enumerate() {
            if WEIGHT_MATRICES.contains(&index) && self.weight_decay > 0.0 {
                let shrink = 1.0 - self.learning_rate * self.weight_decay;
                param.iter_mut().for_each(|value| *value *= shrink);
            }
            let m = &mut self.first_moment[index];
            let v = &mut self.second_moment[index];
            for i in 0..param.len() {
                let g = grad[i];
                m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g;
                v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g * g;
                let m_hat = m[i] / correction1;
                let v_hat = v[i] / correction2;
                param[i] -= self.learning_rate * m_hat / (v_hat.sqrt() + self.epsilon);
            }
        }
    }
}

/// Positions of the weight matrices in [`parameter_slices`]: the preference encoder, the hidden
/// layer and the logit layer.
const WEIGHT_MATRICES: [usize; 3] = [0, 2, 4];

/// Mutable views of every trainable tensor, in a fixed order shared with [`gradient_slices`].
pub fn parameter_slices(network: &mut PolicyNetwork) -> Vec<&mut [f32]> {
    vec![
        network.pref_weight.as_slice_mut().expect("standard layout"),
        network.pref_bias.as_slice_mut().expect("standard layout"),
        network
            .hidden_weight
            .as_slice_mut()
            .expect("standard layout"),
        network.hidden_bias.as_slice_mut().expect("standard layout"),
        network
            .logit_weight
            .as_slice_mut()
            .expect("standard layout"),
        network.logit_bias.as_slice_mut().expect("standard layout"),
        network
            .value_weight
            .as_slice_mut()
            .expect("standard layout"),
        std::slice::from_mut(&mut network.value_bias),
    ]
}

/// Mutable views of every gradient tensor, in the order of [`parameter_slices`].
pub fn gradient_slices(gradients: &mut Gradients) -> Vec<&mut [f32]> {
    vec![
        gradients
            .pref_weight
            .as_slice_mut()
            .expect("standard layout"),
        gradients.pref_bias.as_slice_mut().expect("standard layout"),
        gradients
            .hidden_weight
            .as_slice_mut()
            .expect("standard layout"),
        gradients
            .hidden_bias
            .as_slice_mut()
            .expect("standard layout"),
        gradients
            .logit_weight
            .as_slice_mut()
            .expect("standard layout"),
        gradients
            .logit_bias
            .as_slice_mut()
            .expect("standard layout"),
        gradients
            .value_weight
            .as_slice_mut()
            .expect("standard layout"),
        std::slice::from_mut(&mut gradients.value_bias),
    ]
}
