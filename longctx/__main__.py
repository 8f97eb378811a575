"""``python -m longctx`` runs the command line (also under torchrun)."""

from longctx.cli import main

if __name__ == "__main__":
    main()
