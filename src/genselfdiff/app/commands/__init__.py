"""One module per CLI subcommand: ``register(subparsers)`` adds its parser, ``run(args)`` does the work."""
