"""The package list in pyproject.toml must match the package folders on disk."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPING = {"dit_sparse": "dit_sparse", "kernels": "dit_sparse.kernels", "pipelines": "dit_sparse.pipelines"}


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk == listed, f"pyproject.toml lists {sorted(listed)} but the folders are {sorted(on_disk)}"


def test_no_top_level_kernels_module():
    import importlib.util

    import dit_sparse.kernels  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "dit_sparse" not in str(spec.origin), "kernels/ must not install as a top-level module"
