#!/usr/bin/env python3
"""Serve LOGDIR with the real TensorBoard on a free loopback port and print, as JSON,
what its HTTP data API answers: what the dashboards a user opens are built from.

Usage: tensorboard_api.py LOGDIR RUN [RUN ...]

Waits until TensorBoard lists every RUN (names relative to LOGDIR), then prints

    {"url": str,
     "runs": [run, ...],
     "plugins": {plugin: enabled},
     "scalar_tags": {run: [tag, ...]},
     "scalars": {run: {tag: [[step, value], ...]}},
     "layout": the custom-scalars layout,
     "image_tags": {run: [tag, ...]},
     "images": {run: {tag: [{"step", "width", "height"}]}}   (each PNG fetched and read),
     "text": {run: {tag: [[step, html], ...]}},
     "hparams": the HParams experiment,
     "session_groups": the HParams session groups}

The integration tests use it to check probunet's event files as TensorBoard serves them,
not only as its event reader reads them.
"""

import json
import struct
import sys
import time
import urllib.parse
import urllib.request

from tensorboard import program

TIMEOUT_S = 120
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def get(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data)
    if body is not None:
        # TensorBoard refuses a POST without it (its XSRF protection).
        request.add_header("X-XSRF-Protected", "1")
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def get_json(url, path, body=None):
    return json.loads(get(url, path, body))


def query(path, **params):
    return path + "?" + urllib.parse.urlencode(params)


def wait_for_runs(url, runs):
    """Polls until TensorBoard's loader has read every run, or fails after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        listed = get_json(url, "/data/runs")
        if all(run in listed for run in runs):
            return listed
        if time.monotonic() > deadline:
            sys.exit(f"TensorBoard lists {listed}, not all of {runs}")
        time.sleep(0.2)


def png_size(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def scalars(url, tags):
    return {
        run: {
            tag: [[p[1], p[2]] for p in get_json(url, query("/data/plugin/scalars/scalars", run=run, tag=tag))]
            for tag in run_tags
        }
        for run, run_tags in tags.items()
    }


def images(url, tags):
    out = {}
    for run, run_tags in tags.items():
        out[run] = {}
        for tag in run_tags:
            entries = get_json(url, query("/data/plugin/images/images", run=run, tag=tag, sample=0))
            out[run][tag] = []
            for entry in entries:
                png = get(url, "/data/plugin/images/individualImage?" + entry["query"])
                width, height = png_size(png)
                out[run][tag].append({"step": entry["step"], "width": width, "height": height})
    return out


def text(url, tags):
    return {
        run: {
            tag: [[p["step"], p["text"]] for p in get_json(url, query("/data/plugin/text/text", run=run, tag=tag))]
            for tag in run_tags
        }
        for run, run_tags in tags.items()
    }


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    logdir, runs = sys.argv[1], sys.argv[2:]
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", logdir, "--host", "127.0.0.1", "--port", "0"])
    url = board.launch()
    listed = wait_for_runs(url, runs)
    scalar_tags = {run: sorted(tags) for run, tags in get_json(url, "/data/plugin/scalars/tags").items()}
    image_tags = {run: sorted(tags) for run, tags in get_json(url, "/data/plugin/images/tags").items()}
    text_tags = {run: sorted(tags) for run, tags in get_json(url, "/data/plugin/text/tags").items()}
    experiment = get_json(url, "/data/plugin/hparams/experiment", {"experimentName": ""})
    groups = get_json(
        url,
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ALL_STATUSES,
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 1000,
        },
    )
    json.dump(
        {
            "url": url,
            "runs": listed,
            "plugins": {name: p["enabled"] for name, p in get_json(url, "/data/plugins_listing").items()},
            "scalar_tags": scalar_tags,
            "scalars": scalars(url, scalar_tags),
            "layout": get_json(url, "/data/plugin/custom_scalars/layout"),
            "image_tags": image_tags,
            "images": images(url, image_tags),
            "text": text(url, text_tags),
            "hparams": experiment,
            "session_groups": groups,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
