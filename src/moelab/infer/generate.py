"""Autoregressive generation with a KV cache: prefill the prompts, then decode one token
per step.

Legend: B prompts (batch rows), L padded prompt length, N max new tokens, S = L + N.

Batched prompts of different lengths are left-padded: every row ends at column L-1, so
one cache offset serves all rows. The attention mask marks padding (the model's
`_attention_mask` combines it with causality and the sliding window) and positions count
real tokens only (``cumsum(mask) - 1``), so each row sees exactly what it would alone.

Routing record (``record_routing=True``): for each generated token, the experts and
weights chosen in every MoE layer at the position that *produced* it (the last prompt
token for the first new token, then the previously generated token) -- what the model
computed while writing that token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moelab.errors import ConfigError
from moelab.infer.compiled import (
    check_compilable,
    compiled_decode_step,
    static_cache_len,
)
from moelab.infer.sampling import SamplingConfig, sample_next
from moelab.model import KVCache, Transformer


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


StreamCallback = Callable[[int, int, str], None]  # (row, token id, new text)


@dataclass
class TokenRouting:
    """Routing of one generated token: per MoE layer, the chosen experts and their weights."""

    experts: dict[int, list[int]]
    weights: dict[int, list[float]]

    def to_dict(self) -> dict:
        return {str(i): {"experts": self.experts[i], "weights": self.weights[i]} for i in self.experts}


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new tokens per prompt (a stop token, when hit, is included)
    finish_reasons: list[str]  # "stop_token" | "stop_string" | "length"
    texts: list[str] | None = None  # decoded new text (cut before a stop string/token) when a tokenizer is given
    routing: list[list[TokenRouting]] | None = None  # per prompt, per generated token
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode steps (all rows) per second of decoding."""
        rows = len(self.token_ids)
        return rows * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, L]`` left-padded and ``mask [B, L]`` (1 = real token)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, L - len(p) :] = 1
    return ids, mask


def _check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ConfigError("generate: prompts_ids is empty; give at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    V = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"generate: prompt {i} is empty; each prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < V]
        if bad:
            raise ConfigError(f"generate: prompt {i} has token id {bad[0]} outside [0, vocab_size={V})")
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(
            f"generate: longest prompt + max_new_tokens = {total} exceeds the model's max_seq_len={model.cfg.max_seq_len}"
        )


