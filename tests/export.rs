//! `probunet export`: a run's weights in the real PyTorch port's own classes
//! (scripts/check_export.py, from `probunet::bench::seed_port`: ../shared/seed-port or
//! $PROBUNET_SEED_PORT) and, with probunet's names, in scripts/torch_probunet.py: the same
//! image, mask and z give the same prior, posterior and logits as probunet to 1e-4.
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

mod common;
use common::{run_err, run_ok, stderr};
use probunet::eval::{load_trained, CheckpointChoice};

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn exports_load_into_the_port_and_the_reimplementation_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let sets = [
        "model.filters=[8,16,24]",
        "model.latent_dim=3",
        "model.fcomb_convs=3",
        "train.steps=10",
    ];
    let mut args = vec!["train", spec.to_str().unwrap()];
    for set in &sets {
        args.extend(["--set", set]);
    }
    run_ok(dir.path(), &args);
    let run = common::only_run(dir.path());
    let port = dir.path().join("port.safetensors");
    let ours = dir.path().join("ours.safetensors");
    run_ok(
        dir.path(),
        &[
            "export",
            run.to_str().unwrap(),
            "--to",
            "seed-port",
            "--out",
            port.to_str().unwrap(),
        ],
    );
    run_ok(
        dir.path(),
        &[
            "export",
            run.to_str().unwrap(),
            "--to",
            "safetensors",
            "--out",
            ours.to_str().unwrap(),
        ],
    );
    let config = common::read_json(&port.with_extension("json"));
    assert_eq!(
        config["seed_port"]["num_filters"],
        serde_json::json!([8, 16, 24])
    );
    assert_eq!(config["seed_port"]["no_convs_fcomb"], 3);

    // probunet's own outputs for one image, mask and z.
    tch::manual_seed(7);
    let image = Tensor::rand([1, 1, 32, 32], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([1, 1, 32, 32], (Kind::Float, Device::Cpu))
        .gt(0.7)
        .to_kind(Kind::Float);
    let z = Tensor::randn([1, 3], (Kind::Float, Device::Cpu));
    let trained = load_trained(
        &run,
        &CheckpointChoice::Best,
        &probunet::device::DeviceSpec::Cpu,
    )
    .unwrap();
    let terms = tch::no_grad(|| trained.model.elbo_at(&image, &mask, &z)).unwrap();
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("image", &image), ("mask", &mask), ("z", &z)], &inputs).unwrap();
    let checks = |reference: &HashMap<String, Tensor>, against: &str| {
        for (name, tensor) in [
            ("prior_mu", terms.prior.mu.shallow_clone()),
            ("prior_sigma", terms.prior.sigma().unwrap()),
            ("posterior_mu", terms.posterior.mu.shallow_clone()),
            ("posterior_sigma", terms.posterior.sigma().unwrap()),
            ("logits", terms.logits.shallow_clone()),
        ] {
            let err = common::relative_error(&tensor, &reference[name]);
            assert!(
                err < 1e-4,
                "{name}: relative error {err:e} against {against}"
            );
        }
    };

    // probunet's names in the independent reimplementation.
    let out = dir.path().join("reimplementation.safetensors");
    let probunet_config = config["probunet"].to_string();
    common::run_script(
        "parity.py",
        &[
            probunet_config.as_ref(),
            ours.as_os_str(),
            inputs.as_os_str(),
            out.as_os_str(),
        ],
    );
    checks(&read(&out), "scripts/torch_probunet.py");

    // The port's names in the port's own classes.
    let Some(port_dir) = probunet::bench::seed_port() else {
        common::loud("export test: no ../shared/seed-port (or $PROBUNET_SEED_PORT): the real port's part is skipped");
        return;
    };
    let out = dir.path().join("port-out.safetensors");
    let config_path = port.with_extension("json");
    common::run_script(
        "check_export.py",
        &[
            port_dir.as_os_str(),
            port.as_os_str(),
            config_path.as_os_str(),
            inputs.as_os_str(),
            out.as_os_str(),
        ],
    );
    checks(&read(&out), "the PyTorch port");
}

#[test]
fn an_export_never_replaces_a_file_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    run_ok(
        dir.path(),
        &["train", spec.to_str().unwrap(), "--set", "train.steps=10"],
    );
    let run = common::only_run(dir.path());
    let mine = dir.path().join("mine.safetensors");
    std::fs::write(&mine, "my own file").unwrap();
    let out = run_err(
        dir.path(),
        &[
            "export",
            run.to_str().unwrap(),
            "--to",
            "seed-port",
            "--out",
            mine.to_str().unwrap(),
        ],
    );
    assert!(
        stderr(&out).contains("is not a probunet export"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "my own file");
    // An --out ending in .json would be its own config twin.
    let out = run_err(
        dir.path(),
        &[
            "export",
            run.to_str().unwrap(),
            "--to",
            "safetensors",
            "--out",
            "model.json",
        ],
    );
    assert!(
        stderr(&out).contains("model.json: the config is written beside the weights"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("model.json").exists());
    // An export killed after its config and before its weights: the next one goes
    // through.
    let config = run.join("export/probunet.json");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, r#"{"seed_port": null}"#).unwrap();
    run_ok(
        dir.path(),
        &["export", run.to_str().unwrap(), "--to", "safetensors"],
    );
    assert!(run.join("export/probunet.safetensors").is_file());
    // The default place, twice: the second replaces the first.
    for _ in 0..2 {
        run_ok(
            dir.path(),
            &["export", run.to_str().unwrap(), "--to", "seed-port"],
        );
    }
    assert!(run.join("export/seed-port.safetensors").is_file());
}
