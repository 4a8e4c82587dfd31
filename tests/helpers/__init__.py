"""What the tests share, apart from the tests themselves.

- ``servers``: settings for a test server, in process (``make_config``, ``RunningServer``) or as a
  child process (``server_args``, for ``cifar10_serving.server.launcher.ServerProcess``);
- ``models``: tiny exported models; ``faulty_model``: one that misbehaves on marked images, and
  ``faults``: holding it busy, for queue and deadline tests;
- ``images``: random images and their encodings;
- ``traffic``: every answer the service gives, and what each should count in /metrics;
- ``rawh2``: a raw HTTP/2 client that never reads its answers;
- ``feature_load``: callers asking for every feature map, run as their own process;
- ``tritonclient_calls``: a script run by the python of tritonclient's own venv, never imported.

Hostile inputs live in ``bench/hostile.py``: the fuzzer uses them too, and bench never imports tests.
"""
