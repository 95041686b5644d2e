#!/usr/bin/env python3
"""Writes the pickle fixtures that tests/pickle_fixtures.rs reads.

Each `NAME.pickle` in tests/fixtures/pickle/ gets a `NAME.json` beside it holding what the
Rust reader must produce: `items` for a LIDC file, `arrays` for a dict of arrays, or
`error` for a file it must refuse. Good files are written by Python's own pickle and numpy,
across protocols 2-5, both numpy module layouts, dtypes, byte orders and memory orders.
Output is deterministic: fixed seed, fixed item order.

Usage: .venv/bin/python scripts/make_pickle_fixtures.py [OUT_DIR]
       .venv/bin/python scripts/make_pickle_fixtures.py --lidc-shaped ITEMS PATH [PROTOCOL]

The second form writes one large LIDC-shaped file for benchmarks: ITEMS slices of
128x128 float32 images with 4 uint8 masks each (15,000 items make about 2 GB), the way
the published data_lidc.pickle is laid out, with Python's default protocol unless given.

Never unpickle the bad_forbidden_* files: they name os.system and builtins.eval.
"""

import io
import json
import pickle
import pickletools
import sys
import types
from pathlib import Path

import numpy as np

OUT = (
    Path(sys.argv[1])
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--")
    else Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pickle"
)
SHAPE = (16, 16)
MASKS = 4
SEED = 20240517
KEYS = [
    ("LIDC-IDRI-0001_slice012", "1.3.6.1.4.1.14519.5.2.1.6279.6001.101"),
    ("LIDC-IDRI-0001_slice013", "1.3.6.1.4.1.14519.5.2.1.6279.6001.101"),
    ("LIDC-IDRI-0042_slice007", "1.3.6.1.4.1.14519.5.2.1.6279.6001.942"),
]


class Numpy1Pickler(pickle._Pickler):
    """Writes numpy's globals under numpy 1.x's `numpy.core.*` modules.

    numpy 2.x moved them to `numpy._core.*`; files written by numpy 1.x name the old
    modules, so this rewrites only the module name, exactly where pickle writes it.
    """

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if not module.startswith("numpy._core."):
            super().save_global(obj, name)
            return
        module = "numpy.core." + module[len("numpy._core.") :]
        name = name or obj.__qualname__
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    # The dispatch table holds the base class's function for plain functions such as
    # numpy's _frombuffer, so point it at the override.
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


def dumps(obj, protocol, numpy1=False):
    if not numpy1:
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    Numpy1Pickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def base_items(rng, shapes=None):
    """Items with images in [0, 1] that float32 holds exactly, so every dtype gives the
    same expected values, and one all-zero mask object shared by every item."""
    zeros = np.zeros(SHAPE, np.uint8)
    items = []
    for i, (key, uid) in enumerate(KEYS):
        shape = shapes[i] if shapes else SHAPE
        image = (rng.integers(0, 65, shape) / 64).astype(np.float32)
        masks = [(rng.random(shape) < 0.3).astype(np.uint8) for _ in range(MASKS - 1)]
        masks.insert(i % MASKS, zeros if shape == SHAPE else np.zeros(shape, np.uint8))
        items.append({"key": key, "uid": uid, "image": image, "masks": masks})
    return items


def order_of(array):
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def convert(items, image_dtype, image_order, mask_dtype, mask_orders, drop_uid=()):
    """The pickled dict for `items` in the given layout. Conversions are cached by
    object so a mask shared in `items` stays one shared (memoised) object."""
    cache = {}

    def conv(array, dtype, order):
        if id(array) not in cache:
            cache[id(array)] = np.array(array, dtype=dtype, order=order)
        return cache[id(array)]

    data = {}
    for item in items:
        value = {
            "image": conv(item["image"], image_dtype, image_order),
            "masks": [
                conv(m, mask_dtype, mask_orders[j % len(mask_orders)])
                for j, m in enumerate(item["masks"])
            ],
        }
        if item["key"] not in drop_uid:
            value["series_uid"] = item["uid"]
        data[item["key"]] = value
    return data


