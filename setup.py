# The cffi extension modules need setup.py's cffi_modules hook; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["reporter/_build.py:ffi", "tracker/_build.py:ffi", "copier/_build.py:ffi",
                     "nbd_plugin/_build.py:ffi", "copier/_keepaside_build.py:ffi",
                     "replication/_dirtylog_build.py:ffi"])
