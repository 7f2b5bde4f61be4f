"""kernels/ stands alone: it names nothing of ms_dfkd, and its numpy-only modules (and the GPU check
script, which runs on machines with CuPy and no MindSpore) import where MindSpore cannot be imported."""
import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
NUMPY_ONLY = ("gumbel_noise", "soft_embedding_reference", "kd_loss_reference", "encoder_ops_reference",
              "triton_config", "aot_build", "triton_runtime", "cpu_build")
TRITON_ONLY = ("triton_kernels",)  # triton and numpy, no MindSpore
# `import mindspore` raises ImportError once sys.modules maps it to None
NO_MINDSPORE = "import sys\nsys.modules['mindspore'] = None\n"
CHECK_NOTHING_ELSE = ("leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('ms_dfkd', 'torch', 'cupy')\n"
                      "                or m.startswith('mindspore.'))\n"
                      "assert not leaked, leaked\n"
                      "print('IMPORTED')\n")


def _run_without_mindspore(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", NO_MINDSPORE + code + CHECK_NOTHING_ELSE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_mindspore_block_works():
    out = _run_without_mindspore("try:\n    import mindspore\nexcept ImportError:\n    print('BLOCKED')\n")
    assert "BLOCKED" in out.stdout, out.stdout + out.stderr[-3000:]


def test_numpy_only_modules_import_without_mindspore():
    modules = NUMPY_ONLY
    if importlib.util.find_spec("triton") is not None:
        modules += TRITON_ONLY
    code = "".join(f"import kernels.{name}\n" for name in modules)
    out = _run_without_mindspore(code)
    assert out.returncode == 0 and "IMPORTED" in out.stdout, out.stderr[-3000:]


def _script_imports(path, skip=("cupy",)):
    """The top-level import statements of a script, as source, without those of the ``skip`` packages."""
    lines = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a for a in node.names if a.name.split(".")[0] not in skip]
            if names:
                lines.append(ast.unparse(ast.Import(names=names)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] not in skip:
            lines.append(ast.unparse(node))
    return lines


def test_gpu_check_script_imports_without_mindspore():
    lines = _script_imports(ROOT / "scripts" / "gpu_check_kernels.py")
    assert any("kernels" in line for line in lines)
    out = _run_without_mindspore("\n".join(lines) + "\n")
    assert out.returncode == 0 and "IMPORTED" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("path", sorted(KERNELS.glob("**/*.py")) + sorted(KERNELS.glob("aot/*.cu")),
                         ids=lambda p: str(p.relative_to(KERNELS)))
def test_kernels_files_do_not_mention_ms_dfkd(path):
    text = path.read_text()
    lines = [f"{path.name}:{i}: {line}" for i, line in enumerate(text.splitlines(), 1) if "ms_dfkd" in line]
    assert not lines, "\n".join(lines)
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                pytest.fail(f"{path.name}:{node.lineno} imports from above kernels/")
