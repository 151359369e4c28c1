#!/usr/bin/env python3
"""The packet fuzz suite of tests/test_fuzz.py, for a long run (a million packets).

Loads node0 of examples/seed.yaml in a private network namespace and pin dir (one fresh
datapath per stream: mixed, truncated, established, in the test's shares) and runs
seeded random and mutated frames through from_netdev / to_netdev with BPF_PROG_TEST_RUN,
checking every one with the test's oracles. Prints packets/s per stream and every kind
of failure with the seed and the frame in hex. Run as root:

    .venv/bin/python bench/fuzz.py [--packets N] [--seed S] [--stream NAME]
    .venv/bin/python bench/fuzz.py --frame HEX [--prog from_netdev|to_netdev]

The streams of a seed are the test's: --seed 10 --packets 20000 runs what CI runs (the
first packets of a longer run too; SNAT ports the kernel picks at random may make the
frames of replies differ). --frame runs one frame on a fresh datapath (no flows: a
reply is then not service traffic).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bpfgen.build import compile_spec  # noqa: E402

import test_fuzz as fz  # noqa: E402  (tests/test_fuzz.py: the harness, generators and oracles)


def one_frame(build, frame: bytes, prog: str) -> int:
    with fz.Node0(build) as dp:
        oracle = fz.Oracle(fz.Model())
        cls, cands = oracle.classify(prog, frame)
        print(f"{prog} on {len(frame)} bytes ({fz.malformation(frame)}): classified {cls}"
              + (f", may become {[c.kind for c in cands]}" if cands else ""))
        try:
            verdict, out = dp.run(prog, frame)
        except Exception as e:  # noqa: BLE001
            print(f"test run failed: {e}" + (" (the harness refuses frames this short)"
                                              if fz.harness_may_refuse(frame) else ""))
            return 1
        print(f"verdict {fz.VERDICTS.get(verdict, verdict)}, {'unchanged' if out == frame else 'out ' + out.hex()}")
        drops = {k: v for k, v in dp.drops().items() if v}
        if drops:
            print(f"drops: {drops}")
        bad = oracle.check(prog, frame, verdict, out)
        print("oracle: ok" if bad is None else f"oracle: {bad[0]}: {bad[1]}")
        return 0 if bad is None else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000, help="packets in all (default 1,000,000)")
    parser.add_argument("--seed", type=lambda v: int(v, 0), default=None,
                        help=f"the seed (default: a random one, printed; CI's is {fz.FUZZ_SEED})")
    parser.add_argument("--stream", choices=["all", *fz.STREAMS], default="all",
                        help="one stream with all the packets, or all in the test's shares")
    parser.add_argument("--frame", help="run this one frame (hex) on a fresh datapath and check it")
    parser.add_argument("--prog", choices=["from_netdev", "to_netdev"], default="from_netdev")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bpfgen-fuzz-") as tmp:
        build = compile_spec(fz.SEED_SPEC, Path(tmp) / "build")
        if args.frame:
            return one_frame(build, bytes.fromhex(args.frame), args.prog)

        seed = secrets.randbelow(1 << 32) if args.seed is None else args.seed
        shares = {args.stream: 1.0} if args.stream != "all" else fz.STREAMS
        print(f"seed {seed}, {args.packets:,} packets: "
              + ", ".join(f"{name} {round(args.packets * share):,}" for name, share in shares.items()), flush=True)
        failed = 0
        total, started = 0, time.monotonic()
        for name, share in shares.items():
            n = max(1, round(args.packets * share))
            with fz.Node0(build) as dp:
                report = fz.run_stream(dp, seed, name, n)
            total += report.packets
            print(report.text() if not report.ok else report.summary(), flush=True)
            failed += sum(report.counts.values())
        elapsed = time.monotonic() - started
        print(f"all: {total:,} packets in {elapsed:.1f} s ({total / elapsed:,.0f} packets/s, datapath set-up "
              f"included), {failed} failing packets; seed {seed}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
