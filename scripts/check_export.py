"""Runs weights that `probunet export --to seed-port` wrote in the PyTorch port's own
classes, and writes what the port computes.

    check_export.py PORT_DIR WEIGHTS CONFIG_JSON INPUTS OUT

PORT_DIR holds the port's probabilistic_unet.py (e.g. ../shared/seed-port); WEIGHTS and
CONFIG_JSON are the export; INPUTS a safetensors file with `image`, `mask` and `z`.
Loads the weights with `load_state_dict(strict=True)` into
`ProbabilisticUnet(**config["seed_port"])` and writes OUT (safetensors, float64): prior and
posterior mu and sigma, and the logits of fcomb at `z`.
"""
import json
import sys
import types

import torch
from safetensors.torch import load_file, save_file


def import_port(port_dir):
    # The port's utils.py imports matplotlib at the top to plot; it is not needed here.
    if "matplotlib" not in sys.modules:
        stub = types.ModuleType("matplotlib")
        stub.pyplot = types.ModuleType("matplotlib.pyplot")
        sys.modules["matplotlib"] = stub
        sys.modules["matplotlib.pyplot"] = stub.pyplot
    sys.path.insert(0, port_dir)
    from probabilistic_unet import ProbabilisticUnet

    return ProbabilisticUnet


def main(port_dir, weights, config_json, inputs, out):
    ProbabilisticUnet = import_port(port_dir)
    config = json.load(open(config_json))["seed_port"]
    model = ProbabilisticUnet(**config).double().eval()
    state = {k: v.double() for k, v in load_file(weights).items()}
    model.load_state_dict(state, strict=True)
    x = {k: v.double() for k, v in load_file(inputs).items()}
    with torch.no_grad():
        model.forward(x["image"], x["mask"], training=True)
        prior = model.prior_latent_space.base_dist
        posterior = model.posterior_latent_space.base_dist
        logits = model.fcomb.forward(model.unet_features, x["z"])
    results = {
        "prior_mu": prior.loc,
        "prior_sigma": prior.scale,
        "posterior_mu": posterior.loc,
        "posterior_sigma": posterior.scale,
        "logits": logits,
    }
    save_file({k: v.double().contiguous() for k, v in results.items()}, out)


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
