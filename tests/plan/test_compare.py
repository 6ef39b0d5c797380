"""``llmpress compare``: report files, and PNG charts that show the numbers in report.json."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llmpress.cli import main
from llmpress.plan.compare import bits_grid, pareto


def test_pareto_front():
    rows = [dict(size_mb=1, ppl=10), dict(size_mb=2, ppl=9), dict(size_mb=2, ppl=11), dict(size_mb=3, ppl=9)]
    assert pareto(rows) == [True, True, False, False]


def test_bits_grid():
    layers = [dict(name="model.layers.1.mlp.down_proj", bits=4.5), dict(name="model.layers.0.mlp.down_proj", bits=3.5),
              dict(name="model.layers.0.self_attn.q_proj", bits=8.0)]
    blocks, roles, grid = bits_grid(layers)
    assert blocks == [0, 1] and roles == ["mlp.down_proj", "self_attn.q_proj"]
    assert grid == [[3.5, 8.0], [4.5, None]]


def test_compare_writes_a_report_whose_charts_match_its_json(tmp_path, tiny_dir, text_file, capsys):
    plan = tmp_path / "mixed.yaml"
    plan.write_text("name: mixed\nsteps:\n- method: rtn\n  bits: 4\n  group_size: 32\n  overrides:\n"
                    "  - pattern: 're:.*mlp.*'\n    bits: 8\n")
    out = tmp_path / "report"
    rc = main(["compare", str(tiny_dir), "--recipes", f"w4a16-rtn,w8a16,nope,{plan}", "-g", "32", "-o", str(out),
               "--corpus", str(text_file), "--calib", str(text_file), "--n-samples", "4", "--n-windows", "2",
               "--seqlen", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "failed: nope" in printed and "report.md" in printed
    rep = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in rep["rows"]]
    assert names == ["base", "w4a16-rtn", "w8a16", "mixed"]
    assert "nope" in rep["failed"]
    by = {r["name"]: r for r in rep["rows"]}
    assert by["w4a16-rtn"]["size_mb"] < by["w8a16"]["size_mb"] < by["base"]["size_mb"]
    assert by["w4a16-rtn"]["kl"] > by["w8a16"]["kl"] > 0 and by["base"]["kl"] == pytest.approx(0, abs=1e-7)
    assert [r["pareto"] for r in rep["rows"]] == pareto(rep["rows"]) and by["w4a16-rtn"]["pareto"]  # the smallest
    assert by["w4a16-rtn"]["predicted_size_mb"] == pytest.approx(by["w4a16-rtn"]["size_mb"], rel=0.04)
    # only the mixed recipe gets a bits-per-layer heat map
    assert set(rep["charts"]) == {"pareto", "bits:mixed"}
    md = (out / "report.md").read_text()
    assert "![size vs perplexity](pareto.png)" in md and "| w8a16" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page and "src=\"pareto.png\"" not in page

    img = Image.open(out / "pareto.png")
    assert img.format == "PNG" and img.size == (800, 500)
    meta = json.loads(img.text["llmpress"])
    assert set(meta["points"]) == set(names)
    rgb = img.convert("RGB")
    for r in rep["rows"]:  # every plotted point is the row's (size, ppl), drawn where the chart says
        assert meta["points"][r["name"]] == pytest.approx([r["size_mb"], r["ppl"]])
        x, y = meta["pixels"][r["name"]]
        assert 0 <= x < img.size[0] and 0 <= y < img.size[1]
        want = (0xD6, 0x27, 0x28) if r["name"] == "base" else (0x1F, 0x77, 0xB4)
        assert max(abs(a - b) for a, b in zip(rgb.getpixel((x, y)), want, strict=True)) < 40, r["name"]
    heat = Image.open(out / rep["charts"]["bits:mixed"])
    hm = json.loads(heat.text["llmpress"])
    layers = {x["name"]: x["bits"] for x in rep["layers"]["mixed"]}
    for bi, b in enumerate(hm["blocks"]):
        for ri, role in enumerate(hm["roles"]):
            assert hm["bits"][bi][ri] == pytest.approx(layers[f"model.layers.{b}.{role}"])
    assert {round(v) for v in layers.values()} == {5, 9}  # 4 / 8 bits plus fp32 scales of groups of 32

    assert main(["compare", str(tiny_dir), "--recipes", "w8a16", "-o", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
