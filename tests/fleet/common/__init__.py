"""Code the test fleet's stand-in agents share, imported the way the users' agents import
their own `common` package: by putting the repository root on sys.path from `__file__`."""
