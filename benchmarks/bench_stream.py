"""Streamed Hub -> Hub merge benchmark (issue 15): its throughput beside the loopback Hub's own bandwidth.

Builds N bf16 Llama-shaped parents (mergebot.tinymodels), puts them on the loopback Hub (tests/hubserver), then
in the same process and against the same server:
  1. the server's bandwidth: every parent file downloaded whole by plain GETs;
  2. a local merge of the same parents from disk (the compute alone);
  3. `mergebot merge --push-to --stream`: parents by range, shards uploaded as they finish, one commit.
Prints the bytes and MB/s of each, the bytes the server sent for the streamed merge beside the parents' bytes,
and an estimate for 7B and 70B merges on a GitHub-hosted runner from the measured compute rate and the
network rates given (defaults: 1 Gbit/s down, 0.5 Gbit/s up).
Usage: python benchmarks/bench_stream.py [--hidden 1024 --layers 8 --parents 2 --down-mbs 125 --up-mbs 62]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402  (its MonkeyPatch points huggingface_hub at the loopback Hub)
import torch  # noqa: E402

from mergebot.builds.base import MergeOptions  # noqa: E402
from mergebot.config.configfile import load  # noqa: E402
from mergebot.tinymodels import make_family  # noqa: E402
from tests.hubserver.client import TEST_TOKEN, TEST_USER, point_hub_client_at  # noqa: E402
from tests.hubserver.server import FakeHub  # noqa: E402
from tests.hubserver.state import Token  # noqa: E402

MB = 1e6


def config(path: Path, refs: list[str]) -> Path:
    w = 1.0 / len(refs)
    path.write_text("models:\n" + "".join(f"  - model: {r}\n    parameters: {{weight: {w}}}\n" for r in refs)
                    + "merge_method: linear\ndtype: bfloat16\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--parents", type=int, default=2)
    ap.add_argument("--shard", default="100M", help="--out-shard-size of the streamed merge")
    ap.add_argument("--workers", type=int, default=None, help="range requests in flight per parent (default 4)")
    ap.add_argument("--down-mbs", type=float, default=125.0, help="runner download rate for the estimate (MB/s)")
    ap.add_argument("--up-mbs", type=float, default=62.0, help="runner upload rate for the estimate (MB/s)")
    args = ap.parse_args()

    from huggingface_hub import close_session
    from huggingface_hub.utils import disable_progress_bars, get_session

    from mergebot import pipeline

    disable_progress_bars()
    if args.workers:
        import mergebot.io.remote

        mergebot.io.remote.WORKERS = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    parents = make_family(tmp / "models", args.parents, seed=3, dtype=torch.bfloat16, hidden=args.hidden,
                          inter=args.inter, layers=args.layers, vocab=args.vocab, heads=16, kv_heads=8)
    parent_bytes = sum(f.stat().st_size for d in parents for f in d.glob("*.safetensors"))
    hub = FakeHub(tokens={TEST_TOKEN: Token(user=TEST_USER)}).start()
    mp = pytest.MonkeyPatch()
    try:
        point_hub_client_at(mp, hub.url, TEST_TOKEN, tmp / "hf")
        close_session()
        refs = []
        for i, d in enumerate(parents):
            refs.append(f"{TEST_USER}/parent{i}")
            hub.create_repo(refs[-1])
            files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
            hub.commit(refs[-1], {**files, "README.md": b"---\nlicense: apache-2.0\n---\n"})

        # 1. the server's own bandwidth: whole files, plain GETs
        t = time.perf_counter()
        got = 0
        for ref, d in zip(refs, parents):
            for f in d.glob("*.safetensors"):
                got += len(get_session().get(f"{hub.url}/{ref}/resolve/main/{f.name}").content)
        server_s = time.perf_counter() - t
        # ... and the same bytes by 32 MB range requests, one at a time (what the streamed reads are made of)
        from mergebot.io.remote import REQUEST_BYTES, FetchStats, RangeSource

        t = time.perf_counter()
        buf = bytearray(REQUEST_BYTES)
        for ref, d in zip(refs, parents):
            src = RangeSource(ref, "main", ref, token=TEST_TOKEN, endpoint=hub.url, stats=FetchStats())
            for f in d.glob("*.safetensors"):
                size = f.stat().st_size
                for at in range(0, size, REQUEST_BYTES):
                    src.read_into(f.name, at, memoryview(buf)[:min(REQUEST_BYTES, size - at)])
        range_s = time.perf_counter() - t

        # 2. the compute alone: the same merge from local directories
        local_cfg = load(str(config(tmp / "local.yml", [str(p) for p in parents])))
        t = time.perf_counter()
        local = pipeline.run(local_cfg, tmp / "local-out", MergeOptions(progress=False, out_shard_size=int(200e6)),
                             stream="off")
        local_s = time.perf_counter() - t
        out_bytes = local.merge.stats.bytes_written

        # 3. the streamed merge
        cfg = load(str(config(tmp / "stream.yml", refs)))
        sent_before = len(hub.sent)
        from mergebot.units import parse_size

        t = time.perf_counter()
        done = pipeline.run(cfg, tmp / "stream-out", MergeOptions(progress=False, out_shard_size=parse_size(args.shard)),
                            push_to=f"{TEST_USER}/merged", stream="on")
        stream_s = time.perf_counter() - t
        served = sum(n for m, p, n in hub.sent[sent_before:] if m == "GET" and p.endswith(".safetensors"))
        assert done.streamed is not None
    finally:
        mp.undo()
        hub.stop()

    rate_server = got / server_s / MB
    rate_stream = (parent_bytes + out_bytes) / stream_s / MB
    print(f"parents: {args.parents} x {parent_bytes / args.parents / MB:.0f} MB bf16; output {out_bytes / MB:.0f} MB")
    print(f"loopback Hub, plain GETs of whole files:  {got / MB:8.0f} MB in {server_s:6.2f} s = {rate_server:7.0f} MB/s")
    print(f"loopback Hub, 32 MB range GETs, serial:  {got / MB:8.0f} MB in {range_s:6.2f} s = "
          f"{got / range_s / MB:7.0f} MB/s")
    print(f"local merge (compute only):              {out_bytes / MB:8.0f} MB in {local_s:6.2f} s = "
          f"{(parent_bytes + out_bytes) / local_s / MB:7.0f} MB/s (read + written)")
    print(f"streamed merge (range reads + uploads):  {(parent_bytes + out_bytes) / MB:8.0f} MB in {stream_s:6.2f} s = "
          f"{rate_stream:7.0f} MB/s (read + uploaded), {rate_stream / rate_server:.0%} of the server's whole-file rate, "
          f"{rate_stream / (got / range_s / MB):.0%} of its range rate")
    print(f"bytes the server sent for it: {served / MB:.1f} MB for {parent_bytes / MB:.1f} MB of parents "
          f"({served / parent_bytes - 1:+.2%}); {done.streamed.line()}")
    # estimate: fetch, compute and upload overlap (read-ahead, background upload), so the slowest one bounds
    compute_rate = (parent_bytes + out_bytes) / local_s  # bytes read+written per second here
    for name, params in (("7B", 7.2e9), ("70B", 70.6e9)):
        parent = params * 2
        read, written = 2 * parent, parent
        fetch, upload, compute = read / (args.down_mbs * MB), written / (args.up_mbs * MB), (read + written) / compute_rate
        print(f"estimate {name} two-parent linear merge on a GitHub-hosted runner: fetch {fetch / 60:.0f} min, "
              f"upload {upload / 60:.0f} min, compute {compute / 60:.0f} min -> about {max(fetch, upload, compute) / 60:.0f}"
              f"-{(fetch + upload + compute) / 60:.0f} min, disk ~2 output shards")


if __name__ == "__main__":
    main()
