//! `probunet export RUN --to seed-port|safetensors`: a run's weights for use outside
//! probunet, with a JSON of the model config beside them.
//!
//! `seed-port` renames every variable to the widely used PyTorch port's
//! (`ProbabilisticUnet(...).load_state_dict(safetensors.torch.load_file(F))` loads it);
//! `safetensors` keeps probunet's names (what `scripts/torch_probunet.py` loads).
use crate::eval::{load_trained, CheckpointChoice, EvalError};
use crate::model::ModelConfig;
use crate::model::CONVS_PER_BLOCK;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    SeedPort,
    Safetensors,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Eval(Box<EvalError>),
    #[error("{}: {why}", path.display())]
    Write { path: PathBuf, why: String },
    #[error("variable {0} has no name in the PyTorch port; this model cannot be exported to it")]
    Unmapped(String),
    #[error("{}: {why}", path.display())]
    Refused { path: PathBuf, why: String },
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
}

impl From<EvalError> for ExportError {
    fn from(e: EvalError) -> Self {
        ExportError::Eval(Box::new(e))
    }
}

/// What was written: the weights and the config JSON.
#[derive(Debug, Clone)]
pub struct Exported {
    pub weights: PathBuf,
    pub config: PathBuf,
    pub checkpoint: PathBuf,
    pub tensors: usize,
}

/// The PyTorch port's name of a probunet variable, or `None` for a name it has no place
/// for. Its U-Net blocks hold an average pool before the convolutions of every block but
/// the first and a ReLU after each; the prior's and posterior's encoders are one flat
/// `Sequential` of those blocks.
pub fn seed_port_name(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let n = CONVS_PER_BLOCK as usize;
    let num = |s: &str| s.parse::<usize>().ok();
    match parts[..] {
        ["unet", "down", level, conv, param] => {
            let (l, c) = (num(level)?, num(conv)?);
            let at = usize::from(l > 0) + 2 * c;
            Some(format!("unet.contracting_path.{l}.layers.{at}.{param}"))
        }
        ["unet", "up", level, conv, param] => {
            let c = num(conv)?;
            Some(format!(
                "unet.upsampling_path.{level}.conv_block.layers.{}.{param}",
                2 * c
            ))
        }
        [net @ ("prior" | "posterior"), "encoder", level, conv, param] => {
            let (l, c) = (num(level)?, num(conv)?);
            Some(format!(
                "{net}.encoder.layers.{}.{param}",
                l * (2 * n + 1) + 2 * c
            ))
        }
        [net @ ("prior" | "posterior"), "head", param] => Some(format!("{net}.conv_layer.{param}")),
        ["fcomb", "layers", k, param] => Some(format!("fcomb.layers.{}.{param}", 2 * num(k)?)),
        ["fcomb", "last", param] => Some(format!("fcomb.last_layer.{param}")),
        _ => None,
    }
}

/// The port's constructor arguments for `config` (the JSON written beside the weights),
/// plus probunet's own config for the record.
fn config_json(config: &ModelConfig, format: ExportFormat) -> serde_json::Value {
    let port = serde_json::json!({
        "input_channels": config.input_channels,
        "num_classes": config.num_classes,
        "num_filters": config.filters,
        "latent_dim": config.latent_dim,
        "no_convs_fcomb": config.fcomb_convs,
        "beta": config.beta,
    });
    let names = match format {
        ExportFormat::SeedPort => "seed-port",
        ExportFormat::Safetensors => "probunet",
    };
    serde_json::json!({ "names": names, "seed_port": port, "probunet": config })
}

pub fn export(
    run: &Path,
    checkpoint: &CheckpointChoice,
    format: ExportFormat,
    out: Option<PathBuf>,
) -> Result<Exported, ExportError> {
    let trained = load_trained(run, checkpoint, &crate::device::DeviceSpec::Cpu)?;
    let default_name = match format {
        ExportFormat::SeedPort => "export/seed-port.safetensors",
        ExportFormat::Safetensors => "export/probunet.safetensors",
    };
    let weights = out.unwrap_or_else(|| trained.run.path.join(default_name));
    let config = weights.with_extension("json");
    if config == weights {
        return Err(ExportError::Refused {
            path: weights,
            why: "the config is written beside the weights with the extension .json; give \
                  --out another extension, such as .safetensors"
                .into(),
        });
    }
    for path in [&weights, &config] {
        refuse_foreign(path)?;
    }
    let tensors = named_tensors(&trained, format)?;
    write_both(
        &weights,
        &config,
        &tensors,
        &config_json(&trained.experiment.model, format),
    )?;
    Ok(Exported {
        weights,
        config,
        checkpoint: trained.checkpoint().to_path_buf(),
        tensors: tensors.len(),
    })
}

/// Replaces only a previous export: a file whose JSON twin (or itself, for the twin) says
/// it was ours.
fn refuse_foreign(path: &Path) -> Result<(), ExportError> {
    if !path.exists() {
        return Ok(());
    }
    let twin = path.with_extension("json");
    let ours = std::fs::read_to_string(&twin)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("seed_port").is_some());
    match ours {
        true => Ok(()),
        false => Err(ExportError::Refused {
            path: path.to_path_buf(),
            why: "exists and is not a probunet export; choose another --out".into(),
        }),
    }
}

fn named_tensors(
    trained: &crate::eval::Trained,
    format: ExportFormat,
) -> Result<Vec<(String, Tensor)>, ExportError> {
    let mut tensors = Vec::new();
    for (name, tensor) in trained.variables() {
        let name = match format {
            ExportFormat::SeedPort => seed_port_name(&name).ok_or(ExportError::Unmapped(name))?,
            ExportFormat::Safetensors => name,
        };
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

fn write_both(
    weights: &Path,
    config: &Path,
    tensors: &[(String, Tensor)],
    json: &serde_json::Value,
) -> Result<(), ExportError> {
    let fail = |path: &Path, why: String| ExportError::Write {
        path: path.to_path_buf(),
        why,
    };
    if let Some(dir) = weights.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
    }
    // The JSON first: it marks the weights beside it as ours, so an export that dies
    // between the two leaves nothing a second export refuses to replace.
    crate::run::write_json(config, json)?;
    let tmp = weights.with_extension(format!("tmp-{}", std::process::id()));
    crate::run::safetensors::write(&tmp, tensors).map_err(|e| fail(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, weights).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(weights, e.to_string())
    })?;
    Ok(crate::run::sync_parent(weights)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_ports_modules() {
        let cases = [
            (
                "unet.down.0.2.weight",
                "unet.contracting_path.0.layers.4.weight",
            ),
            (
                "unet.down.2.0.bias",
                "unet.contracting_path.2.layers.1.bias",
            ),
            (
                "unet.up.1.1.weight",
                "unet.upsampling_path.1.conv_block.layers.2.weight",
            ),
            ("prior.encoder.0.1.weight", "prior.encoder.layers.2.weight"),
            (
                "posterior.encoder.1.0.bias",
                "posterior.encoder.layers.7.bias",
            ),
            (
                "posterior.encoder.2.2.weight",
                "posterior.encoder.layers.18.weight",
            ),
            ("prior.head.weight", "prior.conv_layer.weight"),
            ("fcomb.layers.2.bias", "fcomb.layers.4.bias"),
            ("fcomb.last.weight", "fcomb.last_layer.weight"),
        ];
        for (ours, port) in cases {
            assert_eq!(seed_port_name(ours).as_deref(), Some(port), "{ours}");
        }
        assert_eq!(seed_port_name("unet.sideways.0.weight"), None);
    }
}
