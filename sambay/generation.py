"""Token generation on the static SambaYCache with the Hugging Face ``generate`` arguments.

Prefill (with the YOCO skip), then one token per step. The decode step branches on shapes and Python ints
only (no .item()), so it can be compiled or graph-captured. Host syncs per step: none for plain greedy or
sampling; one when something can stop a row early (EOS ids, stopping_criteria), and the non-finite-logits
check rides on that same sync (without it, the check is one sync after the last step).

Arguments resolve as in transformers 5 (``generation/utils.py``, ``_prepare_generation_config``): keyword
arguments > ``generation_config`` > the model's ``generation_config`` (its ``generation_config.json``) > the
defaults below, where None means "not set". Logits are processed in transformers' order and with its
semantics (``_get_logits_processor``): repetition penalty, min_length / min_new_tokens, then a caller's
``logits_processor``, then, when sampling, temperature, top-k, top-p. Beam search and the other strategies
raise NotImplementedError; an argument sambay does not know is a TypeError.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sambay.cache import CacheError, SambaYCache

# Values used when neither the call, the generation_config nor the model's generation_config sets one
# (transformers' global defaults, except max_new_tokens=20 where transformers has max_length=20).
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None, "max_length": None, "min_new_tokens": 0, "min_length": 0, "do_sample": False,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1,
    "eos_token_id": None, "pad_token_id": None, "bos_token_id": None, "use_cache": True,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False, "num_beams": 1,
}
DEFAULT_MAX_NEW_TOKENS = 20
# transformers GenerationConfig keys that sambay does not implement, with the value that means "off": any other
# value raises NotImplementedError. Unlisted keys at these values (None) are accepted as unset.
_OFF: dict[str, tuple] = {
    "num_beams": (1,), "num_beam_groups": (1,), "early_stopping": (False,), "length_penalty": (1.0,),
    "penalty_alpha": (), "diversity_penalty": (0.0,), "constraints": (), "force_words_ids": (), "dola_layers": (),
    "min_p": (), "top_h": (), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "no_repeat_ngram_size": (0,), "encoder_no_repeat_ngram_size": (0,), "bad_words_ids": (), "sequence_bias": (),
    "forced_bos_token_id": (), "forced_eos_token_id": (), "remove_invalid_values": (False,),
    "exponential_decay_length_penalty": (), "suppress_tokens": (), "begin_suppress_tokens": (),
    "guidance_scale": (1.0,), "watermarking_config": (), "renormalize_logits": (False,), "max_time": (),
    "stop_strings": (), "token_healing": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
    "prompt_lookup_num_tokens": (), "assistant_early_exit": (), "encoder_repetition_penalty": (1.0,),
    "low_memory": (False,), "prefill_chunk_size": (), "use_mtp": (False,),
}
# Keys a generation_config (or the pipeline) may carry that do not change what is generated here.
_INERT = {"transformers_version", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
          "disable_compile", "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
          "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size",
          "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type",
          "continuous_batching_config", "synced_gpus", "tokenizer", "use_model_defaults"}


@dataclass
class GenerateOutput:
    """What ``return_dict_in_generate=True`` returns when transformers is not installed (with it: its
    ``GenerateDecoderOnlyOutput``, the same fields)."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    cache: SambaYCache | None = None

    @property
    def past_key_values(self) -> SambaYCache | None:
        """The older name of ``cache``."""
        return self.cache


def with_cache(output_cls, cache, **fields):
    """``output_cls(**fields)`` with ``cache`` under the name that transformers output class declares: ``cache``
    in current transformers 5 (5.24 and 5.25 log "past_key_values/cache_params are deprecated" when an output is
    built, or read, with the old name), ``past_key_values`` in older versions."""
    declared = getattr(output_cls, "__dataclass_fields__", {})
    return output_cls(**fields, **{"cache" if "cache" in declared else "past_key_values": cache})


