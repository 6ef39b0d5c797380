"""Resource prediction from config.json alone, the dry run, and the up-front refusal."""

from __future__ import annotations

import json

import pytest

import llmpress as lp
from llmpress.cli import main
from llmpress.plan import resources
from llmpress.plan.resources import ResourceError, check_fits, predict


@pytest.mark.parametrize("recipe,kw", [
    ("w4a16-rtn", {"group_size": 32}), ("w3a16-gptq", {"group_size": 16}), ("w8a16", {}), ("nf4", {}),
    ("w4a16-hqq", {"group_size": 32}), ("sparse50-magnitude", {}), ("2of4-wanda", {}), ("svd80", {}),
    ("drop25-angular", {}), ("2of4-sparsegpt-w4a16", {"group_size": 32}),
])
def test_predicted_size_matches_the_checkpoint(recipe, kw, tmp_path, tiny_dir, text_file):
    r = lp.recipe(recipe, **kw)
    pred = predict(tiny_dir, r, n_samples=4, seqlen=32)
    model = lp.load(tiny_dir)
    lp.compress(model, r, lp.data.calibration(str(text_file), 4, 32), progress=False)
    lp.save(model, tmp_path / "out")
    disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) / 1e6
    assert pred.disk_mb == pytest.approx(disk, rel=0.04), (recipe, pred.disk_mb, disk)
    assert pred.params == sum(p.numel() for p in lp.load(tiny_dir).parameters())


def test_prediction_scales_with_the_run(tiny_dir):
    r = lp.recipe("w4a16-gptq", group_size=32)
    small = predict(tiny_dir, r, n_samples=4, seqlen=32, runtime_mb=0)
    big = predict(tiny_dir, r, n_samples=4096, seqlen=256, runtime_mb=0)
    assert big.parts["activations"] == pytest.approx(small.parts["activations"] * 1024 * 8)
    assert big.peak_rss_mb > small.peak_rss_mb
    free = predict(tiny_dir, lp.recipe("w4a16-rtn", group_size=32), runtime_mb=0)
    assert free.parts["activations"] == 0 and free.parts["tokenize"] == 0  # no calibration pass
    gpu = predict(tiny_dir, r, device="cuda")
    assert gpu.peak_gpu_mb is not None and gpu.peak_gpu_mb > 0 and small.peak_gpu_mb is None


def test_dry_run_reads_no_weights(tmp_path, tiny_dir, capsys):
    (tiny_dir / "model.safetensors").write_bytes(b"garbage")  # the weights are never opened
    j = tmp_path / "d.json"
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "-r", "w4a16-gptq", "-g", "32", "-o", str(out), "--dry-run",
                 "--json", str(j)]) == 0
    printed = capsys.readouterr().out
    assert "predicted peak host memory" in printed and "predicted checkpoint size" in printed
    pred = json.loads(j.read_text())["prediction"]
    assert pred["disk_mb"] > 0 and pred["peak_rss_mb"] > pred["parts"]["weights"]
    assert not out.exists()
    assert main(["compress", str(tiny_dir), "-r", "w4a16-rtn", "-g", "48", "-o", str(out), "--dry-run"]) == 2
    assert "group_size=48 must divide" in capsys.readouterr().err


def test_a_run_that_cannot_fit_refuses_before_loading(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(resources, "available_mb", lambda: 0.01)
    monkeypatch.setattr(resources, "rss_mb", lambda: 0.01)

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(lp, "load", boom)
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "-r", "w4a16-rtn", "-g", "32", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "MB is available" in err and "--force" in err
    assert not out.exists()
    with pytest.raises(ResourceError):
        check_fits(predict(tiny_dir, lp.recipe("w8a16")))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        predict(tmp_path / "nope", lp.recipe("w8a16"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        predict(tmp_path / "empty", lp.recipe("w8a16"))
