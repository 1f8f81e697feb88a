"""``python -m llmos_kernel.cli``: the same command line as the ``llmos`` script."""

from llmos_kernel.cli import main

main()
