"""Generate (or reuse) the persistent-vs-transient clip dataset of the early-persistence race.

    python scripts/generate_persistence_dataset.py --out data/persistence --num-samples 2000
    python scripts/generate_persistence_dataset.py --out data/persistence_10k --num-samples 10000

A second call with the same arguments is a fast no-op (the cache matches); other arguments on an
existing folder are an error unless --force. See src/synthvid/persistence.py for the format.
"""

from __future__ import annotations

import argparse
import sys
import time

from synthvid.persistence import PersistenceConfig, generate_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="cache directory (created)")
    p.add_argument("--num-samples", type=int, default=2000, help="number of clips (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip T (default 16)")
    p.add_argument(
        "--max-persistent", type=int, default=2, help="persistent objects per clip: 1..N"
    )
    p.add_argument("--max-transient", type=int, default=6, help="transient objects per clip: 1..N")
    p.add_argument("--shard-size", type=int, default=500, help="clips per .npz shard")
    p.add_argument(
        "--force", action="store_true", help="overwrite a dataset made with other arguments"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = PersistenceConfig(
        num_samples=args.num_samples,
        seed=args.seed,
        num_frames=args.num_frames,
        max_persistent=args.max_persistent,
        max_transient=args.max_transient,
        shard_size=args.shard_size,
    )
    t0 = time.perf_counter()
    try:
        manifest = generate_dataset(args.out, cfg, progress=not args.quiet, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dataset ready: {manifest} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
