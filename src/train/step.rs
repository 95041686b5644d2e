//! One optimisation step's arithmetic: the ELBO with z from the posterior, its
//! gradients, and the logged terms read back in one transfer.
use super::events::StepStats;
use super::Adam;
use crate::model::{ElboTerms, ModelError, ProbUNet};
use tch::{nn, Device, Kind, Tensor};

/// The ELBO of one batch, its gradients, and the logged terms (loss, elbo, kl,
/// reconstruction, reg, gradient norm) read back in one transfer; the caller decides
/// whether to apply the update.
pub fn forward_backward(
    model: &ProbUNet,
    adam: &mut Adam,
    images: &Tensor,
    masks: &Tensor,
) -> Result<(ElboTerms, StepStats), ModelError> {
    let terms = model.elbo(images, masks)?;
    adam.zero_grad()?;
    terms.loss.f_backward()?;
    let grad_norm = adam.grad_norm()?;
    let logged = [
        &terms.loss,
        &terms.elbo,
        &terms.kl,
        &terms.reconstruction,
        &terms.reg,
        &grad_norm,
    ]
    .map(|t| t.f_to_kind(Kind::Double));
    let packed = Tensor::f_stack(&logged.into_iter().collect::<Result<Vec<_>, _>>()?, 0)?;
    let values = Vec::<f64>::try_from(packed.f_to_device(Device::Cpu)?)?;
    let stats = match values[..] {
        [loss, elbo, kl, reconstruction, reg, grad_norm] => StepStats {
            loss,
            elbo,
            kl,
            reconstruction,
            reg,
            grad_norm,
        },
        _ => unreachable!("six terms were stacked"),
    };
    Ok((terms, stats))
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
pub fn diagnose(stats: &StepStats, terms: &ElboTerms) -> String {
    let overflow = |name: &str, log_sigma: &Tensor| {
        let max = (log_sigma.f_abs())
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
    causes.extend(overflow("posterior", &terms.posterior.log_sigma));
    causes.extend(overflow("prior", &terms.prior.log_sigma));
    if causes.is_empty() && !stats.grad_norm.is_finite() {
        causes.push(format!("gradient norm = {}", stats.grad_norm));
    }
    if causes.is_empty() {
        causes.push(format!("loss = {}", stats.loss));
    }
    causes.join(", ")
}
