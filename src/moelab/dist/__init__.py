"""Expert parallelism over torch.distributed: the routed experts of every MoE layer split
over the ``ep`` ranks of a ``dp x ep`` device mesh, tokens moved by all-to-all.

* `moelab.dist.mesh`: process group and mesh (`init_dist`, `DistContext`), gloo on CPU,
  NCCL on CUDA, launched by torchrun or `moelab.dist.launch`.
* `moelab.dist.permute`: the index maths of the exchange, as pure functions.
* `moelab.dist.dispatcher`: `AllToAllDispatcher`, a second implementation of
  `moelab.moe.dispatch.Dispatcher`.
* `moelab.dist.parallel`: sharding a model's experts, the gradient rules, consolidating
  shards for checkpoints.
* `moelab.dist.train`: the trainer's hooks for a ``dp x ep`` run.

See docs/dist.md. Names are imported from their submodule on first use (PEP 562).
"""

from moelab.lazy import lazy_exports

_EXPORTS = {
    "AllToAllDispatcher": "moelab.dist.dispatcher",
    "DistContext": "moelab.dist.mesh",
    "init_dist": "moelab.dist.mesh",
    "expert_major_order": "moelab.dist.permute",
    "shard_experts": "moelab.dist.parallel",
    "reduce_gradients": "moelab.dist.parallel",
    "full_state_dict": "moelab.dist.parallel",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
