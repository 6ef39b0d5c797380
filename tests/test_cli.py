import json

import pytest

from llmpress.cli import main


def test_compress_eval_info_end_to_end(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "out"
    j = tmp_path / "r.json"
    rc = main(["compress", str(tiny_dir), "-r", "w4a16-gptq", "-g", "32", "-o", str(out), "--calib", str(text_file),
               "--n-samples", "4", "--seqlen", "32", "--eval", "--n-windows", "2", "--eval-seqlen", "32", "--eval-corpus", str(text_file), "--json", str(j)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "KL (nats)" in printed and "w4a16-gptq-g32" in printed
    rep = json.loads(j.read_text())
    base, comp = rep["eval"]
    assert base["kl"] == pytest.approx(0, abs=1e-6) and comp["kl"] > 0 and comp["size_mb"] < base["size_mb"]
    assert (out / "config.json").exists()
    card = (out / "README.md").read_text()  # model card: loading, layers, recipe, the measured rows
    assert "from_pretrained" in card and "## Recipe" in card and '"method": "gptq"' in card
    assert "## Measured" in card and f"{comp['ppl']:.4g}" in card and "w4a16-gptq-g32" in card

    assert main(["eval", str(out), "--base", str(tiny_dir), "--corpus", str(text_file), "--n-windows", "2",
                 "--seqlen", "32", "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["rows"][1]["kl"] == pytest.approx(comp["kl"], rel=1e-5)
    assert main(["info", str(out)]) == 0
    assert "14 linear layers" in capsys.readouterr().out


def test_cli_errors_are_clear_and_write_nothing(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such model" in capsys.readouterr().err
    assert main(["compress", str(tiny_dir), "-r", "w4a16-rtn", "-g", "48", "-o", str(out)]) == 2
    assert "group_size=48 must divide" in capsys.readouterr().err
    assert main(["compress", str(tiny_dir), "-r", "nope", "-o", str(out)]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["compress", str(tiny_dir), "-r", "w8a16", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_export_gguf_and_errors(tmp_path, tiny_dir, capsys):
    import gguf

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_dir), "--format", "gguf:q4_0", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["output_norm.weight"] == "F32"
    before = out.read_bytes()
    assert main(["export", str(tiny_dir), "--format", "gguf:q4_0", "-o", str(out)]) == 2  # exists
    assert main(["export", str(tiny_dir), "--format", "onnx:int3", "-o", str(tmp_path / "x")]) == 2
    assert main(["export", str(tiny_dir), "--format", "gguf:q9_9", "-o", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "unknown export format" in err and "q9_9" in err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "tiny-llama"]


def test_export_k_mix_with_imatrix(tmp_path, tiny_dir, text_file, capsys):
    """gguf:q4_k_m with --imatrix: rows of 64 fall back as llama.cpp does (reported), every
    linear is solved with the importance weights; --imatrix refuses non-GGUF formats."""
    out, js = tmp_path / "k.gguf", tmp_path / "k.json"
    assert main(["export", str(tiny_dir), "--format", "gguf:q4_k_m", "--imatrix", "--calib", str(text_file),
                 "--n-samples", "4", "--seqlen", "32", "-o", str(out), "--json", str(js)]) == 0
    assert "fell back" in capsys.readouterr().out
    s = json.loads(js.read_text())
    assert s["tensors"]["blk.0.ffn_down.weight"] == "q5_0" and s["tensors"]["output.weight"] == "q8_0"
    assert s["method"]["blk.0.ffn_down.weight"] == "weighted"
    assert main(["export", str(tiny_dir), "--format", "compressed-tensors", "--imatrix", "-o", str(tmp_path / "c")]) == 2
    assert "--imatrix applies to GGUF" in capsys.readouterr().err


def test_compress_stream_matches_in_memory(tmp_path, tiny_dir, text_file, capsys):
    args = ["-r", "w4a16-gptq", "-g", "32", "--calib", str(text_file), "--n-samples", "4", "--seqlen", "32",
            "--eval", "--n-windows", "2", "--eval-seqlen", "32", "--eval-corpus", str(text_file)]
    assert main(["compress", str(tiny_dir), "-o", str(tmp_path / "a"), "--json", str(tmp_path / "a.json"), *args]) == 0
    assert main(["compress", str(tiny_dir), "-o", str(tmp_path / "b"), "--json", str(tmp_path / "b.json"),
                 "--stream", *args]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert b["stream"] and b["eval"][1]["kl"] == pytest.approx(a["eval"][1]["kl"], rel=1e-6)
    assert (tmp_path / "b" / "tokenizer.json").exists()
    assert main(["info", str(tmp_path / "b")]) == 0
    assert "14 linear layers" in capsys.readouterr().out


def test_compress_stream_gpus_launches_torchrun(tmp_path, tiny_dir, text_file):
    """--gpus N relaunches the command under torchrun (gloo on the CPU); rank 0 reports."""
    import subprocess
    import sys

    j = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "llmpress", "compress", str(tiny_dir), "-r", "w4a16-gptq", "-g", "32",
           "-o", str(tmp_path / "out"), "--stream", "--gpus", "2", "--calib", str(text_file),
           "--n-samples", "4", "--seqlen", "32", "--json", str(j)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "SIGABRT" in r.stderr:
        # a gloo worker on this 2-core machine aborted once in a fresh-clone CI run (2026-12-06; not yet
        # reproduced: 3/3 passes right after); one more try, and both stderrs if that fails too
        first = r.stderr
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, first[:3000] + "\n...\n" + r.stderr[:3000] + "\n...\n" + r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-2000:]
    rep = json.loads(j.read_text())
    assert rep["processes"] == 2 and len(rep["compression"]["layers"]) == 14
    assert {x.get("rank") for x in rep["compression"]["layers"]} == {0, 1}
    assert main(["compress", str(tiny_dir), "-o", str(tmp_path / "o2"), "--gpus", "2"]) == 2  # needs --stream
