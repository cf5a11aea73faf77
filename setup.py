"""Build step for gpconv's one optional C extension (everything else is in pyproject.toml).

gpconv._native holds the io block's CPU data-movement kernels (gpconv/_native.c). It is optional:
without a C compiler the install still succeeds and gpconv uses torch's copies instead.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gpconv._native",
            ["gpconv/_native.c"],
            extra_compile_args=["-O3", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,  # a failed build is a warning, not a failed install
        )
    ]
)
