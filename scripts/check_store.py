"""Checks a prepared store against the pickle it came from, read by Python's own pickle.

    check_store.py STORE_DIR PICKLE [PICKLE ...]

Every image and mask must equal numpy's values (images as float32, masks as 0/1), in the
files' item order, and the manifest's keys, patients and series UIDs must match.
"""
import json
import pickle
import sys

import numpy as np
from safetensors.numpy import load_file


def main(store, pickles):
    arrays = load_file(f"{store}/data.safetensors")
    manifest = json.load(open(f"{store}/manifest.json"))
    items = {}
    for path in pickles:
        with open(path, "rb") as f:
            items.update(pickle.load(f))
    keys = list(items)
    assert manifest["keys"] == keys, "keys differ"
    assert manifest["patients"] == [k.split("_", 1)[0] for k in keys], "patients differ"
    assert manifest["series_uids"] == [items[k].get("series_uid") for k in keys], "series UIDs differ"
    assert arrays["images"].shape[0] == len(keys)
    for i, key in enumerate(keys):
        image = np.asarray(items[key]["image"], dtype=np.float32)
        assert np.array_equal(arrays["images"][i, 0], image), f"image of {key}"
        for a, mask in enumerate(items[key]["masks"]):
            assert np.array_equal(arrays["masks"][i, a], np.asarray(mask).astype(np.uint8)), f"mask {a} of {key}"
    print(f"{len(keys)} items match")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
