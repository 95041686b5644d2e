#!/usr/bin/env python3
"""Read TensorBoard event files the way TensorBoard itself does, and print them as JSON.

Usage: read_events.py PATH [PATH ...]

Each PATH is a run folder (all its event files are read) or one event file. It is
loaded with TensorBoard's EventAccumulator, keeping every event, and printed as

    {PATH: {"file_version": float,
            "scalars": {tag: [[step, value], ...]},
            "images": {tag: [{"step", "width", "height",
                              "png_width", "png_height", "png_color_type"}, ...]},
            "tensors": {tag: [step, ...]},
            "hparams": {tag: Experiment, SessionStartInfo or SessionEndInfo as a dict},
            "text": {tag: [[step, markdown], ...]},
            "layout": the custom-scalars Layout as a dict, or null}}

The hparams payloads are parsed with the HParams plugin's own parsers, which also
check the plugin data version and which payload each tag holds. The Rust integration tests use this to check that
probunet's event writer produces files TensorBoard reads.
"""

import json
import struct
import sys

from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HPARAMS_PARSERS = {
    metadata.EXPERIMENT_TAG: metadata.parse_experiment_plugin_data,
    metadata.SESSION_START_INFO_TAG: metadata.parse_session_start_info_plugin_data,
    metadata.SESSION_END_INFO_TAG: metadata.parse_session_end_info_plugin_data,
}


def png_header(data):
    """Width, height and colour type from a PNG's IHDR chunk."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height, _depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, color_type


def image_entry(event):
    png_width, png_height, png_color_type = png_header(event.encoded_image_string)
    return {
        "step": event.step,
        "width": event.width,
        "height": event.height,
        "png_width": png_width,
        "png_height": png_height,
        "png_color_type": png_color_type,
    }


def plugin_tags(acc, plugin):
    try:
        return acc.PluginTagToContent(plugin)
    except KeyError:
        return {}


def string_value(event):
    """The one string of a scalar string tensor (text, layout)."""
    return tensor_util.make_ndarray(event.tensor_proto).item()


def layout(acc):
    tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
    if tag not in plugin_tags(acc, custom_scalar_metadata.PLUGIN_NAME):
        return None
    proto = layout_pb2.Layout()
    proto.ParseFromString(string_value(acc.Tensors(tag)[0]))
    return json_format.MessageToDict(proto, preserving_proto_field_name=True)


def read(path):
    size_guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    acc = event_accumulator.EventAccumulator(path, size_guidance=size_guidance)
    acc.Reload()
    tags = acc.Tags()
    try:
        hparams_content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:
        hparams_content = {}
    return {
        "file_version": acc.file_version,
        "scalars": {
            tag: [[e.step, e.value] for e in acc.Scalars(tag)]
            for tag in tags[event_accumulator.SCALARS]
        },
        "images": {
            tag: [image_entry(e) for e in acc.Images(tag)]
            for tag in tags[event_accumulator.IMAGES]
        },
        "tensors": {
            tag: [e.step for e in acc.Tensors(tag)]
            for tag in tags[event_accumulator.TENSORS]
        },
        "hparams": {
            tag: json_format.MessageToDict(
                HPARAMS_PARSERS[tag](content), preserving_proto_field_name=True
            )
            for tag, content in hparams_content.items()
        },
        "text": {
            tag: [[e.step, string_value(e).decode()] for e in acc.Tensors(tag)]
            for tag in plugin_tags(acc, text_metadata.PLUGIN_NAME)
        },
        "layout": layout(acc),
    }


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    json.dump({path: read(path) for path in sys.argv[1:]}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