def generate(
    model: Transformer,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Decoder | None = None,
    record_routing: bool = False,
    stream: StreamCallback | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt (token id lists), batched.

    Stop strings need `tokenizer` (anything with ``decode(ids) -> str``). `stream` is
    called for every kept token with ``(row, token_id, text_delta)``.

    ``compile=True`` runs the decode steps as one `torch.compile`d graph over a static
    cache (`moelab.infer.compiled`); the prefill stays eager. The first call for a given
    batch size and cache length compiles (tens of seconds); the graph is kept per model
    and rebuilt when its weights change. Batches of more than one row also keep an
    MKL-packed copy of the dense weights (inductor freezing). Not with ``record_routing``.
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_prompts(model, prompts_ids, max_new_tokens)
    if stop_strings and tokenizer is None:
        raise ConfigError("generate: stop_strings need a tokenizer to decode the text")
    if not isinstance(compile, bool):
        raise ConfigError(f"generate: compile must be True or False, got {compile!r}")
    if compile and record_routing:
        raise ConfigError(
            "generate: compile=True does not support record_routing=True (the compiled step returns "
            "logits only); use compile=False to record routing"
        )
    if compile:
        check_compilable(model, batch_size=len(prompts_ids))
    stop_ids = set(int(t) for t in (stop_token_ids or ()))
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    ids_BL, mask_BL = left_pad(prompts_ids)
    B, L = ids_BL.shape
    S = L + max_new_tokens
    ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
    padded = bool((mask_BL == 0).any())
    mask_BS = torch.ones((B, S), dtype=torch.long, device=device)
    mask_BS[:, :L] = mask_BL
    positions_BL = (mask_BL.cumsum(-1) - 1).clamp_min(0)
    pos_B1 = positions_BL[:, -1:]  # position of the last token fed, per row

    out_ids: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    streamed = [0] * B  # characters of each row's text already passed to `stream`
    texts = ["" for _ in range(B)] if tokenizer is not None else None
    routing: list[list[TokenRouting]] | None = [[] for _ in range(B)] if record_routing else None
    result = GenerationResult(out_ids, reasons, texts, routing, prompt_tokens=sum(len(p) for p in prompts_ids))
    if max_new_tokens == 0:
        return result

    was_training = model.training
    model.eval()
    cache = KVCache(
        n_layers=cfg.n_layers, batch_size=B, max_len=static_cache_len(S, cfg.max_seq_len) if compile else S,
        n_kv_heads=cfg.kv_heads, head_dim=cfg.dim_head, v_head_dim=cfg.value_dim, dtype=dtype, device=device,
    )
    step_fn = None
    if compile:
        # Freezing repacks the dense weights for MKL: at 8 rows their GEMMs run ~2x faster
        # (the LM head 3.2 vs 6.4 ms), at one row no faster (15.0 vs 15.2 ms per step),
        # while the packed copies cost memory (+190-270 MB RSS for the 213M benchmark model).
        step_fn = compiled_decode_step(model, freezing=B > 1, greedy=sampling.greedy)
        model.rope_table(cache, dtype)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(
                ids_BL,
                positions=positions_BL,
                attention_mask=mask_BL if padded else None,
                cache=cache,
                last_only=True,
                return_routing=record_routing,
                telemetry=False,
            )
            token_B = sample_next(out.logits[:, -1], sampling, generator)
            result.prefill_s = time.perf_counter() - t0
            if step_fn is not None:
                # The same buffers, static shapes from here on; the columns a row may
                # attend to (apart from causality) are all but its left padding.
                valid_BS = torch.ones((B, cache.max_len), dtype=torch.bool, device=device)
                valid_BS[:, :L] = mask_BL.bool()
                static_cache = cache.static_view(valid_BS)
            t0 = time.perf_counter()
            step = 0
            while True:
                tokens = token_B.tolist()
                step_routing = _routing_rows(out.routing, B, L if step == 0 else 1) if record_routing else None
                for b in range(B):
                    if done[b]:
                        continue
                    _accept(b, tokens[b], result, tokenizer, stop_ids, stop_strings, stream, done, streamed)
                    if step_routing is not None:
                        routing[b].append(step_routing[b])  # type: ignore[index]
                step += 1
                if all(done) or step >= max_new_tokens:
                    break
                pos = L + step - 1  # column of the token being fed
                pos_B1 = pos_B1 + 1
                if step_fn is not None:
                    t_step = time.perf_counter()
                    stepped = step_fn(model, token_B.unsqueeze(1), pos_B1, static_cache, repeat=step > 1)
                    if step == 1:  # the first compiled call compiles (tens of seconds): timed apart
                        first_s = time.perf_counter() - t_step
                        result.extras["compile_s"] = first_s
                        t0 += first_s
                    if sampling.greedy:  # the graph took the argmax: token ids
                        token_B = stepped
                        continue
                    logits_BV = stepped
                else:
                    out = model(
                        token_B.unsqueeze(1),
                        positions=pos_B1,
                        attention_mask=mask_BS[:, : pos + 1] if padded else None,
                        cache=cache,
                        last_only=True,
                        return_routing=record_routing,
                        telemetry=False,
                    )
                    logits_BV = out.logits[:, -1]
                token_B = sample_next(logits_BV, sampling, generator)
            result.decode_s = time.perf_counter() - t0
            result.decode_steps = step - 1  # the first token came from prefill
            if "compile_s" in result.extras:  # ... and the first compiled step is not a decode rate
                result.decode_steps -= 1
            if stream is not None and texts is not None:
                for b in range(B):  # flush what was held back for a stop string that never came
                    if len(texts[b]) > streamed[b]:
                        stream(b, out_ids[b][-1], texts[b][streamed[b] :])
    finally:
        model.train(was_training)
    return result


def _accept(
    b: int,
    token: int,
    result: GenerationResult,
    tokenizer: Decoder | None,
    stop_ids: set[int],
    stop_strings: Sequence[str] | None,
    stream: StreamCallback | None,
    done: list[bool],
    streamed: list[int],
) -> None:
    """Append one token to row b, update its text, and decide whether the row is finished."""
    ids = result.token_ids[b]
    ids.append(token)
    if token in stop_ids:
        done[b] = True
        result.finish_reasons[b] = "stop_token"
    delta = ""
    if tokenizer is not None and result.texts is not None and not done[b]:
        # Decode the whole continuation: BPE pieces of one character may span tokens.
        text = tokenizer.decode([t for t in ids if t not in stop_ids])
        for s in stop_strings or ():
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
                done[b] = True
                result.finish_reasons[b] = "stop_string"
                break
        result.texts[b] = text
        delta = stream_delta(text, streamed[b], stop_strings, final=done[b])
        streamed[b] += len(delta)
    if stream is not None:
        stream(b, token, delta)


def stream_delta(text: str, already: int, stop_strings: Sequence[str] | None, *, final: bool) -> str:
    """The text that is safe to show now: hold back a tail that may still become a stop
    string, or an incomplete UTF-8 character (decoded as U+FFFD), until it resolves."""
    end = len(text)
    if not final:
        if text.endswith("\ufffd"):
            end -= 1
        for s in stop_strings or ():
            for n in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:n]):
                    end = min(end, len(text[:end]) - n)
                    break
    return text[already:end] if end > already else ""


def _routing_rows(routing: dict | None, B: int, T: int) -> list[TokenRouting]:
    """Per-row routing of the last position of this forward (decisions are ``[B*T, K]``)."""
    rows = [TokenRouting({}, {}) for _ in range(B)]
    for layer, decision in (routing or {}).items():
        idx = decision.expert_idx.view(B, T, -1)[:, -1].tolist()
        w = decision.weights.view(B, T, -1)[:, -1].float().tolist()
        for b in range(B):
            rows[b].experts[layer] = idx[b]
            rows[b].weights[layer] = w[b]
    return rows
