"""The commands behind ``trl-es``: each module has a ``main(argv)``."""
