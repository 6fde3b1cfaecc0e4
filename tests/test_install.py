"""`make install` leaves byte code for what sagan imports, also where PYTHONDONTWRITEBYTECODE is set."""

import importlib.util
import os
import subprocess
import sys

import yaml

import pytorch_lightning

from conftest import REPO


def test_compile_bytecode_writes_site_packages_byte_code_but_not_into_the_source_tree():
    # byte code of two modules from the environment, removed here so that only the script can bring it back
    cached = [importlib.util.cache_from_source(m.__file__) for m in (yaml, pytorch_lightning)]
    for path in cached:
        if os.path.exists(path):
            os.remove(path)
    source_cache = REPO / "sagan" / "__pycache__"
    had_source_cache = source_cache.exists()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_bytecode.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "modules imported" in res.stdout
    for path in cached:
        assert os.path.exists(path), path
    if not had_source_cache:  # Python did not write it for the tests; the script must not either
        assert not source_cache.exists()
