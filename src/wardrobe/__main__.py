"""`python -m wardrobe VERB ...`: the `wardrobe` command without its script on PATH."""

from wardrobe.cli import main

main()
