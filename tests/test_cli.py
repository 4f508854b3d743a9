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
