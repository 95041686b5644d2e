//! Adam (Kingma & Ba), as `torch.optim.Adam` computes it, with state we can checkpoint:
//! tch's wrapper around libtorch's C++ Adam exposes no moments, so a resumed run would
//! restart them from zero and train differently from an uninterrupted one.
use std::collections::HashMap;
use tch::{Kind, TchError, Tensor};

#[derive(Debug)]
pub struct Adam {
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Updates taken so far (drives the bias correction).
    pub steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Adam {
    /// Adam over named parameters (names are only used to save and load the moments).
    pub fn new(params: Vec<(String, Tensor)>) -> Result<Self, TchError> {
        let zeros = || -> Result<Vec<Tensor>, TchError> {
            params
                .iter()
                .map(|(_, p)| Tensor::f_zeros_like(p)?.f_set_requires_grad(false))
                .collect()
        };
        let (exp_avg, exp_avg_sq) = (zeros()?, zeros()?);
        Ok(Self {
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    pub fn zero_grad(&mut self) -> Result<(), TchError> {
        for (_, p) in &self.params {
            let mut grad = p.f_grad()?;
            if grad.defined() {
                let _ = grad.f_detach_()?.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One update with learning rate `lr` from the gradients in place.
    pub fn step(&mut self, lr: f64) -> Result<(), TchError> {
        self.steps += 1;
        let bias1 = 1.0 - self.beta1.powi(self.steps as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.steps as i32)).sqrt();
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        tch::no_grad(|| {
            for (((_, p), m), v) in self
                .params
                .iter_mut()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let g = p.f_grad()?;
                if !g.defined() {
                    continue;
                }
                let _ = m.f_lerp_(&g, 1.0 - beta1)?;
                let _ = v.f_lerp_(&g.f_square()?, 1.0 - beta2)?;
                let denom = v.f_sqrt()?.f_div_scalar(bias2_sqrt)?.f_add_scalar(eps)?;
                let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(lr / bias1)?)?;
            }
            Ok(())
        })
    }

    /// The L2 norm of all gradients together (NaN or inf when any gradient is).
    pub fn grad_norm(&self) -> Result<Tensor, TchError> {
        let norms = self
            .params
            .iter()
            .map(|(_, p)| p.f_grad())
            .filter(|g| g.as_ref().map_or(true, Tensor::defined))
            .map(|g| g?.f_norm()?.f_square())
            .collect::<Result<Vec<Tensor>, TchError>>()?;
        if norms.is_empty() {
            return Ok(Tensor::from(0f32));
        }
        Tensor::f_stack(&norms, 0)?.f_sum(Kind::Float)?.f_sqrt()
    }

    /// The moments as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for ((name, _), (m, v)) in self
            .params
            .iter()
            .zip(self.exp_avg.iter().zip(&self.exp_avg_sq))
        {
            out.push((format!("exp_avg.{name}"), m.shallow_clone()));
            out.push((format!("exp_avg_sq.{name}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the moments saved by `state_tensors`; a missing or misshapen moment is an
    /// error naming it.
    pub fn load_state(
        &mut self,
        saved: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        for ((name, _), (m, v)) in self
            .params
            .iter()
            .zip(self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq))
        {
            for (prefix, dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let key = format!("{prefix}.{name}");
                let src = saved
                    .get(&key)
                    .ok_or_else(|| format!("optimiser state lacks {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!(
                        "optimiser state {key} has shape {:?}, the model {:?}",
                        src.size(),
                        dst.size()
                    ));
                }
                tch::no_grad(|| dst.f_copy_(src))
                    .map_err(|e| format!("optimiser state {key}: {e}"))?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_the_adam_update_by_hand() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut adam = Adam::new(vec![("p".into(), p.shallow_clone())]).unwrap();
        let (lr, b1, b2, eps) = (0.1, 0.9, 0.999, 1e-8);
        let (mut m, mut v, mut x) = ([0.0f64; 2], [0.0f64; 2], [1.0f64, -2.0]);
        for t in 1..=3 {
            adam.zero_grad().unwrap();
            // loss = sum(x^3) so the gradient is 3 x^2
            (&p * &p * &p).sum(Kind::Double).backward();
            adam.step(lr).unwrap();
            for i in 0..2 {
                let g = 3.0 * x[i] * x[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat_sqrt = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt();
                x[i] -= lr * m_hat / (v_hat_sqrt + eps);
            }
            for (i, &xi) in x.iter().enumerate() {
                assert!((p.double_value(&[i as i64]) - xi).abs() < 1e-12, "step {t}");
            }
        }
    }

    #[test]
    fn state_round_trips_and_refuses_a_misshapen_moment() {
        let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut a = Adam::new(vec![("w".into(), p.shallow_clone())]).unwrap();
        p.sum(Kind::Float).backward();
        a.step(0.01).unwrap();
        let saved: HashMap<String, Tensor> = a
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let q = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut b = Adam::new(vec![("w".into(), q.shallow_clone())]).unwrap();
        b.load_state(&saved, a.steps).unwrap();
        assert!(b.exp_avg[0].equal(&a.exp_avg[0]) && b.steps == 1);
        let r = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let mut c = Adam::new(vec![("w".into(), r)]).unwrap();
        let err = c.load_state(&saved, 1).unwrap_err();
        assert!(err.contains("exp_avg.w") && err.contains("[3]"), "{err}");
    }
}
