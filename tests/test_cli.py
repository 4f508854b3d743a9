"""`sambay generate` end to end on a fixture checkpoint with a small word-level tokenizer."""

import shutil

import pytest
import torch
from helpers import FIXTURES

from sambay.cli import main


def _checkpoint_with_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny8", d)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
    fast.save_pretrained(d)
    return d


@pytest.mark.slow
def test_generate_streams_text_and_reports_speed_and_state(tmp_path, capsys):
    d = _checkpoint_with_tokenizer(tmp_path)
    assert main(["generate", "--model", str(d), "--prompt", "w5 w6 w7", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.strip(), "no text was streamed"
    assert "tokens/s" in err and "decode state" in err and "MiB" in err
    from sambay import SambaYForCausalLM

    model = SambaYForCausalLM.from_pretrained(d)
    ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, eos_token_id=2)
    words = " ".join(f"w{int(t)}" for t in ids[0, 3:] if int(t) > 2)
    assert out.split() == words.split()  # what was streamed is what greedy decoding produces


def test_generate_chat_uses_the_template(tmp_path, capsys):
    d = _checkpoint_with_tokenizer(tmp_path)
    assert main(["generate", "--model", str(d), "--prompt", "w9", "--max-new-tokens", "3", "--chat"]) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_generate_without_tokenizer_files_says_so(tmp_path, capsys):
    pytest.importorskip("transformers")
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny8", d)
    assert main(["generate", "--model", str(d), "--prompt", "hi"]) == 2
    assert "tokenizer" in capsys.readouterr().err


# ---- every user error: one line on stderr, exit status 2, no traceback ------------------------------------
def test_version(capsys):
    from sambay import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sambay {__version__}"


def test_every_flag_has_help_text_showing_its_default():
    import argparse

    from sambay.cli import build_parser

    top = build_parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {"sambay": top, **sub.choices}
    assert set(parsers) == {"sambay", "generate", "bench"}
    checked = dict.fromkeys(parsers, 0)
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            assert action.help and len(text) > 10, (name, action.option_strings)
            if action.default is not argparse.SUPPRESS and not action.required:  # not -h/--version/required
                assert "default" in text, (name, action.option_strings, text)
                checked[name] += 1
    assert checked["generate"] == 6  # every optional flag of generate (--model and --prompt are required)
    g = sub.choices["generate"]
    help_text = " ".join(g._get_formatter()._expand_help(a) for a in g._actions)
    for words in ("(default: 256)", "(default: 0.0)", "(default: off, all tokens)", "(default: the checkpoint's"):
        assert words in help_text


def _nan_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _checkpoint_with_tokenizer(tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.layers.2.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(t, d / "model.safetensors")
    return d


def _bad_config_checkpoint(tmp_path):
    import json

    d = _checkpoint_with_tokenizer(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=0)))
    return d


def _no_template_checkpoint(tmp_path):
    import json

    d = _checkpoint_with_tokenizer(tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    return d


def _plain(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny8", d)
    return d


G = ["generate", "--prompt", "w5 w6"]
CASES = {  # id: (argv with {d} for the checkpoint, how to build it, words of the one line)
    "no command": ([], None, "sambay: error: the following arguments are required: {generate,bench}"),
    "unknown command": (["frobnicate"], None, "invalid choice: 'frobnicate'"),
    "unknown flag": ([*G, "--model", "{d}", "--bogus"], _plain, "unrecognized arguments: --bogus"),
    "no --model": (G, None, "sambay generate: error: the following arguments are required: --model"),
    "max-new-tokens 0": ([*G, "--model", "{d}", "--max-new-tokens", "0"], _plain,
                         "argument --max-new-tokens: expected a positive integer, got 0"),
    "max-new-tokens abc": ([*G, "--model", "{d}", "--max-new-tokens", "abc"], _plain,
                           "argument --max-new-tokens: expected a positive integer, got 'abc'"),
    "temperature -1": ([*G, "--model", "{d}", "--temperature", "-1"], _plain,
                       "argument --temperature: expected a finite number >= 0 (0 = greedy), got '-1'"),
    "temperature nan": ([*G, "--model", "{d}", "--temperature", "nan"], _plain,
                        "argument --temperature: expected a finite number >= 0 (0 = greedy), got 'nan'"),
    "top-p 0": ([*G, "--model", "{d}", "--top-p", "0"], _plain,
                "argument --top-p: expected a probability in (0, 1], got '0'"),
    "top-p 1.5": ([*G, "--model", "{d}", "--top-p", "1.5"], _plain, "expected a probability in (0, 1], got '1.5'"),
    "dtype int8": ([*G, "--model", "{d}", "--dtype", "int8"], _plain, "argument --dtype: invalid choice: 'int8'"),
    "device gpu0": ([*G, "--model", "{d}", "--device", "gpu0"], _plain,
                    "device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"),
    "missing model": ([*G, "--model", "{d}/nope"], _plain, "no such checkpoint directory: "),
    "model is a file": ([*G, "--model", "{d}/config.json"], _plain, "config.json is a file; expected a checkpoint"),
    "no tokenizer": ([*G, "--model", "{d}"], _plain, "could not load a tokenizer from"),
    "invalid config": ([*G, "--model", "{d}"], _bad_config_checkpoint,
                       "layer_norm_eps: expected a finite number > 0, got 0"),
    "nan weights": ([*G, "--model", "{d}"], _nan_checkpoint,
                    "1 tensor(s) hold non-finite values (a diverged or corrupt checkpoint; pass check_finite=False "
                    "to load it anyway):; model.layers.2.mlp.fc1.weight (in model.safetensors): 1 NaN and 0 inf"),
    "chat without template": ([*G, "--model", "{d}", "--chat"], _no_template_checkpoint,
                              "--chat: the tokenizer in"),
    "empty prompt": (["generate", "--prompt", "", "--model", "{d}"], _checkpoint_with_tokenizer,
                     "--prompt: expected text that encodes to at least one token, got ''"),
    "bench --contexts": (["bench", "--contexts", "abc", "--device", "cpu"], None,
                         "--contexts: expected comma-separated integers >= 1, got 'abc'"),
    "bench --config": (["bench", "--config", "nope", "--device", "cpu"], None, "config: expected one of"),
}
if not torch.cuda.is_available():
    CASES["device cuda"] = ([*G, "--model", "{d}", "--device", "cuda"], _plain,
                            "device: 'cuda' asked for, but CUDA is not available here")


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, case):
    argv, build, words = CASES[case]
    d = build(tmp_path) if build else tmp_path
    rc = main([a.replace("{d}", str(d)) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err and words in err, err
    assert not out.strip()


@pytest.mark.slow
def test_the_installed_command_exits_2_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "sambay.cli", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True, cwd=root, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no such checkpoint directory" in proc.stderr, proc.stderr
