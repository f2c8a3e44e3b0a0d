"""`python -m littlebig`: the same command line as `littlebig`."""

from littlebig.cli import main

main()