# ---- argument resolution and validation --------------------------------------------------------------------
def _as_dict(config) -> dict:
    """Set (non-None) entries of a GenerationConfig, a dict, or None."""
    if config is None:
        return {}
    if isinstance(config, dict):
        d = config
    elif hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        raise TypeError(f"generation_config: expected a transformers GenerationConfig or a dict, got "
                        f"{type(config).__name__}")
    return {k: v for k, v in d.items() if v is not None and not k.startswith("_")}


def resolve(model, generation_config=None, **kwargs) -> dict:
    """The settings of one generate() call (see the module docstring for the precedence)."""
    merged = dict(DEFAULTS)
    for layer in (_as_dict(getattr(model, "generation_config", None)), _as_dict(generation_config),
                  {k: v for k, v in kwargs.items() if v is not None}):
        merged.update(layer)
    unknown = sorted(k for k in merged if k not in DEFAULTS and k not in _OFF and k not in _INERT)
    if unknown:
        raise TypeError(f"generate: unknown arguments {unknown}")
    unsupported = sorted(k for k, off in _OFF.items() if k in merged and k not in DEFAULTS and merged[k] not in off)
    if int(merged["num_beams"]) != 1:
        unsupported.insert(0, f"num_beams={merged['num_beams']} (beam search)")
    if unsupported:
        raise NotImplementedError(f"generate: sambay implements greedy decoding and sampling (temperature, top_k, "
                                  f"top_p, repetition_penalty, min_new_tokens, ...); not supported: {unsupported}")
    return merged


def _int(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dim() != 0):
            raise TypeError
        v = operator.index(value)  # int, numpy and 0-d torch integers
    except TypeError:
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v}")
    return v


def _real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    """A finite real number in the interval lo..hi (open or closed at each end)."""
    try:
        if isinstance(value, (bool, str)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {interval}, got {value!r}")
    return v


def _token_ids(name: str, value, vocab: int) -> list[int] | None:
    """An id or a list of ids (Python, numpy or torch integers, or a 1-D integer tensor) in [0, vocab)."""
    if value is None:
        return None
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # torch or numpy arrays and scalars
        integer = not value.is_floating_point() and value.dtype != torch.bool if isinstance(value, torch.Tensor) \
            else value.dtype.kind in "iu"
        if not integer or value.ndim > 1:
            raise TypeError(f"{name}: expected integer token id(s), got a {value.ndim}-D {value.dtype} array")
        value = value.tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name}: expected at least one token id, got an empty list")
    ids = []
    for v in items:
        try:
            if isinstance(v, bool):
                raise TypeError
            i = operator.index(v)
        except TypeError:
            raise TypeError(f"{name}: expected integer token id(s), got {value!r}") from None
        if not 0 <= i < vocab:
            raise ValueError(f"{name}: expected ids in [0, {vocab}) (the vocabulary), got {i}")
        ids.append(i)
    return ids


