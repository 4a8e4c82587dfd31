"""The test suite: real servers on ephemeral ports, real channels (``python -m pytest``)."""
