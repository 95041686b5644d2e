//! probunet's model against an independent PyTorch implementation written from
//! spec/model.md (scripts/torch_probunet.py): the same exported weights, image, mask and z
//! must give the same prior and posterior, logits and ELBO terms.
mod common;

use probunet::model::{ModelConfig, ProbUNet, Reduction};
use tch::{nn, Device, Kind, Tensor};

fn check_parity(config: ModelConfig, batch: i64, size: i64) {
    tch::manual_seed(20261127);
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ProbUNet::new(&vs.root(), config.clone()).unwrap();
    let weights = dir.path().join("weights.safetensors");
    vs.save(&weights).unwrap();

    let image = Tensor::rand([batch, 1, size, size], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([batch, 1, size, size], (Kind::Float, Device::Cpu))
        .gt(0.7)
        .to_kind(Kind::Float);
    let z = Tensor::randn([batch, config.latent_dim], (Kind::Float, Device::Cpu));
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("image", &image), ("mask", &mask), ("z", &z)], &inputs).unwrap();

    let ours = tch::no_grad(|| model.elbo_at(&image, &mask, &z)).unwrap();
    let out = dir.path().join("reference.safetensors");
    let config_json = serde_json::to_string(&config).unwrap();
    common::run_script(
        "parity.py",
        &[
            config_json.as_ref(),
            weights.as_os_str(),
            inputs.as_os_str(),
            out.as_os_str(),
        ],
    );
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();

    let checks = [
        ("prior_mu", ours.prior.mu.shallow_clone()),
        ("prior_sigma", ours.prior.sigma().unwrap()),
        ("posterior_mu", ours.posterior.mu.shallow_clone()),
        ("posterior_sigma", ours.posterior.sigma().unwrap()),
        ("logits", ours.logits.shallow_clone()),
        ("elbo", ours.elbo.shallow_clone()),
        ("kl", ours.kl.shallow_clone()),
        ("reconstruction", ours.reconstruction.shallow_clone()),
        ("reg", ours.reg.shallow_clone()),
        ("loss", ours.loss.shallow_clone()),
    ];
    for (name, tensor) in checks {
        let expected = &reference[name];
        assert_eq!(tensor.numel(), expected.numel(), "{name}: element count");
        let err = common::relative_error(&tensor, expected);
        assert!(err < 1e-4, "{name}: relative error {err:e} against PyTorch");
    }
}

#[test]
fn the_seed_model_matches_pytorch() {
    check_parity(ModelConfig::default(), 2, 128);
}

#[test]
fn a_non_default_model_matches_pytorch() {
    let config = ModelConfig {
        filters: vec![8, 16, 24],
        latent_dim: 6,
        fcomb_convs: 3,
        beta: 2.5,
        reconstruction: Reduction::BatchMean,
        log_sigma_clamp: Some(0.5),
        ..ModelConfig::default()
    };
    check_parity(config, 3, 32);
}
