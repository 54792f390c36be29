"""The command line: one module per command group over `common`; `app` assembles them."""
