"""Worker for the multi-process training tests (one per rank, run by `moelab.dist.launch`).

``python train_worker.py DATA_CACHE RUN_DIR:STEPS [RUN_DIR:STEPS ...] [--kill RANK:STEP]``:
trains the tests' tiny MoE with `ExpertParallel` at EP = world size, on the data cached in
DATA_CACHE, one run after the other in the same process group (process start-up is
most of a test's time on 2 cores). ``--kill 1:2``: rank 1 kills itself (SIGKILL) after step 2.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from moelab.data import prepare_data
from moelab.model import ModelConfig
from moelab.moe import MoEConfig
from moelab.train import TrainConfig, train

VOCAB = 512


def model_cfg() -> ModelConfig:
    moe = MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001,
                    capacity_factor=1.25)
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                       moe=moe)


def train_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_interval=0,
                       eval_batches=1, checkpoint_interval=0, log_interval=4, device="cpu", precision="fp32")


def data(cache: str):
    return prepare_data(cache, max_chars_per_domain=40_000, vocab_size=VOCAB)


def main() -> None:
    torch.set_num_threads(1)
    from moelab.dist.mesh import init_dist, shutdown
    from moelab.dist.train import ExpertParallel

    args = sys.argv[1:]
    kill = None
    if "--kill" in args:
        i = args.index("--kill")
        kill = args[i + 1]
        del args[i:i + 2]
    cache, jobs = args[0], [(Path(j.rpartition(":")[0]), int(j.rpartition(":")[2])) for j in args[1:]]
    ctx = init_dist(ep=ctx_ep())

    def on_step(step: int, row: dict) -> None:
        if kill is not None:
            rank, at = map(int, kill.split(":"))
            if ctx.rank == rank and step == at:
                os.kill(os.getpid(), signal.SIGKILL)

    try:
        for run_dir, steps in jobs:
            cfg = train_cfg(steps)
            train(model_cfg(), cfg, data(cache), run_dir, progress=False, tensorboard=False, on_step=on_step,
                  parallel=ExpertParallel(ctx, cfg), resume=(run_dir / "trainer_state.json").exists())
    finally:
        shutdown()


def ctx_ep() -> int:
    return int(os.environ.get("EP", os.environ["WORLD_SIZE"]))


if __name__ == "__main__":
    main()
