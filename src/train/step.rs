//! One optimisation step's arithmetic: the ELBO with z from the posterior, its
//! gradients, and the logged terms read back in one transfer.
use super::events::StepStats;
use super::Adam;
use crate::model::parts;
use crate::model::{ElboTerms, ModelError, ProbUNet, Share};
use tch::{nn, Device, Kind, TchError, Tensor};

/// The ELBO of one batch, its gradients, and the logged terms (loss, elbo, kl,
/// reconstruction, reg, gradient norm) read back in one transfer; the caller decides
/// whether to apply the update. On the CPU the batch goes through in parts
/// ([`ProbUNet::part_images`]); the terms returned are each part's, for [`diagnose`],
/// and the logged values the whole batch's.
pub fn forward_backward(
    model: &ProbUNet,
    adam: &mut Adam,
    images: &Tensor,
    masks: &Tensor,
) -> Result<(Vec<ElboTerms>, StepStats), ModelError> {
    let most = model.part_images(images)?;
    let b = images.size()[0];
    // Drawn for the whole batch first, as one unsplit ELBO draws it, so the parts' latents
    // are the ones the whole batch would have had.
    let eps = Tensor::f_randn(
        [b, model.config().latent_dim],
        (Kind::Float, images.device()),
    )?;
    forward_backward_in_parts(model, adam, images, masks, &eps, most)
}

/// [`forward_backward`] in parts of at most `most` images, with the posterior's noise
/// `eps` (`[B, latent_dim]`) given.
fn forward_backward_in_parts(
    model: &ProbUNet,
    adam: &mut Adam,
    images: &Tensor,
    masks: &Tensor,
    eps: &Tensor,
    most: i64,
) -> Result<(Vec<ElboTerms>, StepStats), ModelError> {
    let b = images.size().first().copied().unwrap_or(0);
    adam.zero_grad()?;
    let mut shares = Vec::new();
    for (i, (first, part)) in parts::split(b, most).into_iter().enumerate() {
        let share = Share {
            batch: b,
            with_reg: i == 0,
        };
        let terms = model.elbo_share(
            &images.f_narrow(0, first, part)?,
            &masks.f_narrow(0, first, part)?,
            &eps.f_narrow(0, first, part)?,
            share,
        )?;
        terms.loss.f_backward()?;
        shares.push(terms);
    }
    let stats = read_back(&shares, &adam.grad_norm()?)?;
    Ok((shares, stats))
}

/// The batch's logged terms, each the sum of its parts' shares, and the gradient norm, read
/// back in one transfer.
fn read_back(shares: &[ElboTerms], grad_norm: &Tensor) -> Result<StepStats, TchError> {
    let term = |of: fn(&ElboTerms) -> &Tensor| -> Result<Tensor, TchError> {
        let parts: Vec<&Tensor> = shares.iter().map(of).collect();
        Tensor::f_stack(&parts, 0)?.f_sum(Kind::Double)
    };
    let logged = [
        term(|t| &t.loss)?,
        term(|t| &t.elbo)?,
        term(|t| &t.kl)?,
        term(|t| &t.reconstruction)?,
        term(|t| &t.reg)?,
        grad_norm.f_to_kind(Kind::Double)?,
    ];
    let packed = Tensor::f_stack(&logged, 0)?;
    let values = Vec::<f64>::try_from(packed.f_to_device(Device::Cpu)?)?;
    match values[..] {
        [loss, elbo, kl, reconstruction, reg, grad_norm] => Ok(StepStats {
            loss,
            elbo,
            kl,
            reconstruction,
            reg,
            grad_norm,
        }),
        _ => unreachable!("six terms were stacked"),
    }
}

