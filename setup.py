"""Package discovery, the one thing pyproject.toml cannot say: every package under vim/, plus the kernels/ tree
installed as vim.kernels (``package-dir`` in pyproject.toml maps the folders), so that a new sub-package is picked up
without a list to keep. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

packages = find_packages(include=['vim', 'vim.*'])
packages += ['vim.kernels' + name[len('kernels'):] for name in find_packages(include=['kernels', 'kernels.*'])]
packages.append('vim.configs.imagenet')  # data only: the training presets (configs/imagenet/*.yaml)
setup(packages=packages)
