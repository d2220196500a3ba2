"""ckf_dist: CKF multi-task LLM recommenders on Ray Train + DeepSpeed.

``ckf_dist.kernels`` lives in the top-level ``kernels/`` folder of the source tree (never importable as a
top-level ``kernels`` module: PyPI's ``kernels`` package owns that name and transformers probes for it). A wheel
or an editable install maps the folder to ``ckf_dist.kernels``; a source tree imported directly has no such
mapping. That happens whenever the repo folder is the working directory of a process with the package
installed non-editable (it shadows the install: the Docker image, ``python -m ckf_dist.train`` from the repo
folder) or not installed at all (``ray job submit --working-dir .``, Ray Train workers started in that working
directory). ``_SourceTreeKernels`` covers those: when, and only when, the imported ``ckf_dist`` package has no
``kernels`` subpackage of its own and its sibling ``kernels/`` folder is this project's, ``ckf_dist.kernels``
is loaded from that folder. It does nothing for an installed wheel (the subpackage is there) and nothing for
any other ``kernels`` folder.
"""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_KERNELS = __name__ + ".kernels"
# A file only this project's kernels/ folder has: never adopt some other "kernels" folder that happens to be
# the package's sibling (e.g. PyPI's `kernels` installed beside an unpacked ckf_dist).
_KERNELS_MARKER = "multi_lora_triton.py"


def source_tree_kernels_dir(package_dirs) -> "str | None":
    """The source tree's ``kernels/`` folder when ``ckf_dist.kernels`` must come from there: none of the
    package's folders holds a ``kernels`` subpackage and the first one's sibling ``kernels/`` is ours."""
    dirs = [os.path.abspath(d) for d in package_dirs]
    if not dirs or any(os.path.isfile(os.path.join(d, "kernels", "__init__.py")) for d in dirs):
        return None
    sibling = os.path.join(os.path.dirname(dirs[0]), "kernels")
    if os.path.isfile(os.path.join(sibling, "__init__.py")) and os.path.isfile(os.path.join(sibling, _KERNELS_MARKER)):
        return sibling
    return None


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Resolves exactly ``ckf_dist.kernels`` to the source tree's ``kernels/`` folder (see the module docstring);
    its submodules are then found through the package's ``__path__`` as usual."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _KERNELS:
            return None
        pkg = sys.modules.get(__name__)
        folder = source_tree_kernels_dir(list(getattr(pkg, "__path__", []) or []))
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
    # First in line, so that the kernels next to the ckf_dist actually imported win over an editable install's
    # mapping (which points at the original checkout, not at a copy such as Ray's unpacked working dir).
    sys.meta_path.insert(0, _SourceTreeKernels())
