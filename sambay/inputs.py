"""The model's inputs, validated at the boundary: token ids or embeddings, ``logits_to_keep`` and the attention
mask, each error naming the argument, what was expected and what was found."""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels.common import f32

__all__ = ["check_keep", "check_mask", "embed"]


def embed(embed_tokens: nn.Embedding, input_ids, inputs_embeds) -> tuple[torch.Tensor, int, int]:
    """The fp32 residual stream (B, T, C) from layer 0 on, B, T: ``embed_tokens(input_ids)``, or the given
    ``inputs_embeds``, exactly one of them, checked."""
    weight = embed_tokens.weight
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("expected exactly one of input_ids and inputs_embeds, got "
                         f"{'both' if input_ids is not None else 'neither'}")
    if inputs_embeds is not None:
        x = inputs_embeds
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != weight.shape[1] \
                or not x.is_floating_point() or x.shape[1] == 0:
            raise ValueError(f"inputs_embeds: expected a float tensor (B, T >= 1, {weight.shape[1]}), got "
                             f"{_describe(x)}")
        check_device("inputs_embeds", x, weight)
        return f32(x.to(weight.dtype)), x.shape[0], x.shape[1]
    ids = input_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point \
            or ids.dtype.is_complex or ids.dtype == torch.bool or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected an integer tensor of shape (batch, tokens >= 1), got "
                         f"{_describe(ids)}")
    check_device("input_ids", ids, weight)
    V = weight.shape[0]
    # The range check costs a host sync: once per call of several tokens (a prefill), never per decode step.
    # A decode token out of range still fails loudly: the lookup's IndexError on CPU (re-raised below), a
    # device-side assert on CUDA.
    if ids.shape[1] > 1 and not torch.compiler.is_compiling():
        lo, hi = (int(t) for t in torch.aminmax(ids))
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids: expected token ids in [0, vocab_size={V}), got ids in [{lo}, {hi}]")
    try:
        return f32(embed_tokens(ids)), ids.shape[0], ids.shape[1]
    except IndexError:
        raise ValueError(f"input_ids: expected token ids in [0, vocab_size={V}), got {ids.tolist()}") from None


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def check_device(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.device != weight.device and weight.device.type != "meta":
        raise ValueError(f"{name}: expected a tensor on the model's device {weight.device}, got one on {x.device}")


def check_keep(logits_to_keep, T: int) -> int:
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep: expected an int >= 0 (0 = every position), got {logits_to_keep!r}")
    return T if logits_to_keep == 0 or logits_to_keep >= T else logits_to_keep


def check_mask(attention_mask, B: int, p0: int, T: int, cached: bool, device):
    """Validate a mask of shape (B, p0+T) and return (the new tokens' (B, T) bool flags or None, padded).

    One host sync for all checks. Padding must be one contiguous run per row: on the left with a cache (the
    continuation would otherwise follow pad tokens), left or right without one (both exact for the real
    tokens, since pads on the right come after every real token)."""
    if attention_mask is None:
        return None, False
    m = attention_mask
    expected = (B, p0 + T)
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != expected:
        where = f"cache.length ({p0}) + new tokens ({T})" if cached else "input_ids"
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"attention_mask: expected shape {expected} ({where}), got {got}")
    m = m.to(device)
    flags = m != 0
    values_bad = (flags & (m != 1)).any()  # only 0 and 1 (or False/True)
    f = flags.to(torch.int8)
    starts = (f[:, 1:] > f[:, :-1]).sum(1) + f[:, 0]  # runs of real tokens per row
    ends = (f[:, 1:] < f[:, :-1]).sum(1)  # a real token followed by a pad
    layout_bad = (ends > 0).any() if cached else (starts > 1).any()
    padded = ~flags[:, p0:].all()
    values_bad, layout_bad, padded = torch.stack([values_bad, layout_bad, padded]).tolist()
    if values_bad:
        raise ValueError("attention_mask: expected only 0 (padding) and 1 (real token)")
    if layout_bad:
        if cached:
            raise ValueError("attention_mask: with a cache (generation) padding must be on the left: each row "
                             "0...0 1...1, so that new tokens follow the real tokens. Pad prompts on the left "
                             "(tokenizer.padding_side = 'left'); got a row with a padding after a real token")
        raise ValueError("attention_mask: expected each row to be one run of real tokens (left or right padding); "
                         "got a row with padding between real tokens")
    return flags[:, p0:], bool(padded)