def expected_lidc(data):
    items = []
    for key, value in data.items():
        image, masks = value["image"], value["masks"]
        items.append(
            {
                "key": key,
                "patient": key.split("_", 1)[0],
                "series_uid": value.get("series_uid"),
                "shape": list(image.shape),
                "image_dtype": image.dtype.str,
                "image_order": order_of(image),
                "image": [float(v) for v in image.ravel(order="C")],
                "mask_dtypes": [m.dtype.str for m in masks],
                "mask_orders": [order_of(m) for m in masks],
                "masks": ["".join(str(int(v)) for v in m.ravel(order="C")) for m in masks],
            }
        )
    return {"expected_masks": MASKS, "items": items}


def expected_arrays(data):
    arrays, seen = {}, {}
    for name, array in data.items():
        if id(array) in seen:
            arrays[name] = {"same_as": seen[id(array)]}
            continue
        seen[id(array)] = name
        arrays[name] = {
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "order": order_of(array),
            "values": [float(v) for v in array.ravel(order="C")],
        }
    return {"arrays": arrays}


def arrays_dict(rng, with_empty):
    """Arrays beyond the LIDC layout: 0-3 dimensions, every dtype, Fortran 3-D."""
    cube = np.array(np.arange(24).reshape(2, 3, 4) / 8, dtype=">f4", order="F")
    data = {
        "cube": cube,
        "vector": (rng.integers(-64, 65, 5) / 16).astype("<f8"),
        "scalar": np.array(0.75, dtype=">f8"),
        "flags": np.array(rng.random((3, 2)) < 0.5, order="F"),
        "bytes_u1": (rng.random((2, 2)) < 0.5).astype(np.uint8),
        "cube_again": cube,
    }
    if with_empty:
        # Protocol 2 pickles empty bytes as builtins.bytes(), which the reader refuses.
        data["empty"] = np.zeros((0, 3), dtype="<f4")
    return data


def opcode_offset(raw, predicate):
    """Offset of the first opcode for which predicate(name, arg, history) holds."""
    history = []
    for opcode, arg, pos in pickletools.genops(raw):
        history.append((opcode.name, arg))
        if predicate(opcode.name, arg, history):
            return pos
    raise ValueError("opcode not found")


def truncation_offset(raw, cut):
    """Offset of the opcode a reader is decoding when input ends at `cut`."""
    return max(pos for _, _, pos in pickletools.genops(raw) if pos <= cut)


