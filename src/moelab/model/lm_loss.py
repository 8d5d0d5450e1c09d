"""Next-token cross-entropy from the final hidden states: the reference and a chunked fast path.

Legend: N predicted positions (batch x sequence, flattened), D model dim, V vocab,
R rows of one chunk.

The reference materialises ``logits [N, V]`` and calls `F.cross_entropy`; at training
shapes that tensor is the largest activation of a small model (1024 x 8192 fp32 =
32 MB for tiny-*), and log-softmax, its backward and the zero-filled gradient each pass
over it in DRAM. `chunked_lm_loss` (the idea of Liger's fused linear cross-entropy)
computes the LM head and the loss R rows at a time while the chunk's logits are in
cache, and because the loss is a scalar it also computes the gradients in the same
pass: with p = softmax(logits) and y the target,

    d loss / d logits = (p - onehot(y)) / n_valid      (rows with ignore_index: 0)
    d x  = (d logits) W          d W = (d logits)^T x

so the backward only scales the stored gradients by the incoming scalar. Logits are
never held for more than R rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows per chunk: 128 x 8192 fp32 logits = 4 MB, about one core's L2 here. Measured on
# a whole tiny-moe training step (batch 8 x 128, 2 threads, interleaved): 137 ms at 128
# rows, 142 at 64 and 256, 151 at 512 and 1024, against 163 ms with the full logits.
CHUNK_ROWS = 128


def lm_loss_reference(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not `IGNORE_INDEX`, in float32."""
    acc = torch.promote_types(logits_NV.dtype, torch.float32)
    return F.cross_entropy(logits_NV.to(acc), targets_N, ignore_index=IGNORE_INDEX)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, targets_N, chunk_rows, want_grad, compute_dtype):
        N = x_ND.shape[0]
        x_in = x_ND
        x_ND = x_ND.to(compute_dtype)
        valid_N = targets_N != IGNORE_INDEX
        n_valid = int(valid_N.sum())
        safe_N = targets_N.clamp_min(0)  # ignored rows: any index; their weight is 0
        w_VD = weight_VD.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax/loss/grad sums: >= fp32
        scale_N = valid_N.to(acc) / max(n_valid, 1)
        total = torch.zeros((), dtype=acc, device=x_ND.device)
        dx_ND = torch.empty_like(x_ND) if want_grad else None  # compute dtype
        dw_VD = torch.zeros_like(weight_VD, dtype=acc) if want_grad else None
        for a in range(0, N, chunk_rows):
            b = min(N, a + chunk_rows)
            logits_RV = F.linear(x_ND[a:b], w_VD).to(acc)
            lse_R = torch.logsumexp(logits_RV, dim=-1)
            picked_R = logits_RV.gather(1, safe_N[a:b, None]).squeeze(1)
            total += ((lse_R - picked_R) * valid_N[a:b]).sum()
            if not want_grad:
                continue
            # (softmax - onehot) * scale, built in place in the logits buffer.
            g_RV = logits_RV.sub_(lse_R[:, None]).exp_()
            g_RV.scatter_add_(1, safe_N[a:b, None], torch.full_like(lse_R[:, None], -1.0))
            g_RV.mul_(scale_N[a:b, None])
            torch.mm(g_RV.to(x_ND.dtype), w_VD, out=dx_ND[a:b])
            dw_VD.addmm_(g_RV.t(), x_ND[a:b].to(acc))
        loss = total / n_valid if n_valid else total.new_tensor(float("nan"))
        if want_grad:
            ctx.save_for_backward(dx_ND.to(x_in.dtype), dw_VD.to(weight_VD.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dx_ND, dw_VD = ctx.saved_tensors
        return dx_ND * grad_loss.to(dx_ND.dtype), dw_VD * grad_loss.to(dw_VD.dtype), None, None, None, None


def chunked_lm_loss(
    x_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """``lm_loss_reference(x @ weight^T, targets)`` without materialising the logits.

    Same value and gradients as the reference (tested); first-order only. The gradients
    are computed during the forward whenever autograd will need them, so call it once
    per backward, as a training loss is.
    """
    if x_ND.dim() != 2 or targets_N.shape != x_ND.shape[:1]:
        raise ValueError(f"chunked_lm_loss: x must be [N, D] and targets [N], got {tuple(x_ND.shape)} and "
                         f"{tuple(targets_N.shape)}")
    chunk_rows = chunk_rows or CHUNK_ROWS
    want_grad = torch.is_grad_enabled() and (x_ND.requires_grad or weight_VD.requires_grad)
    device = x_ND.device.type
    # Under autocast the head runs in the autocast dtype, as `F.linear` would; the
    # softmax, the loss and the gradient accumulation stay in float32.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_ND.dtype
    with torch.autocast(device_type=device, enabled=False):
        return _ChunkedLMLoss.apply(x_ND, weight_VD, targets_N, chunk_rows, want_grad, dtype)