# ---- logits processing (transformers' semantics, logits_process.py) ----------------------------------------
def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(scores, min(k, scores.shape[-1]), dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probability mass reaches p (at least one): in ascending order, drop
    each token whose cumulative probability up to and including itself is <= 1 - p."""
    ascending, order = scores.sort(dim=-1)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits: (B, V) -> (B,) int64."""
    if not do_sample:
        return logits.argmax(dim=-1)
    return _draw(_warp(logits.float(), temperature, top_k, top_p), generator)


def _warp(scores: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        scores = _top_k(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = _top_p(scores, top_p)
    return scores


def _draw(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    probs = scores.softmax(-1)
    # A row without finite scores (a broken model) gets a uniform draw, so that the step finishes and the
    # non-finite check below reports it with its step number instead of multinomial failing inside torch.
    probs = torch.where(torch.isfinite(probs.sum(-1, keepdim=True)), probs, torch.ones_like(probs))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_one_token(model, token: torch.Tensor, cache: SambaYCache, static: bool = False) -> torch.Tensor:
    """One decode step: token (B,) -> next-token logits (B, V). Updates ``cache`` in place.

    ``static=True`` takes the position from ``cache.pos`` (a device tensor) with shapes independent of it:
    the step to compile or capture in a CUDA graph. A replayed graph advances ``cache.pos`` itself, and
    ``cache.length`` is re-read from it when next asked for."""
    return model(token[:, None], cache=cache, logits_to_keep=1, static=static).logits[:, -1]


def check_cache_room(cache: SambaYCache, prompt: int, max_new: int) -> None:
    """Once per generate call, from lengths known in Python: the positions the call writes (the prompt, then one
    per generated token but the last, which is not fed back) fit ``cache``. The compiled decode step on a GPU
    cannot check it per step without a host sync."""
    need = prompt + max_new - 1 if max_new > 0 else 0
    if need > cache.max_length:
        raise CacheError(f"cache: this generate call writes {need} positions (a prompt of {prompt} and "
                         f"max_new_tokens={max_new}, the last token not fed back), but the SambaYCache passed holds "
                         f"max_length={cache.max_length}; allocate one with allocate_cache({cache.batch_size}, "
                         f"{need}) or ask for fewer tokens")


def _emit(streamer: Any, tokens: torch.Tensor) -> None:
    if hasattr(streamer, "put"):
        streamer.put(tokens.cpu())
    else:
        streamer(tokens)


def _stop_flags(criteria, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows a transformers StoppingCriteria(List) or a callable(ids, scores) says are done."""
    done = criteria(ids, scores)
    if isinstance(done, torch.Tensor):
        return done.to(device=ids.device, dtype=torch.bool).reshape(-1).expand(ids.shape[0])
    return torch.full((ids.shape[0],), bool(done), device=ids.device)


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits (non-finite weights or an overflow in a low precision)."""


def _nonfinite(step: int, P: int) -> NonFiniteLogitsError:
    what = "the prompt's last position (prefill)" if step == 0 else f"position {P + step - 1}"
    return NonFiniteLogitsError(f"generate: non-finite logits (NaN or inf) at step {step} ({what}); the model's "
                                f"weights or activations are not finite")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config=None, *, inputs: torch.Tensor | None = None,
             stopping_criteria: Callable | None = None, logits_processor: Callable | None = None,
             generator: torch.Generator | None = None, streamer: Any = None, cache: SambaYCache | None = None,
             compile: bool | str = False, **kwargs):
    """Generate after each (left-padded) prompt, with the transformers ``generate`` arguments.

    Args:
        input_ids (or ``inputs``): (B, P) prompts, left-padded for batches of unequal lengths.
        attention_mask: (B, P), 0 at padding (left padding only); None = no padding.
        generation_config: a transformers GenerationConfig or a dict; keyword arguments override it.
        max_new_tokens / max_length (total, prompt included; max_new_tokens wins), min_new_tokens / min_length:
            lengths (default: 20 new tokens).
        do_sample, temperature, top_k, top_p: sampling (greedy when do_sample is False); ``generator`` makes it
            reproducible.
        repetition_penalty: transformers' (every id of the sequence so far, the prompt's padding included).
        num_return_sequences: rows per prompt (each prompt repeated, as transformers does).
        eos_token_id: id(s) that end a row; a finished row is padded with ``pad_token_id`` (default: the
            config's pad id, else the first eos id). stopping_criteria: ``(ids (B, L), scores (B, V)) -> (B,)``
            bool (a transformers StoppingCriteriaList works); logits_processor: ``(ids, scores) -> scores``.
        use_cache: True (default) the static cache; False recomputes the whole sequence at every step.
        return_dict_in_generate, output_scores, output_logits: return an output with ``sequences`` and the
            per-step processed ``scores`` / raw ``logits`` (B, V) fp32.
        streamer: a Hugging Face style streamer (``put``/``end``) or a callable, given each new token (B,).
        cache: an allocated SambaYCache to reuse (it is reset); default: a new one of size P + max_new_tokens
            (rounded up to a multiple of 256 with ``compile``, so that calls of similar lengths share a compilation).
        compile: decode with the static step compiled once per (model, batch size, cache length) by
            :func:`sambay.compiled.decode_step` (fullgraph; CUDA graphs on a GPU); the prefill stays eager. The
            first call of a shape compiles (reported once on stderr) and the tokens equal the eager ones. A string
            names the torch.compile backend (default "inductor").
    Returns:
        (B * num_return_sequences, P + n) token ids, n <= max_new_tokens (fewer only when every row finished);
        or the output object with return_dict_in_generate=True.
    """
    if inputs is not None:
        if input_ids is not None:
            raise TypeError("generate: got both inputs and input_ids")
        input_ids = inputs
    if kwargs.pop("inputs_embeds", None) is not None:
        raise NotImplementedError("generate: inputs_embeds is not supported (pass input_ids)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool:
        got = (f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise TypeError(f"input_ids: expected a 2-D integer tensor (B, P), got {got}")
    s = resolve(model, generation_config, **kwargs)
    vocab = model.lm_head.out_features  # nn.Linear and QuantLinear alike
    B0, P = input_ids.shape
    device = input_ids.device
    do_sample = bool(s["do_sample"])
    temperature = _real("temperature", s["temperature"], 0.0, math.inf, do_sample, True)
    top_k = _int("top_k", s["top_k"], 0)
    top_p = _real("top_p", s["top_p"], 0.0, 1.0, True, False)
    penalty = _real("repetition_penalty", s["repetition_penalty"], 0.0, math.inf, True, True)
    n_seq = _int("num_return_sequences", s["num_return_sequences"], 1)
    if s["max_new_tokens"] is not None:
        max_new = _int("max_new_tokens", s["max_new_tokens"], 0)
    elif s["max_length"] is not None:
        max_new = _int("max_length", s["max_length"], 0) - P
        if max_new < 0:
            raise ValueError(f"max_length: expected >= the prompt length {P} (it counts the prompt), got "
                             f"{s['max_length']}")
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    min_new = max(_int("min_new_tokens", s["min_new_tokens"], 0), _int("min_length", s["min_length"], 0) - P)
    eos_ids = _token_ids("eos_token_id", s["eos_token_id"], vocab)
    pad_ids = _token_ids("pad_token_id", s["pad_token_id"], vocab)
    if pad_ids is not None and len(pad_ids) != 1:
        raise ValueError(f"pad_token_id: expected one id, got {s['pad_token_id']!r}")
    pad_id = pad_ids[0] if pad_ids else None
    if eos_ids is not None and pad_id is None:
        config_pad = getattr(model.config, "pad_token_id", None)
        pad_id = config_pad if config_pad is not None and 0 <= config_pad < vocab else eos_ids[0]
    if P == 0:
        raise ValueError("input_ids: expected at least one prompt token, got shape (B, 0)")
    if bool(((input_ids < 0) | (input_ids >= vocab)).any()):  # once per call
        raise ValueError(f"input_ids: expected ids in [0, {vocab}) (the vocabulary), got min "
                         f"{int(input_ids.min())}, max {int(input_ids.max())}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B0, P):
            raise ValueError(f"attention_mask: expected shape {(B0, P)} (input_ids), got {tuple(attention_mask.shape)}")
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("attention_mask: generation needs left padding (every row's last prompt token real); "
                             "a row ends in padding, so its continuation would follow pad tokens. Pad on the left "
                             "(tokenizer.padding_side = 'left')")
    if n_seq > 1:  # transformers' expansion: each prompt repeated in place
        input_ids = input_ids.repeat_interleave(n_seq, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n_seq, dim=0)
    B = B0 * n_seq
    use_cache = bool(s["use_cache"])
    if use_cache:
        if cache is None:
            length = P + max_new if not compile else -(-(P + max_new) // 256) * 256
            cache = model.allocate_cache(B, length, device=device)
        else:
            check_cache_room(cache, P, max_new)
            cache.reset()
    elif cache is not None:
        raise ValueError("use_cache=False contradicts the cache passed; drop one of the two")

    want_scores, want_logits = bool(s["output_scores"]), bool(s["output_logits"])
    processed = penalty != 1.0 or min_new > 0 or logits_processor is not None or want_scores or do_sample
    early_stop = eos_ids is not None or stopping_criteria is not None
    eos = None if eos_ids is None else torch.tensor(eos_ids, device=device)
    seq = torch.empty(B, P + max_new, dtype=input_ids.dtype, device=device)
    seq[:, :P] = input_ids
    seen = None
    if penalty != 1.0:  # the ids present so far, as a (B, V) mask: the penalty applies once per distinct id
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, True)
    full_mask = None
    if not use_cache and attention_mask is not None:
        full_mask = torch.ones(B, P + max_new, dtype=attention_mask.dtype, device=device)
        full_mask[:, :P] = attention_mask
    step_fn = None
    if compile:
        if not use_cache:
            raise ValueError("generate: compile=True compiles the cached decode step; it needs use_cache")
        from sambay.compiled import decode_step

        step_fn = decode_step(model, backend=compile if isinstance(compile, str) else "inductor")
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    n = 0
    if max_new > 0:
        if use_cache:
            logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
        else:
            logits = model(input_ids, attention_mask, logits_to_keep=1).logits[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # The sum of a step's logits is finite iff all of them are (NaN and inf propagate; finite logits cannot
        # reach fp32's range): one reduction, kept per step so that the check needs no sync of its own.
        sums = torch.empty(max_new, dtype=torch.float32, device=device)
        for step in range(max_new):
            sums[step] = logits.sum()
            if want_logits:
                logits_out.append(logits.float())
            if processed:
                scores = logits.float()
                if seen is not None:
                    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
                    scores = torch.where(seen, penalised, scores)
                if step < min_new and eos is not None:
                    scores = scores.index_fill(1, eos, float("-inf"))
                if logits_processor is not None:
                    scores = logits_processor(seq[:, :P + step], scores)
                if do_sample:
                    scores = _warp(scores, temperature, top_k, top_p)
                    token = _draw(scores, generator)
                else:
                    token = scores.argmax(dim=-1)
                if want_scores:
                    scores_out.append(scores)
            else:
                scores = logits
                token = logits.argmax(dim=-1)
            if eos is not None:  # transformers pads finished rows only when EOS can stop them
                token = torch.where(finished, torch.full_like(token, pad_id), token)
            seq[:, P + step] = token
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            n = step + 1
            if eos is not None:
                finished |= torch.isin(token, eos)
            if stopping_criteria is not None:
                finished |= _stop_flags(stopping_criteria, seq[:, :P + n], scores)
            if streamer is not None:
                _emit(streamer, token)
            if early_stop:
                all_done, finite = torch.stack([finished.all(), sums[step].isfinite()]).tolist()  # the one sync
                if not finite:
                    raise _nonfinite(step, P)
                if all_done:
                    break
            if n == max_new:
                break
            if step_fn is not None:
                logits = step_fn(token, cache)
            elif use_cache:
                logits = decode_one_token(model, token, cache)
            else:
                mask = None if full_mask is None else full_mask[:, :P + n]
                logits = model(seq[:, :P + n], attention_mask=mask, logits_to_keep=1).logits[:, -1]
        if not early_stop:  # one sync after the loop
            bad = (~sums[:n].isfinite()).nonzero()
            if len(bad):
                raise _nonfinite(int(bad[0, 0]), P)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    sequences = seq[:, :P + n]
    if not s["return_dict_in_generate"]:
        return sequences
    try:
        from transformers.generation.utils import GenerateDecoderOnlyOutput as Output
    except ImportError:
        Output = GenerateOutput
    return with_cache(Output, cache, sequences=sequences, scores=tuple(scores_out) if want_scores else None,
                      logits=tuple(logits_out) if want_logits else None)


class SambaYGenerationMixin:
    """``generate`` for a model with sambay's forward (see :func:`generate`). transformers recognises a class
    whose bases include a ``...GenerationMixin`` as one that generates (``PreTrainedModel.can_generate``), so
    pipelines, lm-eval and peft reach this method and never wrap the class with their own."""

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, **kwargs):
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        """What forward takes for a step (peft looks this method up); generate() itself does not use it."""
        return {"input_ids": input_ids, **kwargs}