class Evil:
    """Pickles as a call of builtins.eval; only ever dumped here, never loaded."""

    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.pickle"):
        old.unlink()
    for old in OUT.glob("*.json"):
        old.unlink()
    rng = np.random.default_rng(SEED)
    files = {}

    def good(fixture, raw, expected):
        files[fixture] = (raw, expected)

    def bad(fixture, raw, **error):
        files[fixture] = (raw, error)

    items = base_items(rng)
    layouts = [
        ("lidc_p2_np1", 2, True, "<f8", "C", "u1", "C", ()),
        ("lidc_p2_np2", 2, False, ">f4", "C", "<f8", "C", ()),
        ("lidc_p3_np2", 3, False, "<f4", "F", "?", "CF", ()),
        ("lidc_p4_np1", 4, True, ">f8", "F", ">f8", "F", ()),
        ("lidc_p4_np2", 4, False, ">f4", "C", "<f4", "CF", ()),
        ("lidc_p5_np1", 5, True, "<f8", "F", "?", "F", ()),
        ("lidc_p5_np2", 5, False, "<f4", "C", "u1", "FC", (KEYS[2][0],)),
    ]
    for name, protocol, numpy1, image_dtype, image_order, mask_dtype, orders, drop in layouts:
        data = convert(items, image_dtype, image_order, mask_dtype, orders, drop)
        good(name, dumps(data, protocol, numpy1), expected_lidc(data))

    for name, protocol, numpy1, with_empty in [
        ("arrays_p2_np1", 2, True, False),
        ("arrays_p4_np2", 4, False, True),
        ("arrays_p5_np2", 5, False, True),
    ]:
        data = arrays_dict(np.random.default_rng(SEED + protocol), with_empty)
        good(name, dumps(data, protocol, numpy1), expected_arrays(data))

    standard = convert(items, "<f4", "C", "u1", "C")
    keys = [key for key, _ in KEYS]

    raw = dumps(standard, 3)
    cut = len(raw) // 2
    bad("bad_truncated", raw[:cut], error="Truncated", offset=truncation_offset(raw, cut))
    bad("bad_not_a_pickle", b"LIDC crops: see data_lidc.pickle\n", error="NotAPickle", found=ord("L"))
    bad("bad_top_list", dumps(list(standard.values()), 4), error="NotADict", found="list")
    bad("bad_empty_dict", dumps({}, 4), error="Empty")

    no_masks = convert(items, "<f4", "C", "u1", "C")
    del no_masks[keys[1]]["masks"]
    bad("bad_no_masks", dumps(no_masks, 4), error="MissingField", key=keys[1], field="masks")

    three = convert(items, "<f4", "C", "u1", "C")
    three[keys[2]]["masks"].pop()
    bad("bad_three_masks", dumps(three, 4), error="MaskCount", key=keys[2], expected=4, found=3)

    mixed_items = base_items(np.random.default_rng(SEED), shapes=[SHAPE, SHAPE, (16, 12)])
    mixed = convert(mixed_items, "<f4", "C", "u1", "C")
    bad(
        "bad_mixed_shapes",
        dumps(mixed, 4),
        error="ShapeMismatch",
        key=keys[2],
        shape=[16, 12],
        first_key=keys[0],
        first_shape=list(SHAPE),
    )

    nan = convert(items, "<f4", "C", "u1", "C")
    nan[keys[1]]["image"][3, 5] = np.nan
    bad("bad_nan_pixel", dumps(nan, 4), error="NonFinite", key=keys[1], position=[3, 5])

    two = convert(items, "<f4", "C", "u1", "C")
    two[keys[0]]["masks"][2] = two[keys[0]]["masks"][2].copy()
    two[keys[0]]["masks"][2][7, 1] = 2
    bad(
        "bad_non_binary_mask",
        dumps(two, 5),
        error="NotBinary",
        key=keys[0],
        mask=2,
        position=[7, 1],
        value=2.0,
    )

    # Written by hand: os.system('echo pwned') as protocol 2 would call it.
    system = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwnedq\x00\x85R."
    bad("bad_forbidden_global", system, error="ForbiddenGlobal", offset=2, module="os", name="system")

    evil = convert(items, "<f4", "C", "u1", "C")
    evil[keys[1]]["image"] = Evil()
    raw = dumps(evil, 4)
    offset = opcode_offset(
        raw,
        lambda name, _, history: name == "STACK_GLOBAL"
        and [arg for _, arg in history[-5:-1:2]] == ["builtins", "eval"],
    )
    bad(
        "bad_forbidden_global_nested",
        raw,
        error="ForbiddenGlobal",
        offset=offset,
        module="builtins",
        name="eval",
    )

    total = 0
    for name, (raw, expected) in sorted(files.items()):
        (OUT / f"{name}.pickle").write_bytes(raw)
        text = json.dumps(expected, separators=(",", ":")) + "\n"
        (OUT / f"{name}.json").write_text(text)
        total += len(raw) + len(text)
    print(f"wrote {len(files)} fixtures ({total} bytes) to {OUT}")


def lidc_shaped(items, path, protocol=pickle.DEFAULT_PROTOCOL):
    """A benchmark-sized file: lesion crops of 128x128 with 4 masks, ~128 KiB per item."""
    rng = np.random.default_rng(SEED)
    data = {}
    yy, xx = np.mgrid[:128, :128]
    for i in range(items):
        patient, slice_ = divmod(i, 12)
        image = rng.random((128, 128), dtype=np.float32)
        r = rng.uniform(4, 20)
        masks = [((yy - 64) ** 2 + (xx - 64) ** 2 < (r * rng.uniform(0.8, 1.2)) ** 2).astype(np.uint8) for _ in range(MASKS)]
        if rng.random() < 0.3:
            masks[rng.integers(MASKS)][:] = 0
        data[f"LIDC-IDRI-{patient:04d}_slice{slice_:03d}"] = {
            "image": image,
            "masks": masks,
            "series_uid": f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{patient}",
        }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    print(f"wrote {items} items to {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--lidc-shaped":
        lidc_shaped(int(sys.argv[2]), sys.argv[3], *(int(p) for p in sys.argv[4:5]))
    else:
        main()
