"""relkd's PEP 517 build backend: setuptools' own, made to build against the
torch of the environment pip installs into.

relkd's extension must be compiled against the torch it will run with (same
version and C++ ABI). pip builds in an isolated environment that sees none
of the invoking environment's packages, so declaring torch as a build
requirement would download another (multi-GB) torch and build against it.
Instead, when the invoking environment has torch, this backend appends its
site-packages directory to the build's import path (after the isolated
environment's own, whose setuptools therefore still win) and nothing is
downloaded; setup.py then pins the wheel to that torch (torch==X.Y.*). Only
where no torch is installed at all does the build require one, and builds
against what pip installs.
"""
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 hooks)


def _site_directories():
    """Where the invoking interpreter keeps packages: its environment's and
    its base installation's site-packages (a venv with system site packages),
    and the user's."""
    dirs = []
    for base in (sys.prefix, sys.base_prefix):
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
        dirs += [paths["purelib"], paths["platlib"]]
    dirs.append(site.getusersitepackages())
    return [d for i, d in enumerate(dirs) if d and d not in dirs[:i]]


def _torch_importable() -> bool:
    """True when torch can be imported now, after adding the invoking
    environment's site-packages to the path if that is where it lives."""
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        pass
    for directory in _site_directories():
        if os.path.isdir(os.path.join(directory, "torch")):
            sys.path.append(directory)
            # Compiler subprocesses do not import Python; setup.py runs here.
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [p for p in (os.environ.get("PYTHONPATH"), directory) if p])
            return True
    return False


def _requires(setuptools_hook, config_settings):
    """setuptools' requirements (it runs setup.py, which imports torch), or,
    where no torch exists at all, torch itself: pip installs it into the
    isolated environment and the build uses that one."""
    if not _torch_importable():
        return ["wheel", "torch"]
    return setuptools_hook(config_settings)


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_sdist, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _torch_importable()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _torch_importable()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _torch_importable()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _torch_importable()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _torch_importable()
    return _setuptools.build_sdist(sdist_directory, config_settings)
