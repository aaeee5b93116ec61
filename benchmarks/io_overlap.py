"""Does reading layer i+1 overlap with computing layer i?

On one random-weight Llama checkpoint, times four things over all decoder layers,
each from a cold page cache (posix_fadvise DONTNEED on the shards):
- read: only reading every layer's weights (into memory, as the prefetch thread does);
- compute: only running the layers, weights already in memory;
- serial: read a layer, run it, next (no prefetch);
- streamed: `BlockRunner.stream`, which reads the next layer in a background thread.
A streamed pass should approach max(read, compute), not read + compute.

    python -m benchmarks.io_overlap [--hidden 1024 --layers 16 --tokens 2048] [--hub-mbps 200]

With --hub-mbps the checkpoint is read by HTTP ranges from the test suite's local
Hub stand-in, throttled to that many MB/s: a network-bound read, as from the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .measure import drop_page_cache
from .probe_scale import build


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048, help="batch x sequence tokens per layer call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hub-mbps", type=float, help="read through a local Hub stand-in throttled to this rate")
    args = ap.parse_args(argv)
    from dowser_tool import open_checkpoint
    from dowser_tool.model.streaming import BlockRunner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        size = build(folder, args.layers, args.hidden)
        source, server = folder, None
        if args.hub_mbps:
            from tests.hub_server import HubServer, env_for

            server = HubServer()
            server.add_repo("bench/llama", folder)
            os.environ.update(env_for(server, Path(tmp) / "hf-cache"))
            source = "bench/llama"
        def fresh_runner():  # a new runner per timed case: its Hub layer cache starts empty
            return BlockRunner(open_checkpoint(source), torch.device("cpu"), torch.float32, residency="stream")

        runner = fresh_runner()
        if server:
            server.bytes_per_second = args.hub_mbps * 1e6
        seq = 128
        ids = torch.randint(3, 1000, (max(1, args.tokens // seq), seq))
        with torch.no_grad():
            inputs = runner.capture(input_ids=ids, use_cache=False)
        n = len(runner.layers)
        resident = [runner.fetch_layer(i) for i in range(n)]
        runner.close()

        def run_layers(r, layers_iter):
            h = inputs.hidden
            with torch.no_grad():
                for i, layer in layers_iter:
                    h = inputs.call(i, layer, h, r.tuple_out)

        def serial(r):
            for i in range(n):
                with r.layer(i) as layer:
                    yield i, layer

        def read_only(r):
            for i in range(n):
                r.fetch_layer(i)

        def compute_only(r):
            def it():
                for i in range(n):
                    r.load_layer(i, resident[i])
                    yield i, r.layers[i]
                    r.release_layer(i)
            run_layers(r, it())

        cases = {
            "read_s": read_only,
            "compute_s": compute_only,
            "serial_s": lambda r: run_layers(r, serial(r)),
            "streamed_s": lambda r: run_layers(r, r.stream(range(n))),
        }
        best = {k: float("inf") for k in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                r = fresh_runner()
                r.tuple_out = runner.tuple_out
                drop_page_cache(folder)
                t0 = time.perf_counter()
                fn(r)
                best[name] = min(best[name], time.perf_counter() - t0)
                r.close()
        if server:
            server.close()
        row = {"figure": "io_overlap", "source": f"hub stand-in at {args.hub_mbps:g} MB/s" if server else "local files",
               "checkpoint_bytes": size, "layers": n, "hidden": args.hidden,
               "tokens_per_call": int(ids.numel()), **{k: round(v, 3) for k, v in best.items()}}
        row["streamed_over_sum"] = round(best["streamed_s"] / (best["read_s"] + best["compute_s"]), 3)
        row["streamed_over_max"] = round(best["streamed_s"] / max(best["read_s"], best["compute_s"]), 3)
        row["serial_over_sum"] = round(best["serial_s"] / (best["read_s"] + best["compute_s"]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
