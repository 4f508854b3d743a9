"""The ``sambay`` command: ``sambay generate`` (stream text from a checkpoint) and ``sambay bench``."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    import torch

    from sambay import SambaYForCausalLM, cache_nbytes

    try:
        from transformers import AutoTokenizer
    except ImportError:
        print("sambay generate needs a tokenizer from transformers: pip install 'sambay[hf]'", file=sys.stderr)
        return 2
    import sambay.hf

    sambay.hf.register()  # AutoTokenizer reads config.json: model_type phi4flash must be known to transformers
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as e:  # missing tokenizer files: say which directory and what is needed
        print(f"could not load a tokenizer from {args.model} ({type(e).__name__}: {e}); the checkpoint directory "
              f"needs its tokenizer files (tokenizer.json / tokenizer_config.json)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = SambaYForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            print(f"--chat: the tokenizer in {args.model} has no chat template", file=sys.stderr)
            return 2
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids.to(model.device)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    new_ids, shown = [], [""]

    def stream(token):
        # Decode everything generated so far and print the new suffix: token-by-token decoding would
        # lose the spaces and merges that depend on neighbouring tokens.
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.startswith(shown[0]):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=max(args.temperature, 1e-5), top_p=args.top_p, eos_token_id=eos, streamer=stream)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    state = cache_nbytes(model.config, 1, out.shape[1], model.dtype)
    print(f"\n[{new} tokens in {elapsed:.2f}s: {new / max(elapsed, 1e-9):.2f} tokens/s (prefill included); "
          f"decode state {state / 2**20:.2f} MiB for {out.shape[1]} positions]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sambay", description="SambaY (Phi-4-mini-flash-reasoning) tools")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a completion from a checkpoint directory")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.set_defaults(func=_generate)
    b = sub.add_parser("bench", help="sambay against a same-shape transformer (see benchmarks/)")
    from sambay.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


def _bench(args: argparse.Namespace) -> int:
    from sambay.bench import run

    return run(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
