import hashlib

import pytest
import torch

from llmpress import assets, data


def test_wiki_protocol_hashes():
    for split, digest in assets.CORPORA["wiki"].sha256.items():
        t = data.text("wiki", split)
        assert hashlib.sha256(t.encode()).hexdigest() == digest
    assert data.text("wiki", "eval").startswith(" = Anarchism =")
    assert data.text("wiki", "calib").startswith(" = Alkali metal =")


def test_calibration_is_deterministic_and_pinned(tokenizer, text_file):
    c = data.calibration(str(text_file), n_samples=4, seqlen=16, seed=0)
    a, b = c.tokens(tokenizer), c.tokens(tokenizer)
    assert a.shape == (4, 16) and torch.equal(a, b)
    ids = data.tokenize(tokenizer, text_file.read_text())
    n = ids.numel() // 16
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4]
    assert torch.equal(a, ids[: n * 16].reshape(n, 16)[idx])


def test_eval_windows_are_the_first_tokens(tokenizer, text_file):
    w = data.eval_windows(tokenizer, str(text_file), seqlen=8, n_windows=3)
    ids = data.tokenize(tokenizer, text_file.read_text())
    assert torch.equal(w.flatten(), ids[:24])


@pytest.mark.slow
def test_wiki_builds_without_gensim_in_the_environment(tmp_path, monkeypatch):
    """A plain install (no 'wiki' extra) still gets the pinned corpus: gensim goes into the
    cache with pip --target and runs in a subprocess."""
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    a = assets.CORPORA["wiki"]
    src = assets._package_file(a.module, a.member, a.package, a.version)
    arts = assets._build_wiki_isolated(src, a.version)
    assert hashlib.sha256("\n\n".join(arts[:60]).encode()).hexdigest() == a.sha256["eval"]
    assert hashlib.sha256("\n\n".join(arts[60:]).encode()).hexdigest() == a.sha256["calib"]
