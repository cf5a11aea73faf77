"""Build step for gpconv's one optional C extension (everything else is in pyproject.toml).

gpconv.layers.cpu._native holds the io block's CPU kernels (gpconv/layers/cpu/_native.c). It is optional: without a C
compiler the install still succeeds and gpconv uses torch's ops instead. It is built with OpenMP
where the compiler has it (its threads are then torch's own OpenMP pool, see gpconv/layers/cpu/native.py), and without it otherwise.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, LinkError

OPENMP = "-fopenmp"


class BuildExt(build_ext):
    """Try the extension with -fopenmp first, then without (e.g. a compiler with no OpenMP)."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CompileError, LinkError):
            if OPENMP not in ext.extra_compile_args:
                raise
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            print("gpconv.layers.cpu._native: building without OpenMP (its kernels then run with one torch thread only)")
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "gpconv.layers.cpu._native",
            ["gpconv/layers/cpu/_native.c"],
            extra_compile_args=["-O3", "-pthread", OPENMP],
            extra_link_args=["-pthread", OPENMP],
            optional=True,  # a failed build is a warning, not a failed install
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
