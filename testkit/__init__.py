"""Plumbing shared by tests/ and benchmarks/, which do not import each other.

Not part of the package: the wheel ships src/fastapi_loopguard only. Both suites run from the
repository root (pytest's rootdir, ``python -m benchmarks.…``, uvicorn started with cwd there),
which is how they find this package, as they find themselves.
"""
