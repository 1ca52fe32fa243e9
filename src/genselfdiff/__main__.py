"""``python -m genselfdiff`` (and ``torchrun -m genselfdiff``) is the ``genselfdiff`` command."""

if __name__ == "__main__":
    from genselfdiff.app.cli import main

    raise SystemExit(main())
