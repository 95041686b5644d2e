"""Recomputes probunet's model outputs with the independent PyTorch implementation.

    parity.py CONFIG_JSON WEIGHTS INPUTS OUT

CONFIG_JSON is probunet's model config as JSON; WEIGHTS the safetensors file probunet
exported (its variable names); INPUTS a safetensors file with `image`, `mask` and `z`.
Writes OUT (safetensors, float64): prior/posterior mu and sigma, logits, and the ELBO terms.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_probunet import ProbUNet  # noqa: E402


def main(config_json, weights, inputs, out):
    config = json.loads(config_json)
    model = ProbUNet.from_config(config).double()
    state = {k: v.double() for k, v in load_file(weights).items()}
    model.load_state_dict(state, strict=True)
    x = {k: v.double() for k, v in load_file(inputs).items()}
    with torch.no_grad():
        terms = model.elbo(x["image"], x["mask"], x["z"])
    save_file({k: v.reshape(-1).double().contiguous() if v.dim() == 0 else v.double().contiguous()
               for k, v in terms.items()}, out)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