/// A store's variables by name, in name order: what Adam and the checkpoints iterate, so
/// both see the same order on every run.
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Names the term that went non-finite: the first of kl, reconstruction, reg and the
/// gradients, and whether a sigma overflowed float32.
pub fn diagnose(stats: &StepStats, parts: &[ElboTerms]) -> String {
    let overflow = |name: &str, of: fn(&ElboTerms) -> &Tensor| {
        let log_sigmas: Vec<&Tensor> = parts.iter().map(of).collect();
        let max = Tensor::f_cat(&log_sigmas, 0)
            .and_then(|t| t.f_abs())
            .and_then(|t| t.f_max())
            .and_then(|t| t.f_double_value(&[]))
            .unwrap_or(f64::NAN);
        (!max.is_finite() || max > 88.0)
            .then(|| format!("{name} sigma overflow (max |log sigma| {max:.1})"))
    };
    let mut causes: Vec<String> = [
        ("kl", stats.kl),
        ("reconstruction", stats.reconstruction),
        ("reg", stats.reg),
    ]
    .iter()
    .filter(|(_, v)| !v.is_finite())
    .map(|(name, v)| format!("{name} = {v}"))
    .collect();
    causes.extend(overflow("posterior", |t| &t.posterior.log_sigma));
    causes.extend(overflow("prior", |t| &t.prior.log_sigma));
    if causes.is_empty() && !stats.grad_norm.is_finite() {
        causes.push(format!("gradient norm = {}", stats.grad_norm));
    }
    if causes.is_empty() {
        causes.push(format!("loss = {}", stats.loss));
    }
    causes.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Reduction};

    /// The gradients and logged terms of one batch split into parts of at most `most`.
    fn in_parts(
        model: &ProbUNet,
        vs: &nn::VarStore,
        images: &Tensor,
        masks: &Tensor,
        most: i64,
    ) -> (Vec<Tensor>, StepStats) {
        let mut adam = Adam::new(named_variables(vs)).unwrap();
        let eps = Tensor::from_slice(&[0.3f32, -1.2, 0.8, 0.1, -0.5, 1.5, 0.0, -0.7, 2.0, 0.4])
            .view([5, 2]);
        let (_, stats) =
            forward_backward_in_parts(model, &mut adam, images, masks, &eps, most).unwrap();
        let grads = named_variables(vs)
            .iter()
            .map(|(_, p)| p.grad().copy())
            .collect();
        (grads, stats)
    }

    #[test]
    fn a_batch_in_parts_has_the_gradients_and_terms_of_the_whole_batch() {
        for reconstruction in [Reduction::BatchMean, Reduction::Sum] {
            let config = ModelConfig {
                filters: vec![8, 16, 32],
                reconstruction,
                ..ModelConfig::default()
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let model = ProbUNet::new(&vs.root(), config).unwrap();
            // Fixed inputs, not the global generator's, which other tests share.
            let pixels: Vec<f32> = (0..5 * 32 * 32)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let images = Tensor::from_slice(&pixels).view([5, 1, 32, 32]);
            let masks = images.gt(0.2).to_kind(Kind::Float);
            let (whole, whole_stats) = in_parts(&model, &vs, &images, &masks, 5);
            for most in [1, 2, 3] {
                let (parts, stats) = in_parts(&model, &vs, &images, &masks, most);
                // Float32 gradients of a deep net through other kernels (batches of 1
                // against 5) differ by up to ~1e-3 of their largest element; a part
                // weighted wrongly is off by its whole share. The terms below are tighter.
                for (a, b) in whole.iter().zip(&parts) {
                    let scale = a.abs().max().double_value(&[]).max(1e-12);
                    let diff = (a - b).abs().max().double_value(&[]);
                    assert!(
                        diff <= 1e-2 * scale,
                        "{reconstruction:?} most {most}: {diff} of {scale}"
                    );
                }
                for (x, y) in [
                    (whole_stats.loss, stats.loss),
                    (whole_stats.kl, stats.kl),
                    (whole_stats.reconstruction, stats.reconstruction),
                    (whole_stats.reg, stats.reg),
                    (whole_stats.grad_norm, stats.grad_norm),
                ] {
                    assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} against {y}");
                }
            }
        }
    }
}
