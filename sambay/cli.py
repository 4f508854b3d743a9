"""The ``sambay`` command: ``sambay generate`` (stream text from a checkpoint) and ``sambay bench``."""

from __future__ import annotations

import argparse
import math
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    import torch

    from sambay import SambaYForCausalLM, cache_nbytes
    from sambay.loading import _resolve_device, resolve_checkpoint

    _resolve_device(args.device)  # before anything is read: a bad device is a one-line error, not a late one
    directory = resolve_checkpoint(args.model)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError("sambay generate needs a tokenizer from transformers: pip install 'sambay[hf]'") from None
    import sambay.hf

    sambay.hf.register()  # AutoTokenizer reads config.json: model_type phi4flash must be known to transformers
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # missing tokenizer files: say which directory and what is needed
        raise ValueError(f"could not load a tokenizer from {directory} ({type(e).__name__}: {_one_line(e)}); the "
                         f"checkpoint directory needs its tokenizer files (tokenizer.json / tokenizer_config.json)"
                         ) from None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = SambaYForCausalLM.from_pretrained(directory, dtype=dtype, device=args.device)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer in {directory} has no chat template; expected one in "
                             f"tokenizer_config.json (or drop --chat)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise ValueError(f"--prompt: expected text that encodes to at least one token, got {args.prompt!r}")
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


class _UsageError(Exception):
    """A command-line mistake found by argparse: reported in one line, exit status 2."""


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default (argparse's ArgumentDefaultsHelpFormatter would also print
    "(default: None)" for required options, and a second default where the text already states one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and not action.required and action.default is not argparse.SUPPRESS
                and "default" not in text):
            shown = "off" if action.default is False else "unset" if action.default is None else "%(default)s"
            text = f"{text} (default: {shown})".strip()
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line instead of usage + message (argparse prints both, then exits)
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text!r}")
    return v


def _top_p(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from sambay import __version__

    parser = _Parser(prog="sambay", description="SambaY (Phi-4-mini-flash-reasoning) tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench}")
    g = sub.add_parser("generate", help="stream a completion from a checkpoint directory")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    g.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256,
                   help="tokens to generate at most (default: %(default)s)")
    g.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=_top_p, default=None,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches this "
                        "(default: off, all tokens)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (default: off)")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's torch_dtype)")
    default_device = "cuda" if _cuda() else "cpu"
    g.add_argument("--device", default=default_device,
                   help=f"torch device, e.g. cpu, cuda, cuda:1 (default: {default_device}; cuda when a GPU is "
                        f"available)")
    g.set_defaults(func=_generate)
    b = sub.add_parser("bench", help="sambay side by side with a same-shape transformer "
                                     "(targets: python -m benchmarks.run)")
    from sambay.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=_bench)
    return parser


def _one_line(e: BaseException) -> str:
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A user error (bad flag, missing or invalid checkpoint, ...) prints one line on
    stderr and returns 2; no traceback."""
    import torch

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sambay {args.command}: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as e:
        print(f"sambay {args.command}: error: out of memory ({_one_line(e)})", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:  # how sambay reports a bad argument, file or checkpoint
        print(f"sambay {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from sambay.bench import run

    return run(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
