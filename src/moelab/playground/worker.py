"""The training subprocess of one Break run: ``python -m moelab.playground.worker FOLDER``.

Reads the request from ``FOLDER/playground.json``, prepares the scale's data (cached under
the runs folder's ``.cache``) and runs the lab experiment into FOLDER with
`moelab.lab.failures.run_experiment`, the code path of ``moelab lab``. Exit status: 0 done,
130 stopped by SIGINT (checkpoint written: ``--resume`` continues), 1 failed (the last line
of the log says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moelab.playground.runs import INTERRUPTED_EXIT, SCALE_DATA, STATE_FILE, BreakRequest

# The runs the page trains: collapse's broken run, its two cures and the dense twin its
# verdict compares with (the lab's full experiment adds the aux sweep and the unskewed
# controls: `moelab lab`), the demo's four.
PAGE_RUNS: dict[str, tuple[str, ...]] = {
    "collapse": ("broken-no-aux", "aux-loss", "aux-free-bias", "dense-active")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab.playground.worker")
    p.add_argument("folder", type=Path)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from moelab.data.loader import prepare_data
    from moelab.errors import MoelabError
    from moelab.lab.failures import run_experiment
    from moelab.train import TrainingInterrupted

    # The server shares the machine with the page's other requests: one thread trains.
    torch.set_num_threads(1)
    try:
        request = BreakRequest(**json.loads((args.folder / STATE_FILE).read_text(encoding="utf-8"))["request"])
        data = prepare_data(args.folder.parent / ".cache" / "data", **SCALE_DATA[request.scale])
        result = run_experiment(request.experiment, data, args.folder, config=request.lab_config(),
                                progress=False, resume=args.resume, only=PAGE_RUNS.get(request.experiment))
    except TrainingInterrupted as e:
        print(f"stopped at step {e.step}; checkpoint in {e.run_dir} (resume continues)", file=sys.stderr)
        return INTERRUPTED_EXIT
    except KeyboardInterrupt:  # between runs or while preparing data: finished runs are kept
        print("stopped between training runs (resume continues)", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (MoelabError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: effect {'shown' if result.passed else 'NOT shown'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
